"""CLI commands, one module per group; ``forgetpack.cli`` imports them only when called."""

from __future__ import annotations


def split_names(values: tuple[str, ...] | list[str]) -> list[str]:
    """``--forget seven --forget three`` and ``--forget seven,three`` mean the same, in every
    command. Empty parts are kept, so that the name checks can reject them by name."""
    return [part.strip() for value in values for part in value.split(",")]
