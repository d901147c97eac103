"""``forgetpack eval``: zero-shot accuracy before and after patches, with the paper's forgetting score.

torch and open_clip are imported inside the command, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import click

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import split_names

OUT = click.Path(dir_okay=False, path_type=Path)


def _check_output(path: Path | None, what: str) -> None:
    """Fail before any work if an output could not be written."""
    if path is None:
        return
    if path.is_dir():
        raise ForgetpackError(f"{path} is a directory; give a file name for the {what}")
    if not path.resolve().parent.is_dir():
        raise ForgetpackError(f"{path}: output directory {path.resolve().parent} does not exist")


@click.command("eval")
@click.argument("model")
@click.option("--patch", "patches", multiple=True, metavar="PATCH", help="Patch file to apply (repeatable, in order).")
@click.option("--forget", multiple=True, metavar="NAME", help="Class the patches forget (repeatable or comma-separated).")
@click.option("--dataset", "datasets", multiple=True, metavar="D",
              help="mnist, digits, letters or imagefolder:DIR (repeatable; default: the three built-in sets).")
@click.option("--template", "templates", multiple=True, metavar="T",
              help="Prompt template with {} for the class name (repeatable: ensembled). Default: each dataset's own.")
@click.option("--json", "json_out", type=OUT, help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=OUT, help="Write a PNG chart of per-class accuracy here.")
@click.option("--per-class/--no-per-class", default=None, help="Per-class rows for every class (default: up to 20 classes).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
def evaluate(
    model: str,
    patches: tuple[str, ...],
    forget: tuple[str, ...],
    datasets: tuple[str, ...],
    templates: tuple[str, ...],
    json_out: Path | None,
    plot_out: Path | None,
    per_class: bool | None,
    device: str,
    batch_size: int,
) -> None:
    """Measure MODEL before and after --patch files: forget-class, retained and other-dataset accuracy.

    \b
    Example:
      forgetpack eval mini --patch seven.fpatch --forget seven --dataset mnist --dataset letters
    """
    from forgetpack.evaluation import harness as harness
    from forgetpack.evaluation.datasets import BUILTIN

    _check_output(json_out, "JSON report")
    _check_output(plot_out, "plot")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = harness.evaluate(
            model,
            patches=list(patches),
            forget=[n for n in split_names(forget) if n],
            datasets=list(datasets) or list(BUILTIN),
            templates=list(templates) or None,
            device=device,
            batch_size=batch_size,
        )
    for w in caught:  # the dataset loader's own warnings (unreadable files, empty classes)
        message = str(w.message)
        if message.startswith(("skipped unreadable image", "image folder")):
            click.echo(f"warning: {message}", err=True)
    for name, n in report.skipped.items():
        click.echo(f"warning: {name}: {n} unreadable image file(s) skipped", err=True)

    harness.render_table(report, per_class=per_class)
    if patches and not forget:
        click.echo("note: no --forget given: reporting accuracies only, no forgetting score", err=True)
    if json_out is not None:
        try:
            json_out.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        except OSError as exc:
            raise ForgetpackError(f"cannot write {json_out}: {exc}") from exc
        click.echo(f"wrote {json_out}", err=True)
    if plot_out is not None:
        harness.plot_report(report, plot_out)
        click.echo(f"wrote {plot_out}", err=True)
