"""Patch commands: inspect, verify, apply, revert, stack, keygen, sign. No torch here.

Each command computes one result dict: ``--json`` prints it, otherwise it is rendered for a
person. Everything printed that came from a file goes through ``forgetpack.cli.render``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from forgetpack.cli.options import FORCE
from forgetpack.cli.render import echo, hardening_summary, key_value_table, print_json, show, warn
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_output_file

PATCH = click.Path(path_type=Path)  # checked by the reader: one line saying what the path is
FILE = click.Path(path_type=Path)
JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
KEYS = click.option("--key", "keys", multiple=True, type=FILE,
                    help="Accept only patches signed by one of these public keys (repeatable).")


def _read(path: Path) -> Any:
    from forgetpack.format.patch import read_patch

    return read_patch(path)


def _trusted(keys: tuple[Path, ...]) -> Any:
    """The one key rule for every command: no --key means no signature required."""
    from forgetpack.format.signing import load_public_keys

    return load_public_keys(list(keys)) if keys else None


def _patches(paths: tuple[Path, ...]) -> list[tuple[str, Path]]:
    """The patch files a command reads, as the overwrite rule's inputs."""
    return [("a patch", p) for p in paths]


def _keys(paths: tuple[Path, ...]) -> list[tuple[str, Path]]:
    return [("a public key", k) for k in paths]


def _short(value: Any, limit: int = 300) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


@click.command()
@click.argument("patch", type=PATCH)
@JSON
def inspect(patch: Path, as_json: bool) -> None:
    """Summarise a patch: targets, base, recipe, measured effect."""
    from forgetpack.format.metadata import describe

    p = _read(patch)
    info = describe(p)
    if as_json:
        print_json(info)
        return
    recipe = p.recipe
    signed = f"signature present (key {p.key_id}), not verified: use 'verify --key'" if p.signature else "no"
    rows = [
        ("file", f"{patch} ({info['size_bytes']:,} bytes)"),
        ("model", p.model),
        ("digest", p.digest),
        ("signed", signed),
        ("created", p.created or "not recorded (see SOURCE_DATE_EPOCH in docs/patch-format.md)"),
        ("tool", p.tool),
    ]
    for name, t in p.targets.items():
        layers = [lay for lay in p.layers if lay.target == name]
        kinds = ", ".join(f"rank {lay.rank}" if lay.kind == "lowrank" else "dense" for lay in layers)
        rows.append((f"target {name}", f"{list(t.shape)} {t.layout}; {kinds}; base {p.base[name][:23]}…"))
    if p.parent:
        rows.append(("parent", ", ".join(f"{n} {fp[:23]}…" for n, fp in p.parent.items())))
    if isinstance(recipe.get("forget"), list):
        rows.append(("forget", ", ".join(map(str, recipe["forget"]))))
    for key in ("solver", "target", "templates"):
        if key in recipe:
            rows.append((key, _short(recipe[key])))
    if isinstance(recipe.get("preserve"), list):
        preserve = list(map(str, recipe["preserve"]))
        rows.append(("preserve", ", ".join(preserve[:12]) + (f" … ({len(preserve)} in all)" if len(preserve) > 12 else "")))
    if p.components:
        rows.append(("stacked from", ", ".join(str(c.get("digest", "?"))[:23] + "…" for c in p.components)))
    hardened = hardening_summary(recipe, p.effect)
    if hardened:
        rows.append(("hardened", hardened))
    for key, value in p.effect.items():
        if key != "audit" or not hardened:
            rows.append((f"effect {key}", _short(value)))
    show(key_value_table(f"forgetpack patch {patch.name}", rows))


@click.command()
@click.argument("patch", type=PATCH)
@click.option("--base", type=FILE, help="Checkpoint the patch must fit.")
@KEYS
@JSON
def verify(patch: Path, base: Path | None, keys: tuple[Path, ...], as_json: bool) -> None:
    """Check a patch's digest, its signature, and that it fits a base checkpoint."""
    p = _read(patch)  # reading verifies structure and the content digest
    result: dict[str, Any] = {"patch": str(patch), "digest": p.digest, "digest_ok": True,
                              "signature": None, "fits": None}
    if p.signature:
        result["signature"] = {"key_id": p.key_id, "verified": False}
    trusted = _trusted(keys)
    if trusted is not None:
        from forgetpack.format.signing import verify_signature

        result["signature"] = {"key_id": verify_signature(p, trusted), "verified": True}
    if base is not None:
        from forgetpack.format.checkpoint import Checkpoint, check_fits

        check_fits(p, Checkpoint.read(base))
        result["fits"] = str(base)
    if as_json:
        print_json(result)
        return
    lines = [f"{patch}: digest ok ({p.digest[:23]}…)"]
    if result["signature"] and result["signature"]["verified"]:
        lines.append(f"{patch}: signature ok (key {p.key_id})")
    elif p.signature:
        lines.append(f"{patch}: signature present (key {p.key_id}), not verified: no --key given")
    if base is not None:
        lines.append(f"{patch}: fits {base}")
    echo("\n".join(lines))


