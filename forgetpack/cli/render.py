"""How the CLI prints: one place that makes text from files and users safe for a terminal.

Class names, labels, paths and patch metadata come from users and from files anybody can
write. Printed raw, an escape sequence in a patch's ``created`` field can clear the screen or
forge output, and rich would read ``[bold]`` or ``:warning:`` in a label as markup. So every
command prints through these helpers: control characters (C0, C1, DEL, bidirectional
overrides, line separators) become visible escapes, rich markup and emoji are off, and JSON
output escapes the same characters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import click
from rich.console import Console
from rich.table import Table as RichTable

# Characters a terminal may act on rather than show (tab and newline are kept in plain text).
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_UNSAFE_IN_CELL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(value: Any, *, cell: bool = False) -> str:
    """``value`` as text with every character a terminal could act on shown as ``\\xNN``/``\\uNNNN``.

    In a table cell, newlines and tabs are escaped too (they would break the layout)."""
    text = value if isinstance(value, str) else str(value)
    pattern = _UNSAFE_IN_CELL if cell else _UNSAFE
    return pattern.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


UNWRAPPED_WIDTH = 100_000  # "no limit" for rich: a table is as wide as its content


def output_width(stream: Any) -> int | None:
    """Rich's width for ``stream``: the terminal's (None: rich asks it, or honours ``COLUMNS``), and
    no limit when the stream is a file or a pipe, so tables never wrap and break identifiers there."""
    if os.environ.get("COLUMNS") or (hasattr(stream, "isatty") and stream.isatty()):
        return None
    return UNWRAPPED_WIDTH


def console(stderr: bool = False) -> Console:
    """A rich console that prints text verbatim: no markup, no emoji codes, no highlighting, and no
    wrapping when the output is not a terminal (``output_width``)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(markup=False, emoji=False, highlight=False, stderr=stderr, width=output_width(stream))


class Table(RichTable):
    """A rich table whose title and string cells are escaped (markup is off on our consoles)."""

    def __init__(self, *args: Any, title: str | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("title_justify", "left")
        if title is not None:  # rich folds a title to the table's width: a long path would break mid-word
            kwargs.setdefault("min_width", len(title))
        super().__init__(*args, title=escape(title) if title is not None else None, **kwargs)

    def add_row(self, *cells: Any, **kwargs: Any) -> None:
        super().add_row(*(escape(c, cell=True) if isinstance(c, str) else c for c in cells), **kwargs)


def key_value_table(title: str, rows: Iterable[tuple[str, str]]) -> Table:
    """Two columns, no header: the shape of ``inspect`` and the summaries after a command."""
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value)
    return table


def show(*renderables: Any) -> None:
    """Print rich renderables on stdout."""
    out = console()
    for r in renderables:
        out.print(r)


def echo(text: str, err: bool = False) -> None:
    """One line (or a few) of plain text, escaped."""
    click.echo(escape(text), err=err)


def warn(text: str) -> None:
    echo(f"warning: {text}", err=True)


def print_json(data: Any) -> None:
    """JSON on stdout: sorted, indented, non-ASCII kept, terminal-active characters escaped."""
    text = json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    click.echo(_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text))


class _WarningLines(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        warn(record.getMessage())


@contextmanager
def library_warnings() -> Iterator[None]:
    """Show the library's logged warnings as ``warning: ...`` lines on stderr while a command runs."""
    loggers = [logging.getLogger(name) for name in ("forgetpack", "runtime")]
    handler = _WarningLines(logging.WARNING)
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class Bar:
    """A progress bar's handle: call it with ``(done, total)`` (the library's progress callbacks);
    ``step(text)`` names the next stretch of work, shown with a spinner and its time until counts
    arrive, so a model load or a dataset read is never a silent wait."""

    def __init__(self, progress: Any, what: str) -> None:
        self._progress = progress
        self._what = what
        self._task = progress.add_task(what, total=None)

    def __call__(self, done: int, total: int | None) -> None:
        self._progress.update(self._task, completed=done, total=total, description=self._what)

    def step(self, text: str, counting: str | None = None) -> None:
        """Show ``text`` until counts arrive; ``counting`` renames what they count from then on."""
        self._what = escape(counting) if counting is not None else self._what
        self._progress.reset(self._task, total=None, description=escape(text))


@contextmanager
def progress_bar(enabled: bool, what: str = "encoding text", first_step: str | None = None) -> Iterator[Bar | None]:
    """A progress bar on stderr for long work (none when printing JSON, or when stderr is a file or
    a pipe: a log gets no bar); ``first_step`` is what it shows until the work is counted (``Bar.step``)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console(stderr=True), transient=True) as progress:
        bar = Bar(progress, escape(what))
        if first_step is not None:
            bar.step(first_step)
        yield bar


def hardening_summary(recipe: dict[str, Any], effect: dict[str, Any]) -> str | None:
    """One line on what a patch was hardened against and what the last look through the grid found
    (``forget`` and ``inspect`` both show it). For a forget patch that was not hardened, says so:
    on mini, 50 of 58 plain patches leave some other name that still finds the class. None for a
    patch that forgets nothing by name."""
    audit = effect.get("audit")
    if not isinstance(audit, dict) or not isinstance(audit.get("families"), dict):
        return "no: other names for the class were not tried (--harden; check with `forgetpack audit`)" if recipe.get("forget") else None
    families = [f for f in audit["families"].values() if isinstance(f, dict)]
    found = sum(int(f.get("bypasses", 0)) for f in families)
    tried = sum(int(f.get("tried", 0)) for f in families)
    regressed = len(audit.get("regressed") or [])
    verdict = "clean" if audit.get("clean") else f"{found} bypass(es), {regressed} regressed prompt(s) left"
    against = ", ".join(map(str, recipe.get("harden") or audit["families"]))
    return f"{against}: {tried} variants, {verdict} after {audit.get('rounds', 0)} round(s)"


def figure_png(fig: Any) -> bytes:
    """A finished matplotlib figure as PNG bytes; the figure is closed (pyplot keeps open ones alive)."""
    import io

    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=100)
        return png.getvalue()
    finally:
        plt.close(fig)
