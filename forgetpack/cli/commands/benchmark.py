"""``forgetpack benchmark``: published experiments in one command (``benchmark paper``: the paper's table).

torch and open_clip are imported inside the command, so ``forgetpack --help`` stays light.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click

from forgetpack.cli.options import FORCE, model_path
from forgetpack.cli.render import Table, echo, figure_png, print_json, progress_bar, show
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_output_file, write_bytes_atomic
from forgetpack.format.names import split_names

OUT = click.Path(path_type=Path)


@click.group("benchmark")
def benchmark() -> None:
    """Reproduce published experiments on your own copies of their datasets."""


@benchmark.command("paper")
@click.option("--model", "model", required=True, metavar="SPEC",
              help="Model spec: RN50:openai and ViT-B-16:openai are the paper's; mini runs the protocol on its built-in sets.")
@click.option("--data-root", type=click.Path(path_type=Path), metavar="DIR",
              help="Folder holding the datasets (see docs/benchmark.md); not used with mini.")
@click.option("--datasets", "datasets", multiple=True, metavar="D",
              help="dogs, cars, caltech101, flowers (mini: mnist, letters, quickdraw, fashion); repeatable or comma-separated. Default: all.")
@click.option("--solver", "solvers", multiple=True, metavar="S",
              help="paper (the method as published), default (forgetpack's) or an installed solver; repeatable. Default: paper and default.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (instead of the tables).")
@click.option("-o", "--output", type=OUT, metavar="FILE", help="Write the report as JSON here.")
@click.option("--plot", "plot_out", type=OUT, metavar="FILE", help="Write a PNG chart of S per request and solver here.")
@FORCE
@click.option("--device", default="cpu", show_default=True)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
def paper(model: str, data_root: Path | None, datasets: tuple[str, ...], solvers: tuple[str, ...], as_json: bool,
          output: Path | None, plot_out: Path | None, force: bool, device: str, batch_size: int) -> None:
    """The paper's experiment: forget three classes per dataset, one at a time and together, and score S.

    \b
    Examples:
      forgetpack benchmark paper --model ViT-B-16:openai --data-root ~/data
      forgetpack benchmark paper --model mini
    """
    from forgetpack.evaluation.paper import DEFAULT_SOLVERS, run_benchmark, solver_options

    for path, what in ((output, "JSON report"), (plot_out, "plot")):
        if path is not None:
            check_output_file(path, what, replace=force, inputs=[("the model", model_path(model))])
    chosen_solvers = [s for s in split_names(solvers) if s] or list(DEFAULT_SOLVERS)
    for s in chosen_solvers:
        solver_options(s)  # an unknown solver fails here, before any dataset or model is read
    sets = _load_sets(model, data_root, [d for d in split_names(datasets) if d])
    with progress_bar(not as_json, "benchmark") as progress:
        report = run_benchmark(model, sets, chosen_solvers, device=device, batch_size=batch_size, progress=progress)
    data = report.to_json()
    if as_json:
        print_json(data)
    else:
        render(report)
    if output is not None:
        write_bytes_atomic(output, (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        echo(f"wrote {output}", err=True)
    if plot_out is not None:
        write_bytes_atomic(plot_out, plot_png(report))
        echo(f"wrote {plot_out}", err=True)


def _load_sets(model: str, data_root: Path | None, chosen: list[str]) -> list[Any]:
    """mini's built-in sets, or the paper's datasets under ``data_root``; fails before any model loads."""
    from forgetpack.evaluation import paper_datasets as pd

    if model.strip() == "mini":
        if data_root is not None:
            echo("note: mini uses its built-in sets; --data-root is not used", err=True)
        unknown = [d for d in chosen if d not in pd.MINI_FORGET]
        if unknown:
            raise ForgetpackError(f"unknown mini dataset {unknown[0]!r}: choose from {', '.join(pd.MINI_FORGET)}")
        sets = pd.mini_sets()
        return [s if not chosen or s.name in chosen or not s.forget else pd.BenchmarkSet(s.data, (), s.source) for s in sets]
    if data_root is None:
        raise ForgetpackError("--data-root is required (the folder holding the datasets; see docs/benchmark.md)")
    return pd.load_paper_datasets(data_root, chosen or pd.PAPER_KEYS)


def _pct(value: float) -> str:
    return "–" if math.isnan(value) else f"{100 * value:.1f}"


def _acc(f: float, r: float, o: float) -> str:
    return f"{_pct(f)} / {_pct(r)} / {_pct(o)}"


def render(report: Any) -> None:
    """The paper's table: per request, forget / retained / other accuracy (%) before and after each
    solver's patch, its S and the seconds the patch took; then the mean S per dataset."""
    table = Table(title=f"{report.model}: forget / retained / other-datasets accuracy (%), S (lower is better)")
    for column in ("dataset", "forget", "base f / r / o"):
        table.add_column(column)
    for s in report.solvers:
        table.add_column(f"{s} f / r / o")
        table.add_column(f"{s} S", justify="right")
        table.add_column(f"{s} solve s", justify="right")
    first = report.solvers[0]
    for i, row in enumerate(report.rows(first)):
        base = row.score
        cells = [row.dataset, ", ".join(row.forget),
                 _acc(base.forget_acc[0], base.retain_acc[0], row.other_acc[0])]  # fmt: skip
        for s in report.solvers:
            r = report.rows(s)[i]
            cells += [_acc(r.score.forget_acc[1], r.score.retain_acc[1], r.other_acc[1]),
                      "–" if math.isnan(r.score.score) else f"{r.score.score:.4f}", f"{r.seconds:.1f}"]  # fmt: skip
        table.add_row(*cells)
    summary = Table(title="mean S (one class / three classes / all)")
    summary.add_column("dataset")
    for s in report.solvers:
        summary.add_column(s, justify="right")
    for dataset in [*report.forget, None]:
        cells = [dataset or "all"]
        for s in report.solvers:
            values = [report.mean_score(s, dataset, 1), report.mean_score(s, dataset, len(report.forget.get(dataset, [])) or 3),
                      report.mean_score(s, dataset)]  # fmt: skip
            cells.append(" / ".join("–" if math.isnan(v) else f"{v:.4f}" for v in values))
        summary.add_row(*cells)
    base = Table(title="base zero-shot accuracy")
    for column in ("dataset", "images", "classes", "acc %", "read from"):
        base.add_column(column)
    for name, r in report.base.items():
        base.add_row(name, str(len(r.labels)), str(len(r.classnames)), _pct(r.acc1), report.sources.get(name, ""))
    show(base, table, summary)
    notes = sorted({r.score.note for r in report.results if r.score.note})
    for note in notes:
        echo(f"note: S {note}", err=True)


def plot_png(report: Any) -> bytes:
    """Bars of S per request, one colour per solver."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r.dataset}: {' + '.join(r.forget)}" for r in report.rows(report.solvers[0])]
    x = np.arange(len(labels))
    width = 0.8 / len(report.solvers)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(labels) + 2), 4.5))
    for i, s in enumerate(report.solvers):
        ax.bar(x + (i - (len(report.solvers) - 1) / 2) * width, [np.nan_to_num(r.score.score) for r in report.rows(s)],
               width, label=s)  # fmt: skip
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("S (lower is better)")
    ax.set_title(f"{report.model}: the paper's forgetting score per request", loc="left")
    ax.legend()
    return figure_png(fig)
