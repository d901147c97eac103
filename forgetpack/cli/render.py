"""How forgetpack prints to a terminal: one rich console setting for every table."""

from __future__ import annotations

from typing import Any


def console() -> Any:
    """A rich console that prints text verbatim: class names, paths and labels come from
    users, and a name such as ``[mnist]`` must not be read as a style tag."""
    from rich.console import Console

    return Console(markup=False, highlight=False)
