"""The text cache's files on disk: finding, refreshing and removing shards without ever following
a link or leaving the cache (``runtime.text_cache`` has the format and the trust boundary)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from forgetpack.format.cache import folder_problem

SHARD_NAME = re.compile(r"[0-9a-f]{32}\.safetensors")  # everything else in a cache folder is ignored
DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def evict(root: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used shards under ``root`` (every export) until they fit ``max_bytes``.

    The walk never follows a link: ``root`` and each export folder below it are opened with
    ``O_NOFOLLOW`` and skipped unless they are folders only this user can write, and only regular
    files named like shards are removed, by name relative to that folder, so nothing outside the
    cache can be reached (a link to a folder elsewhere is not entered; a link to a file is not a shard)."""
    try:
        root_fd = os.open(root, DIR_FLAGS)
    except OSError:
        return []
    held: list[int] = [root_fd]
    entries = []
    try:
        if folder_problem(root, os.fstat(root_fd)) is not None:
            return []
        with os.scandir(root_fd) as subs:
            names = [e.name for e in subs if not e.name.startswith(".")]
        for sub in names:
            try:
                fd = os.open(sub, DIR_FLAGS, dir_fd=root_fd)
            except OSError:  # a link, a file, gone
                continue
            held.append(fd)
            if folder_problem(root / sub, os.fstat(fd)) is not None:
                continue
            with os.scandir(fd) as shards:
                for entry in shards:
                    if not SHARD_NAME.fullmatch(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:  # removed by another process meanwhile
                        continue
                    if stat.S_ISREG(st.st_mode):
                        entries.append((st.st_mtime_ns, st.st_size, root / sub / entry.name, fd))
        total = sum(size for _, size, _, _ in entries)
        removed = []
        for _, size, path, fd in sorted(entries, key=lambda e: (e[0], str(e[2]))):
            if total <= max_bytes:
                break
            if path == keep:
                continue
            unlink_shard(fd, path.name)
            total -= size
            removed.append(path)
        return removed
    finally:
        for fd in held:
            os.close(fd)


def unlink_shard(folder_fd: int, name: str) -> None:
    """Remove a shard by name inside an open folder, only if it is a regular file (never a link's target)."""
    try:
        if stat.S_ISREG(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
            os.unlink(name, dir_fd=folder_fd)
    except OSError:  # removed by another process meanwhile, or not ours to remove
        pass


def touch_shard(folder_fd: int, name: str) -> None:
    """Mark a shard as used now (eviction goes by modification time)."""
    try:
        os.utime(name, dir_fd=folder_fd, follow_symlinks=False)
    except OSError:  # vanished or read-only: eviction order is a hint, not a guarantee
        pass
