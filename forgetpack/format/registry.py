"""Plugins by entry point: the one lookup rule for solvers, variant families and runtime backends.

Scanning the installed packages' metadata costs about 10 ms (every ``.dist-info`` folder is read),
and a hardened forget, a service or a loop of ``runtime.load`` calls looks plugins up hundreds of
times. So the scan of a group is remembered, and a name not found in it is looked up once more
before the error: a plugin installed while the process runs is still found.
"""

from __future__ import annotations

from importlib import metadata

from forgetpack.format.errors import ForgetpackError

_SCANNED: dict[str, dict[str, metadata.EntryPoint]] = {}


def installed(group: str, *, rescan: bool = False) -> dict[str, metadata.EntryPoint]:
    """Entry points of ``group`` by name (none imported), from the last scan unless ``rescan``."""
    if rescan or group not in _SCANNED:
        _SCANNED[group] = {ep.name: ep for ep in metadata.entry_points(group=group)}
    return dict(_SCANNED[group])


def find(group: str, name: str, what: str) -> metadata.EntryPoint:
    """The entry point ``name`` of ``group``, or a one-line error naming the installed ones.

    ``what`` names the kind of plugin in the error ("solver", "runtime backend")."""
    found = installed(group)
    if name not in found:
        found = installed(group, rescan=True)
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ForgetpackError(f"unknown {what} {name!r} (installed: {known}; plugins register in entry-point group {group})")
    return found[name]


def load(group: str, name: str, what: str) -> object:
    """The object entry point ``name`` of ``group`` names, imported now."""
    try:
        return find(group, name, what).load()
    except ImportError as exc:
        raise ForgetpackError(f"{what} {name!r} cannot be imported ({exc}); is its package installed?") from None
