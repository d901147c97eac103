"""``forgetpack export``: a (patched) model as ONNX graphs + tokenizer + manifest. torch only inside."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from forgetpack.cli.options import FORCE, model_path
from forgetpack.cli.render import echo, progress_bar
from forgetpack.format.manifest import Manifest

PATCH = click.Path(dir_okay=False, path_type=Path)


@click.command()
@click.argument("model")
@click.option("--patch", "patches", multiple=True, type=PATCH, help="Bake this patch in (repeatable; applied in order).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path), help="Export directory.")
@click.option("--quantize", type=click.Choice(["int8"]), help="Dynamic int8 quantization (onnxruntime.quantization).")
@click.option("--opset", type=int, default=18, show_default=True, help="ONNX opset (18 to 20).")
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

    from forgetpack.engine.models import load_model
    from forgetpack.evaluation.quantization import quantized_accuracy
    from forgetpack.export import check_opset, export_loaded
    from forgetpack.format.fileio import check_output_dir
    from forgetpack.format.patch import read_patch
    from forgetpack.format.signing import load_public_keys, require_signed

    check_opset(opset)  # one line, before the model loads
    check_output_dir(output, force, inputs=[("the model", model_path(model)), *(("a patch", p) for p in patches),
                                            *(("a public key", k) for k in keys)])
    loaded_patches = [read_patch(p) for p in patches]
    require_signed(loaded_patches, load_public_keys(keys or None))  # no --key: no signature required
    accuracy = None
    with progress_bar(not as_json, "export", first_step=f"loading {model}") as bar:
        loaded = load_model(model)
        manifest = export_loaded(loaded, output, loaded_patches, quantize=quantize, opset=opset, force=force,
                                 progress=bar and (lambda line: bar.step(line)))
        if quantize == "int8":
            if bar:
                bar.step("held-out accuracy, int8 beside fp32 ...")
            accuracy = quantized_accuracy(loaded, output, loaded_patches)
    if as_json:
        data = manifest.to_json()
        if accuracy is not None:
            data["quantized_accuracy"] = dataclasses.asdict(accuracy)
        click.echo(json.dumps(data, indent=2, sort_keys=True))
        return
    lines = [f"model      {manifest.model_id} ({manifest.precision}, opset {manifest.opset})"]
    for name, tower in manifest.towers.items():
        size = (output / tower.file).stat().st_size
        lines.append(f"{name:<10} {tower.file} {size / 2**20:,.1f} MiB; projection {tower.projection}{_parity(manifest, name)}")
    if accuracy is not None:
        lines.append(f"accuracy   {accuracy.dataset} held-out top-1 {accuracy.int8:.1%} int8, {accuracy.fp32:.1%} fp32 "
                     f"({accuracy.images} images)")
    lines.append(f"patches    {len(manifest.patches)} baked in" + "".join(f"\n           {p['digest'][:23]}…" for p in manifest.patches))
    echo("\n".join(lines))


def _parity(manifest: Manifest, tower: str) -> str:
    """The graph's own ONNX-vs-torch difference, and the fp32 graph's beside it for a quantized one."""
    shipped, fp32 = manifest.export_check.get(tower), manifest.export_check.get(f"{tower}.fp32")
    text = f"; max |onnx - torch| {shipped:.1e}" if shipped is not None else ""
    if fp32 is not None:
        text += f" ({manifest.precision}; fp32 graph {fp32:.1e})" if shipped is not None else f"; fp32 graph's max |onnx - torch| {fp32:.1e}"
    return text
