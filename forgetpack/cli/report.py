"""How ``forgetpack eval`` shows an evaluation report: rich tables and a PNG chart.

The evaluation library returns data only; everything printed or drawn about it is here, and
every text goes through ``forgetpack.cli.render`` (class names and dataset names come from
users). matplotlib is imported inside the function that draws.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.cli.render import Table, escape, figure_png
from forgetpack.cli.render import console as verbatim_console

if TYPE_CHECKING:
    from forgetpack.evaluation.harness import EvalReport


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _delta(base: float, after: float) -> str:
    if math.isnan(base) or math.isnan(after):
        return ""
    d = 100 * (after - base)
    return f"{d:+.1f}"


def _title(report: EvalReport) -> str:
    title = report.model
    if report.patches:
        title += f" + {len(report.patches)} patch{'es' if len(report.patches) > 1 else ''}"
    if report.forget:
        title += f", forgetting {', '.join(report.forget)}"
    return title


def _accuracy_table(title: str, first: list[str], has_patch: bool) -> Any:
    """A table with the ``first`` columns, then base % (and patched % and its change)."""
    table = Table(title=title)
    for name in first:
        table.add_column(name, justify="right" if name == "n" else "left")
    table.add_column("base %", justify="right")
    if has_patch:
        table.add_column("patched %", justify="right")
        table.add_column("Δ pt", justify="right")
    return table


def _accuracy_cells(base: float, patched: float | None) -> list[str]:
    return [_pct(base)] if patched is None else [_pct(base), _pct(patched), _delta(base, patched)]


def render_table(report: EvalReport, console: Any = None, per_class: bool | None = None) -> None:
    """Print the before/after summary, the scores and per-class accuracy.

    ``per_class=None`` shows per-class rows for datasets of up to 20 classes and, for larger
    ones, the forgotten classes and the retained classes nearest them.
    """
    console = console or verbatim_console()
    console.print(_summary(report))
    for name, score in report.scores.items():
        if not math.isnan(score.score):
            terms = ", ".join(f"{k} {v:.3f}" for k, v in score.terms.items())
            console.print(escape(f"S[{name}] = {score.score:.4f}  ({terms}){'; ' + score.note if score.note else ''}"))
    if len(report.scores) > 1 and not math.isnan(report.score):
        console.print(f"S = {report.score:.4f} (mean over {len(report.scores)} datasets holding forgotten classes)")
    for name in report.base:
        table = _per_class(report, name, per_class)
        if table is not None:
            console.print(table)


def _summary(report: EvalReport) -> Any:
    """Forget, retain and all-class accuracy of each dataset, base versus patched."""
    has_patch = report.patched is not None
    summary = _accuracy_table(_title(report), ["dataset", "measure"], has_patch)

    def row(dataset: str, measure: str, base: float, patched: float) -> None:
        summary.add_row(dataset, measure, *_accuracy_cells(base, patched if has_patch else None))

    worst = report.worst_retained
    for name, b in report.base.items():
        all_after = report.patched[name].acc1 if report.patched else math.nan
        score = report.scores.get(name)
        if score is not None:
            row(name, f"forget ({', '.join(score.forget)})", *score.forget_acc)
            row("", f"retain ({len(b.classnames) - len(score.forget)} classes)", *score.retain_acc)
            row("", "all classes", b.acc1, all_after)
        else:
            row(name, "all classes", b.acc1, all_after)
        if name in worst:  # an aggregate can hide one class collapsing
            row("", f"worst retained class ({worst[name].classname})", worst[name].base, worst[name].patched)
        summary.add_section()
    return summary


def _per_class(report: EvalReport, name: str, per_class: bool | None) -> Any:
    """Per-class accuracy of one dataset, or None when there is no row to show."""
    b = report.base[name]
    forgotten = set(report.forgotten_indices(name))
    show = per_class if per_class is not None else len(b.classnames) <= 20
    nearest = [b.classnames.index(c) for c in report.neighbours.get(name, [])]
    rows = range(len(b.classnames)) if show else [*sorted(forgotten), *nearest]
    if not rows:
        return None
    table = _accuracy_table(f"{name}: per-class accuracy", ["class", "n"], report.patched is not None)
    counts = np.bincount(b.labels, minlength=len(b.classnames))
    base_recall = b.per_class
    after_recall = report.patched[name].per_class if report.patched else None
    for i in rows:
        label = f"{b.classnames[i]} (forgotten)" if i in forgotten else b.classnames[i]
        if not show and i in nearest:
            label += " (near)"
        after = after_recall[i] if after_recall is not None else None
        table.add_row(label, str(counts[i]), *_accuracy_cells(base_recall[i], after))
    return table


def plot_png(report: EvalReport) -> bytes:
    """A PNG of per-class accuracy before (and after) the patches, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.base)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        _plot_dataset(ax, report, name)
    fig.suptitle(_title(report))
    return figure_png(fig)


def _plot_dataset(ax: Any, report: EvalReport, name: str) -> None:
    """One panel: base (and patched) bars per class, forgotten classes' labels in bold red."""
    b = report.base[name]
    x = np.arange(len(b.classnames))
    width = 0.4 if report.patched else 0.8
    ax.bar(x - (width / 2 if report.patched else 0), 100 * np.nan_to_num(b.per_class), width, label="base",
           color="#4c72b0")  # fmt: skip
    if report.patched:
        ax.bar(x + width / 2, 100 * np.nan_to_num(report.patched[name].per_class), width, label="patched",
               color="#dd8452")  # fmt: skip
    ax.set_ylim(0, 105)
    ax.set_ylabel("accuracy %")
    ax.set_title(name, loc="left")
    if len(b.classnames) <= 60:
        ax.set_xticks(x, b.classnames, rotation=0 if len(b.classnames) <= 12 else 90)
        forgotten = set(report.forgotten_indices(name))
        for i, tick in enumerate(ax.get_xticklabels()):
            if i in forgotten:
                tick.set_color("#c44e52")
                tick.set_fontweight("bold")
    ax.legend(loc="lower right", fontsize="small")
