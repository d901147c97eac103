"""Where forgetpack may keep caches, decided in one place.

``$FORGETPACK_CACHE`` names the cache root; unset or empty means ``$XDG_CACHE_HOME/forgetpack``
(``~/.cache/forgetpack`` when that is unset too, as the XDG base directory spec says);
``off`` (or ``0``, ``none``, ``false``, ``no``) turns every cache off, so that nothing is
written anywhere. Callers ask for their own subfolder and get ``None`` when caching is off.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "FORGETPACK_CACHE"
OFF_VALUES = ("0", "off", "none", "false", "no")


def cache_root() -> Path | None:
    """The cache root, or None when caching is off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in OFF_VALUES:
        return None
    if value:
        return Path(value).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "forgetpack"


def cache_dir(kind: str) -> Path | None:
    """The folder for one kind of cache (``features``, ``image-embeddings``), or None when off."""
    root = cache_root()
    return None if root is None else root / kind
