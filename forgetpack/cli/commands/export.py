"""``forgetpack export``: a (patched) model as ONNX graphs + tokenizer + manifest. torch only inside."""

from __future__ import annotations

from pathlib import Path

import click

from forgetpack.cli.options import FORCE, model_path

PATCH = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("model")
@click.option("--patch", "patches", multiple=True, type=PATCH, help="Bake this patch in (repeatable; applied in order).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Export directory.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Dynamic int8 quantization (onnxruntime.quantization).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset.")
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Bake in only patches signed by one of these public keys.")
@FORCE
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def export(model: str, patches: tuple[Path, ...], output: Path, quantize: str | None, opset: int,
           keys: tuple[Path, ...], force: bool, as_json: bool) -> None:
    """Export MODEL (a model spec such as mini or ViT-B-32:none) for serving with onnxruntime.

    Writes the image and text towers as ONNX graphs with a dynamic batch axis, the tokenizer,
    the preprocessing settings and a manifest; serve it with 'forgetpack classify OUTPUT ...'
    or runtime.load(OUTPUT), and hot-swap further patches there without re-exporting.
    """
    import json

    from forgetpack.export import export as run_export
    from forgetpack.format.fileio import check_output_dir
    from forgetpack.format.patch import read_patch
    from forgetpack.format.signing import load_public_keys, require_signed

    check_output_dir(output, force, inputs=[("the model", model_path(model)), *(("a patch", p) for p in patches),
                                            *(("a public key", k) for k in keys)])
    loaded = [read_patch(p) for p in patches]
    require_signed(loaded, load_public_keys(keys or None))  # no --key: no signature required
    progress = (lambda line: click.echo(line, err=True)) if not as_json else None
    manifest = run_export(model, output, loaded, quantize=quantize, opset=opset, force=force, progress=progress)
    if as_json:
        click.echo(json.dumps(manifest.to_json(), indent=2, sort_keys=True))
        return
    lines = [f"model      {manifest.model_id} ({manifest.precision}, opset {manifest.opset})"]
    for name, tower in manifest.towers.items():
        size = (output / tower.file).stat().st_size
        check = manifest.export_check.get(name)
        lines.append(f"{name:<10} {tower.file} {size / 2**20:,.1f} MiB; projection {tower.projection}"
                     + (f"; max |onnx - torch| {check:.1e}" if check is not None else ""))
    lines.append(f"patches    {len(manifest.patches)} baked in" + "".join(f"\n           {p['digest'][:23]}…" for p in manifest.patches))
    click.echo("\n".join(lines))
