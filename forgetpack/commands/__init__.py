"""CLI commands, one module per group; ``forgetpack.cli`` imports them only when called."""

from __future__ import annotations

from typing import Any


def console() -> Any:
    """A rich console that prints text verbatim: class names, paths and labels come from
    users, and a name such as ``[mnist]`` must not be read as a style tag."""
    from rich.console import Console

    return Console(markup=False, highlight=False)


def split_names(values: tuple[str, ...] | list[str]) -> list[str]:
    """``--forget seven --forget three`` and ``--forget seven,three`` mean the same, in every
    command. Empty parts are kept, so that the name checks can reject them by name."""
    return [part.strip() for value in values for part in value.split(",")]
