"""Patch commands: inspect, verify, apply, revert, stack, keygen, sign. No torch here."""

from __future__ import annotations

import json
from pathlib import Path

import click

from forgetpack.format.errors import ForgetpackError

PATCH = click.Path(dir_okay=False, path_type=Path)


def _read(path: Path):
    from forgetpack.format.patch import read_patch

    return read_patch(path)


def _print_json(data: object) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False))


def _table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.table import Table

    from forgetpack.cli.render import console

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)


@click.command()
@click.argument("patch", type=PATCH)
@click.option("--json", "as_json", is_flag=True, help="Print the decoded metadata as JSON.")
def inspect(patch: Path, as_json: bool) -> None:
    """Summarise a patch: targets, base, recipe, measured effect."""
    from forgetpack.format.patch import describe

    p = _read(patch)
    info = describe(p)
    if as_json:
        _print_json(info)
        return
    recipe = p.recipe
    rows = [
        ("file", f"{patch} ({info['size_bytes']:,} bytes)"),
        ("model", p.model),
        ("digest", p.digest),
        ("signed", f"key {p.key_id}" if p.signature else "no"),
        ("created", p.created),
        ("tool", p.tool),
    ]
    for name, t in p.targets.items():
        layers = [lay for lay in p.layers if lay.target == name]
        kinds = ", ".join(f"rank {lay.rank}" if lay.kind == "lowrank" else "dense" for lay in layers)
        rows.append((f"target {name}", f"{list(t.shape)} {t.layout}; {kinds}; base {p.base[name][:23]}…"))
    if p.parent:
        rows.append(("parent", ", ".join(f"{n} {fp[:23]}…" for n, fp in p.parent.items())))
    if "forget" in recipe:
        rows.append(("forget", ", ".join(recipe["forget"])))
    for key in ("solver", "target", "templates"):
        if key in recipe:
            rows.append((key, json.dumps(recipe[key], ensure_ascii=False)))
    if "preserve" in recipe:
        preserve = recipe["preserve"]
        shown = ", ".join(preserve[:12]) + (f" … ({len(preserve)} in all)" if len(preserve) > 12 else "")
        rows.append(("preserve", shown))
    if p.components:
        rows.append(("stacked from", ", ".join(c["digest"][:23] + "…" for c in p.components)))
    for key, value in p.effect.items():
        rows.append((f"effect {key}", json.dumps(value, ensure_ascii=False)[:300]))
    _table(f"forgetpack patch {patch.name}", rows)


@click.command()
@click.argument("patch", type=PATCH)
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path), help="Checkpoint the patch must fit.")
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Require a signature by this public key (repeatable: any of them).")
def verify(patch: Path, base: Path | None, keys: tuple[Path, ...]) -> None:
    """Check a patch's digest, its signature, and that it fits a base checkpoint."""
    p = _read(patch)  # reading verifies structure and the content digest
    lines = [f"{patch}: digest ok ({p.digest[:23]}…)"]
    if keys:
        from forgetpack.format.signing import load_public_key, verify_signature

        kid = verify_signature(p, [load_public_key(k) for k in keys])
        lines.append(f"{patch}: signature ok (key {kid})")
    elif p.signature:
        lines.append(f"{patch}: signed by key {p.key_id} (not checked: no --key given)")
    if base is not None:
        from forgetpack.format.checkpoint import Checkpoint, check_fits

        check_fits(p, Checkpoint.read(base))
        lines.append(f"{patch}: fits {base}")
    click.echo("\n".join(lines))


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("patches", nargs=-1, required=True, type=PATCH)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Accept only patches signed by one of these public keys.")
def apply(checkpoint: Path, patches: tuple[Path, ...], output: Path, keys: tuple[Path, ...]) -> None:
    """Write CHECKPOINT with PATCHES applied in order (deterministic, byte for byte)."""
    from forgetpack.format.checkpoint import apply_to_file

    loaded = [_read(p) for p in patches]
    _require_signed(loaded, keys)
    record = apply_to_file(checkpoint, loaded, output)
    click.echo(f"wrote {output}: {len(record.applied)} patch(es) applied on base {checkpoint.name}")


def _require_signed(patches: list, keys: tuple[Path, ...]) -> None:
    if not keys:
        return
    from forgetpack.format.signing import load_public_key, verify_signature

    public = [load_public_key(k) for k in keys]
    for p in patches:
        verify_signature(p, public)


@click.command()
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("patch", type=PATCH)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--base", type=click.Path(dir_okay=False, path_type=Path),
              help="The unpatched base checkpoint: rebuild exactly as base + remaining patches.")
@click.option("--keep", "keep", multiple=True, type=PATCH,
              help="A patch that stays applied (needed with --base; repeatable).")
def revert(checkpoint: Path, patch: Path, output: Path, base: Path | None, keep: tuple[Path, ...]) -> None:
    """Remove PATCH from a patched CHECKPOINT.

    With --base (and --keep for every other applied patch) the result is bit-for-bit
    base + remaining patches. Without it the update is subtracted, and the command says
    whether the result is exact.
    """
    from forgetpack.format.checkpoint import revert_file

    if keep and base is None:
        raise ForgetpackError("--keep needs --base: remaining patches are re-applied to the base")
    result = revert_file(checkpoint, _read(patch), output, base_path=base, others=[_read(k) for k in keep])
    click.echo(f"wrote {output}: {result.how}")
    if not result.exact:
        click.echo(f"warning: {output} is not bit-exact", err=True)


@click.command()
@click.argument("patches", nargs=-1, required=True, type=PATCH)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, path_type=Path))
def stack(patches: tuple[Path, ...], output: Path) -> None:
    """One patch equivalent (bit for bit) to applying PATCHES in order."""
    from forgetpack.format.patch import stack as stack_patches

    stacked = stack_patches([_read(p) for p in patches])
    stacked.save(output)
    click.echo(f"wrote {output}: {len(patches)} patches, {len(stacked.layers)} layers, {output.stat().st_size:,} bytes")


@click.command()
@click.option("-o", "--output", default="forgetpack-key", show_default=True,
              help="Private key path; the public key goes to OUTPUT.pub.")
def keygen(output: str) -> None:
    """Create an ed25519 key pair for signing patches."""
    from forgetpack.format.signing import generate_keypair

    kid = generate_keypair(output, f"{output}.pub")
    click.echo(f"wrote {output} (private, keep it secret) and {output}.pub; key id {kid}")


@click.command()
@click.argument("patch", type=PATCH)
@click.option("--key", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Private key (PEM).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Default: sign in place.")
def sign(patch: Path, key: Path, output: Path | None) -> None:
    """Sign a patch with an ed25519 private key (the digest is unchanged)."""
    from forgetpack.format.signing import load_private_key
    from forgetpack.format.signing import sign as sign_patch

    signed = sign_patch(_read(patch), load_private_key(key))
    signed.save(output or patch)
    click.echo(f"signed {output or patch} with key {signed.key_id}")
