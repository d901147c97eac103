"""``forgetpack classify``: zero-shot classification through the runtime (onnx by default for an export)."""

from __future__ import annotations

from pathlib import Path

import click

from forgetpack.cli.render import Table, print_json, show
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_labels, split_names


def _labels(text: str) -> list[str]:
    """``--labels cat,dog``: comma-separated, blanks ignored, then the runtime's label rule."""
    labels = [label for label in split_names([text]) if label]
    if not labels:
        raise ForgetpackError("--labels is empty: give at least one label, e.g. --labels cat,dog")
    return check_labels(labels)


@click.command()
@click.argument("source", metavar="DIR_OR_MODEL")
@click.argument("images", nargs=-1, required=True, metavar="IMAGE...")
@click.option("--labels", "labels_text", required=True, help="Comma-separated class names, e.g. cat,dog,bird.")
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the label (repeatable; averaged). Default: 'a photo of a {}.'")
@click.option("--patch", "patches", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Hot-apply this patch (repeatable, in order).")
@click.option("--backend", default=None, help="Runtime backend: onnx (default for an export directory), torch, or any installed one.")
@click.option("--provider", "providers", multiple=True,
              help="Execution provider, e.g. cpu or cuda (CUDAExecutionProvider); repeatable, in priority order.")
@click.option("--key", "keys", multiple=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Accept only patches signed by one of these public keys.")
@click.option("--threads", type=int, default=None, help="Intra-op threads.")
@click.option("--top", "top_k", type=click.IntRange(1), default=3, show_default=True, help="How many labels to show per image.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def classify(source: str, images: tuple[str, ...], labels_text: str, templates: tuple[str, ...], patches: tuple[Path, ...],
             backend: str | None, providers: tuple[str, ...], keys: tuple[Path, ...], threads: int | None, top_k: int,
             as_json: bool) -> None:
    """Classify IMAGEs over --labels with an export directory or a model spec (zero-shot)."""
    import runtime

    labels = _labels(labels_text)
    options = {"threads": threads} if threads is not None else {}
    model = runtime.load(source, backend=backend, providers=list(providers) or None, trusted_keys=list(keys) or None, **options)
    for p in patches:
        model.apply_patch(p)
    predictions = model.classify(list(images), labels, list(templates) or None)
    results = [
        {"image": image, "label": pred.label, "score": round(pred.score, 6),
         "top": [{"label": label, "prob": round(prob, 6)} for label, prob in pred.top(labels, top_k)]}
        for image, pred in zip(images, predictions, strict=True)
    ]
    if as_json:
        print_json({
            "model": model.model_id, "backend": model.backend.name, "baked": list(model.baked),
            "patches": [p.digest for p in model.patches], "labels": labels,
            "templates": list(templates) or list(runtime.DEFAULT_TEMPLATES), "results": results,
        })
        return
    title = f"{model.model_id} via {model.backend.name}" + (f", {len(model.patches)} patch(es)" if model.patches else "")
    table = Table(title=title)
    table.add_column("image", overflow="fold")
    table.add_column("label", style="bold")
    table.add_column("prob", justify="right")
    table.add_column("runners-up", overflow="fold")
    for r in results:
        rest = ", ".join(f"{t['label']} {t['prob']:.3f}" for t in r["top"][1:])
        table.add_row(r["image"], r["label"], f"{r['score']:.3f}", rest)
    show(table)
