"""Options several commands share, spelled once so that every command means the same by them.

``--force`` is the switch of the one overwrite rule (``forgetpack.format.fileio.check_output_file``
and ``check_output_dir``): without it an existing output is refused; with it the output is replaced
atomically. An output that is one of the command's own inputs is refused either way.
"""

from __future__ import annotations

from pathlib import Path

import click

FORCE = click.option("--force", is_flag=True, help="Replace an existing output (never one of this command's inputs).")


def model_path(spec: str | None) -> Path | None:
    """The checkpoint an engine model spec reads (``ARCH:PATH``), for the rule's list of inputs; None
    for ``mini``, ``ARCH:TAG``, ``ARCH:none`` and ``hf-hub:``, which read no file of the user's."""
    arch, sep, rest = (spec or "").strip().partition(":")
    if not sep or not rest or arch == "hf-hub" or rest == "none":
        return None
    path = Path(rest).expanduser()
    return path if path.is_file() else None
