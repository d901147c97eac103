"""Where forgetpack may keep caches, decided in one place.

``$FORGETPACK_CACHE`` names the cache root; unset or empty means ``$XDG_CACHE_HOME/forgetpack``
(``~/.cache/forgetpack`` when that is unset too, as the XDG base directory spec says);
``off`` (or ``0``, ``none``, ``false``, ``no``) turns every cache off, so that nothing is
written anywhere. Callers ask for their own subfolder and get ``None`` when caching is off.

A cache is trusted only as far as its folder is: ``folder_problem`` is the one rule for a
folder whose content a process will act on (as ssh refuses a key file others can write).
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

CACHE_ENV = "FORGETPACK_CACHE"
OFF_VALUES = ("0", "off", "none", "false", "no")
log = logging.getLogger(__name__)
_refused: set[str] = set()  # folders already warned about in this process


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
    """The folder for one kind of cache (``features``, ``image-embeddings``), or None when off.

    The folder is created 0700; one that others can change (``folder_problem``) turns that cache
    off for the process, with one warning: what a cache holds decides what forgetpack answers."""
    root = cache_root()
    if root is None:
        return None
    folder = root / kind
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:  # unwritable: each cache says so when it writes; a miss is only slower
        return folder
    problem = folder_problem(folder)
    if problem is not None:
        if str(folder) not in _refused:
            _refused.add(str(folder))
            log.warning("cache folder %s %s: that cache is off (make it a folder only you can write)", folder, problem)
        return None
    return folder


def folder_problem(path: str | os.PathLike[str], st: os.stat_result | None = None) -> str | None:
    """Why ``path`` is not a folder only this user can change, or None when it is one.

    Refused: a symbolic link or anything but a folder, a folder owned by another user (root
    excepted, as ssh does) and a folder its group or others may write. ``st`` is the folder's
    stat when the caller already holds it (``os.fstat`` of an open folder: no race with a rename).
    """
    try:
        st = os.lstat(path) if st is None else st
    except OSError as exc:
        return f"cannot be examined ({exc.strerror or exc})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a folder"
    uid = os.getuid() if hasattr(os, "getuid") else None  # no owners to compare off POSIX
    if uid is not None and st.st_uid not in (uid, 0):
        return f"is owned by another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by {'others' if st.st_mode & stat.S_IWOTH else 'its group'} (mode {stat.S_IMODE(st.st_mode):o})"
    return None