@click.command()
@click.argument("checkpoint", type=FILE)
@click.argument("patches", nargs=-1, required=True, type=PATCH)
@click.option("-o", "--output", required=True, type=FILE)
@KEYS
@FORCE
@JSON
def apply(checkpoint: Path, patches: tuple[Path, ...], output: Path, keys: tuple[Path, ...], force: bool, as_json: bool) -> None:
    """Write CHECKPOINT with PATCHES applied in order (deterministic, byte for byte)."""
    from forgetpack.format.checkpoint import apply_to_file
    from forgetpack.format.signing import require_signed

    check_output_file(output, "patched checkpoint", replace=force,
                      inputs=[("the base checkpoint", checkpoint), *_patches(patches), *_keys(keys)])
    loaded = [_read(p) for p in patches]
    require_signed(loaded, _trusted(keys))
    record = apply_to_file(checkpoint, loaded, output)
    if as_json:
        print_json({"output": str(output), "checkpoint": str(checkpoint), "applied": [e["digest"] for e in record.applied]})
        return
    echo(f"wrote {output}: {len(record.applied)} patch(es) applied on base {checkpoint.name}")


@click.command()
@click.argument("checkpoint", type=FILE)
@click.argument("patch", type=PATCH)
@click.option("-o", "--output", required=True, type=FILE)
@click.option("--base", type=FILE, help="The unpatched base checkpoint: rebuild exactly as base + remaining patches.")
@click.option("--keep", "keep", multiple=True, type=PATCH, help="A patch that stays applied (needed with --base; repeatable).")
@FORCE
@JSON
def revert(checkpoint: Path, patch: Path, output: Path, base: Path | None, keep: tuple[Path, ...], force: bool,
           as_json: bool) -> None:
    """Remove PATCH from a patched CHECKPOINT.

    With --base (and --keep for every other applied patch) the result is bit-for-bit
    base + remaining patches. Without it the update is subtracted, and the command says
    whether the result is exact.
    """
    from forgetpack.format.checkpoint import revert_file

    if keep and base is None:
        raise ForgetpackError("--keep needs --base: remaining patches are re-applied to the base")
    check_output_file(output, "checkpoint", replace=force, inputs=[
        ("the patched checkpoint", checkpoint), ("the base checkpoint", base), *_patches((patch, *keep))])
    result = revert_file(checkpoint, _read(patch), output, base_path=base, others=[_read(k) for k in keep])
    if as_json:
        print_json({"output": str(output), "exact": result.exact, "how": result.how,
                    "applied": [e["digest"] for e in result.record.applied]})
        return
    echo(f"wrote {output}: {result.how}")
    if not result.exact:
        warn(f"{output} is not bit-exact")


@click.command()
@click.argument("patches", nargs=-1, required=True, type=PATCH)
@click.option("-o", "--output", required=True, type=FILE)
@FORCE
@JSON
def stack(patches: tuple[Path, ...], output: Path, force: bool, as_json: bool) -> None:
    """One patch equivalent (bit for bit) to applying PATCHES in order."""
    from forgetpack.format.patch import stack as stack_patches

    check_output_file(output, "patch", replace=force, inputs=_patches(patches))
    stacked = stack_patches([_read(p) for p in patches])
    stacked.save(output)
    size = output.stat().st_size
    if as_json:
        print_json({"output": str(output), "patches": len(patches), "layers": len(stacked.layers),
                    "size_bytes": size, "digest": stacked.digest})
        return
    echo(f"wrote {output}: {len(patches)} patches, {len(stacked.layers)} layers, {size:,} bytes")


@click.command()
@click.option("-o", "--output", default="forgetpack-key", show_default=True, type=FILE,
              help="Private key path; the public key goes to OUTPUT.pub.")
@FORCE
@JSON
def keygen(output: Path, force: bool, as_json: bool) -> None:
    """Create an ed25519 key pair for signing patches."""
    from forgetpack.format.signing import generate_keypair

    public = Path(f"{output}.pub")
    kid = generate_keypair(output, public, replace=force)  # the overwrite rule, for both files
    if as_json:
        print_json({"private": str(output), "public": str(public), "key_id": kid})
        return
    echo(f"wrote {output} (private, keep it secret) and {public}; key id {kid}")


@click.command()
@click.argument("patch", type=PATCH)
@click.option("--key", required=True, type=FILE, help="Private key (PEM).")
@click.option("-o", "--output", type=FILE, help="Default: sign in place (the digest, and so what the patch does, is unchanged).")
@FORCE
@JSON
def sign(patch: Path, key: Path, output: Path | None, force: bool, as_json: bool) -> None:
    """Sign a patch with an ed25519 private key (the digest is unchanged)."""
    from forgetpack.format.signing import load_private_key
    from forgetpack.format.signing import sign as sign_patch

    if output is None:  # in place, the one output that is its input: asked for by leaving out -o
        target = check_output_file(patch, "signed patch")
    else:
        target = check_output_file(output, "signed patch", replace=force, inputs=[("the patch", patch), ("the private key", key)])
    signed = sign_patch(_read(patch), load_private_key(key))
    signed.save(target)
    if as_json:
        print_json({"output": str(target), "key_id": signed.key_id, "digest": signed.digest})
        return
    echo(f"signed {target} with key {signed.key_id}")
