"""``forgetpack eval``: zero-shot accuracy before and after patches, with the paper's forgetting score.

torch and open_clip are imported inside the command, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from forgetpack.cli.options import FORCE, model_path
from forgetpack.cli.render import echo, print_json, progress_bar, warn
from forgetpack.format.fileio import check_output_dir, check_output_file, write_bytes_atomic
from forgetpack.format.names import split_names

OUT = click.Path(path_type=Path)  # checked before any work: one clear line, not a usage error


def _write(path: Path, data: bytes) -> None:
    write_bytes_atomic(path, data)  # a failure is already one line naming the file
    echo(f"wrote {path}", err=True)


@click.command("eval")
@click.argument("model")
@click.option("--patch", "patches", multiple=True, metavar="PATCH", help="Patch file to apply (repeatable, in order).")
@click.option("--forget", multiple=True, metavar="NAME", help="Class the patches forget (repeatable or comma-separated; default: the names the patches record).")
@click.option("--dataset", "datasets", multiple=True, metavar="D",
              help="mnist, digits, letters, quickdraw, quickdraw-345, fashion or imagefolder:DIR (repeatable; default: mnist, digits, letters).")
@click.option("--template", "templates", multiple=True, metavar="T",
              help="Prompt template with {} for the class name (repeatable: ensembled). Default: each dataset's own.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (instead of the tables).")
@click.option("-o", "--output", type=OUT, metavar="FILE", help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=OUT, metavar="FILE", help="Write a PNG chart of per-class accuracy here.")
@click.option("--clip-benchmark", "clip_benchmark_dir", type=OUT, metavar="DIR",
              help="Write CLIP_benchmark result files here (one per dataset and base/patched), for `clip_benchmark build`.")
@FORCE
@click.option("--per-class/--no-per-class", default=None, help="Per-class rows for every class (default: up to 20 classes).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1))
def evaluate(
    model: str,
    patches: tuple[str, ...],
    forget: tuple[str, ...],
    datasets: tuple[str, ...],
    templates: tuple[str, ...],
    as_json: bool,
    output: Path | None,
    plot_out: Path | None,
    clip_benchmark_dir: Path | None,
    force: bool,
    per_class: bool | None,
    device: str,
    batch_size: int,
) -> None:
    """Measure MODEL before and after --patch files: forget-class, retained and other-dataset accuracy.

    \b
    Example:
      forgetpack eval mini --patch seven.fpatch --forget seven --dataset mnist --dataset letters
    """
    from forgetpack.cli.report import plot_png, render_table
    from forgetpack.evaluation import clip_benchmark
    from forgetpack.evaluation.datasets import BUILTIN
    from forgetpack.evaluation.harness import check_forget, load, resolve_datasets
    from forgetpack.evaluation.harness import evaluate as run_evaluation

    inputs = [("the model", model_path(model)), *(("a patch", p) for p in patches)]
    if output is not None:
        check_output_file(output, "JSON report", replace=force, inputs=inputs)
    if plot_out is not None:
        check_output_file(plot_out, "plot", replace=force, inputs=inputs)
    if clip_benchmark_dir is not None:  # the folder collects runs; a file of this run already there needs --force
        check_output_dir(clip_benchmark_dir, replace=True)
    # The loader's and the cache's logged warnings show up through forgetpack.cli.main.
    with progress_bar(not as_json, "encoding images", first_step="reading the datasets") as bar:
        data = resolve_datasets(list(datasets) or list(BUILTIN))
        if forget:  # a name no dataset holds is refused before the model loads
            check_forget(split_names(forget), data)
        if bar:
            bar.step(f"loading {model}")
        report = run_evaluation(
            load(model, device),
            patches=list(patches),
            forget=[n for n in split_names(forget) if n] if forget else None,  # None: what the patches record
            datasets=list(data.values()),
            templates=list(templates) or None,
            device=device,
            batch_size=batch_size,
            progress=bar,
            hand_over=True,
        )
    for name, n in report.skipped.items():
        warn(f"{name}: {n} unreadable image file(s) skipped")
    if report.forget_from_patches:
        elsewhere = f" (recorded, in no evaluated dataset: {', '.join(report.recorded_elsewhere)})" if report.recorded_elsewhere else ""
        echo(f"forgetting (from the patches): {', '.join(report.forget) or 'none'}{elsewhere}", err=True)

    data = report.to_json()
    if as_json:
        print_json(data)
    else:
        render_table(report, per_class=per_class)
    if patches and not report.forget:
        echo("note: no forgotten class in the evaluated datasets: reporting accuracies only, no forgetting score", err=True)
    if output is not None:
        _write(output, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    if plot_out is not None:
        _write(plot_out, plot_png(report))
    if clip_benchmark_dir is not None:
        for path in clip_benchmark.write_results(report, clip_benchmark_dir, replace=force):
            echo(f"wrote {path}", err=True)
