"""The ``forgetpack`` command line: a lazy click group (``main``), commands and rendering."""

from forgetpack.cli.main import main

__all__ = ["main"]
