"""Text features on disk, so that a restarted service or a second ``classify`` re-encodes nothing.

The text graph's ``features`` output (before the projection) depends only on the export and
the prompt, never on the patches applied, so it is keyed by (export id, prompt). Layout::

    $FORGETPACK_CACHE/runtime-text/<export id>/<key of the prompts>.safetensors

Each shard is a safetensors file (never pickle) with one float32 tensor ``features``
``[n, width]`` and, in its metadata, the export id, the ``n`` prompts as JSON and a sha256
checksum. A shard's name is its key (a hash of format version, export id and prompts) and the
checksum covers the name and the features, so a shard whose bytes do not belong to its name
(corrupt, edited, copied from another export) is a miss, logged as a warning and removed, and
its prompts are encoded again. Shards are written whole by the project's atomic writer
(``forgetpack.format.fileio``), so a reader sees a complete shard or none; several processes
may read and write the same folder, and a shard that vanishes (evicted by another process) is
only a miss.

Trust boundary: a checksum without a secret stops corruption and naive edits, not a forger who
can write the folder. So the folders the cache owns (``runtime-text`` and the export's folder)
must be folders only this user can change (``forgetpack.format.cache.folder_problem``): one
that is a link, owned by another user or writable by group or others turns the cache off for
the process, with one warning. The cache creates its folders 0700. The export's folder is held
open once checked, and shards are listed, opened, touched and removed relative to it, never
following a link; only regular files named like shards are read (a FIFO never blocks a reader).

The cache is bounded: past ``max_bytes`` over every export, the least recently used shards
go (a hit refreshes a shard's time), and past ``MAX_SHARDS`` in one folder the shards are
merged into one. Eviction walks the cache without following links and removes only regular
shard files inside it. A lookup costs one stat of the folder: the folder is listed again only
when it changed, and a file is opened once per change. ``FORGETPACK_CACHE=off`` turns the cache
off (``forgetpack.format.cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
import time
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from forgetpack.format.cache import cache_dir, folder_problem
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import RawTensor, save_safetensors
from runtime.cache_files import DIR_FLAGS, SHARD_NAME, evict, touch_shard, unlink_shard

KIND = "runtime-text"
VERSION = "2"  # 2: shards named by key and checksummed (version 1 shards are ignored, then evicted)
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~500,000 prompts of a 512-wide tower
MAX_SHARDS = 64  # merge one export's shards beyond this many files
MAX_HEADER = 100 << 20  # as the safetensors library's own bound
RACY_NS = 2 * 10**9  # a folder changed this recently may change again within its timestamp's tick
_FILE_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
log = logging.getLogger(__name__)
_refused: set[str] = set()  # folders already warned about in this process


class _BadShard(Exception):
    """A file named like a shard whose content does not belong to its name."""


def shard_name(export_id: str, prompts: Sequence[str]) -> str:
    """A shard's key, as its file name: the format version, the export and the prompts."""
    key = json.dumps([VERSION, export_id, list(prompts)], ensure_ascii=False)
    return hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors"


def checksum(name: str, data: bytes | memoryview) -> str:
    """What binds a shard's features to its key (its name): sha256 over both."""
    digest = hashlib.sha256(name.encode() + b"\0")
    digest.update(data)
    return digest.hexdigest()


def _folder_name(export_id: str) -> str:
    tail = export_id.split(":")[-1][:32]
    return tail if re.fullmatch(r"[0-9a-f]{32}", tail) else hashlib.sha256(export_id.encode()).hexdigest()[:32]


class TextFeatureCache:
    """One export's text features on disk; ``get`` what is there, ``put`` what was encoded."""

    def __init__(self, export_id: str, width: int, max_bytes: int = DEFAULT_MAX_BYTES,
                 root: str | os.PathLike[str] | None = None):
        base = Path(root) if root is not None else cache_dir(KIND)
        self.export_id = export_id
        self.width = int(width)
        self.max_bytes = int(max_bytes)
        self.folder = None if base is None else base / _folder_name(export_id)
        self._index: dict[str, str] = {}  # prompt -> shard file name
        self._seen: dict[str, tuple[int, int, int]] = {}  # shard name -> (inode, size, mtime) when looked at
        self._scanned: tuple[int, int] | None = None  # the folder's (inode, mtime) at the last complete listing
        self._fd: int | None = None  # the export's folder, open once checked; every read goes through it
        self._closer: weakref.finalize | None = None
        self._lock = threading.Lock()  # one backend serves many threads
        self.hits = 0
        if self.folder is not None:
            for folder in (self.folder.parent, self.folder):  # refuse an unsafe folder at once, not at first use
                if os.path.lexists(folder) and not self._trusted(folder):
                    break

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    # -- the folder ------------------------------------------------------------------

    def _trusted(self, folder: Path, st: os.stat_result | None = None) -> bool:
        """Whether ``folder`` may be used; if not, the cache is off for this process (one warning)."""
        problem = folder_problem(folder, st)
        if problem is None:
            return True
        if str(folder) not in _refused:
            _refused.add(str(folder))
            log.warning("text feature cache off: %s %s; it must be a folder only you can write "
                        "(chmod go-w, or set FORGETPACK_CACHE elsewhere)", folder, problem)
        self._disable()
        return False

    def _disable(self) -> None:
        self.folder = None
        self._close()
        self._index, self._seen = {}, {}

    def _close(self) -> None:
        if self._closer is not None:
            self._closer()
        self._fd, self._closer, self._scanned = None, None, None

    def _open(self, create: bool = False) -> int | None:
        """The export's folder, open and checked (created 0700 when ``create``), or None."""
        assert self.folder is not None
        try:
            st = os.lstat(self.folder)
        except FileNotFoundError:
            st = None
        if st is not None and self._fd is not None:
            held = os.fstat(self._fd)
            if (held.st_dev, held.st_ino) == (st.st_dev, st.st_ino):
                return self._fd
        self._close()  # none yet, or the folder was replaced: look at it again
        self._index, self._seen = {}, {}
        if st is None:
            if not create:
                return None
            self.folder.parent.parent.mkdir(parents=True, exist_ok=True)  # the cache root, as every cache makes it
            for folder in (self.folder.parent, self.folder):  # the folders this cache owns: 0700
                try:
                    folder.mkdir(mode=0o700)
                except FileExistsError:
                    pass
        if not self._trusted(self.folder.parent):
            return None
        try:
            fd = os.open(self.folder, DIR_FLAGS)
        except FileNotFoundError:
            return None
        except OSError:  # a link planted meanwhile (O_NOFOLLOW), or not a folder
            if self._trusted(self.folder):
                raise
            return None
        closer = weakref.finalize(self, os.close, fd)
        if not self._trusted(self.folder, os.fstat(fd)):
            closer()
            return None
        self._fd, self._closer = fd, closer
        return fd

    # -- reading ---------------------------------------------------------------------

    def get(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached features of those ``prompts`` that are on disk (a row per prompt, float32)."""
        if self.folder is None or not prompts:
            return {}
        with self._lock:
            return self._get(prompts)

    def _get(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        fd = self._refresh()
        if fd is None:
            return {}
        by_shard: dict[str, list[str]] = {}
        for prompt in dict.fromkeys(prompts):
            shard = self._index.get(prompt)
            if shard is not None:
                by_shard.setdefault(shard, []).append(prompt)
        found: dict[str, np.ndarray] = {}
        for shard, wanted in by_shard.items():
            rows = self._read(shard, wanted)
            if rows is None:  # vanished or refused: forget the shard, the prompts are misses
                self._forget(shard)
                continue
            found.update(rows)
            touch_shard(fd, shard)
        self.hits += len(found)
        return found

    def _forget(self, shard: str) -> None:
        self._index = {p: s for p, s in self._index.items() if s != shard}

    def _refresh(self) -> int | None:
        """Index the shards written since the last look (by this or another process): a stat of
        the folder when nothing changed; otherwise its names, and each new or changed shard opened once."""
        if self.folder is None:
            return None
        try:
            fd = self._open()
            if fd is None:
                return None
            held = os.fstat(fd)
            mark = (held.st_ino, held.st_mtime_ns)
            if mark == self._scanned:
                return fd
            with os.scandir(fd) as entries:
                names = sorted(e.name for e in entries if SHARD_NAME.fullmatch(e.name))
        except OSError:
            return None
        for name in names:
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except OSError:
                continue
            signature = (st.st_ino, st.st_size, st.st_mtime_ns)
            if self._seen.get(name) == signature:
                continue
            if name in self._seen:  # changed since indexed
                self._forget(name)
            self._seen[name] = signature
            if not stat.S_ISREG(st.st_mode):
                continue  # a FIFO, a link, a folder: never opened
            try:
                prompts = self._load(name, features=False)[0]
            except _BadShard as exc:
                self._discard(name, str(exc))
                continue
            except OSError:
                continue
            self._index.update(dict.fromkeys(prompts, name))
        # a listing taken within a timestamp tick of the folder's last change may have missed a later change
        self._scanned = mark if time.time_ns() - held.st_mtime_ns > RACY_NS else None
        return fd

    def _load(self, name: str, features: bool = True) -> tuple[list[str], np.ndarray | None]:
        """A shard's prompts (and features, checked against the checksum). Raises ``_BadShard``
        for content that does not belong to the name, ``OSError`` for a file gone or not regular."""
        assert self._fd is not None
        fd = os.open(name, _FILE_FLAGS, dir_fd=self._fd)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FileNotFoundError(f"{name}: not a regular file")
            head = f.read(8)
            if len(head) != 8:
                raise _BadShard("truncated")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, st.st_size - 8):
                raise _BadShard("header larger than the file")
            try:
                header = json.loads(f.read(length))
                meta = header.pop("__metadata__")
                info = header.pop("features")
                prompts = json.loads(meta["prompts"])
                shape, offsets = [int(v) for v in info["shape"]], [int(v) for v in info["data_offsets"]]
                dtype, want_sum = info["dtype"], meta["sha256"]
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise _BadShard(f"not a text feature shard ({type(exc).__name__})") from None
            if header or not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise _BadShard("not a text feature shard")
            if meta.get("export_id") != self.export_id or shard_name(self.export_id, prompts) != name:
                raise _BadShard("its prompts or export do not match its name")
            nbytes = len(prompts) * self.width * 4
            if dtype != "F32" or shape != [len(prompts), self.width] or offsets != [0, nbytes] \
                    or st.st_size != 8 + length + nbytes:
                raise _BadShard(f"features {dtype} {shape} are not float32 [{len(prompts)}, {self.width}]")
            if not features:
                return prompts, None
            data = f.read(nbytes)
        if len(data) != nbytes or checksum(name, data) != want_sum:
            raise _BadShard("checksum mismatch")
        return prompts, np.frombuffer(data, dtype="<f4").reshape(len(prompts), self.width)

    def _read(self, name: str, wanted: Sequence[str]) -> dict[str, np.ndarray] | None:
        try:
            prompts, feats = self._load(name)
        except _BadShard as exc:
            self._discard(name, str(exc))
            return None
        except OSError:  # vanished since indexed, or replaced by something that is not a file
            return None
        assert feats is not None
        row = {p: i for i, p in enumerate(prompts)}
        return {p: feats[row[p]].copy() for p in wanted if p in row}

    def _discard(self, name: str, why: str) -> None:
        """A shard whose content does not belong to its name: a warning, and it goes."""
        assert self.folder is not None and self._fd is not None
        log.warning("text feature cache: %s ignored and removed (%s); its prompts are encoded again",
                    self.folder / name, why)
        self._forget(name)
        unlink_shard(self._fd, name)

    # -- writing ---------------------------------------------------------------------

    def put(self, rows: dict[str, np.ndarray]) -> None:
        """Store newly encoded features as one shard; then keep the cache within its bounds.
        A cache that cannot be written is a logged warning, never an error for the caller."""
        if self.folder is None or not rows:
            return
        prompts = list(rows)
        with self._lock:
            self._put(prompts, rows)

    def _put(self, prompts: list[str], rows: dict[str, np.ndarray]) -> None:
        assert self.folder is not None
        try:
            fd = self._open(create=True)
            if fd is None:
                return
            name = self._write(prompts, np.stack([rows[p] for p in prompts]))
            self._compact()
            if self.folder is not None:
                evict(self.folder.parent, self.max_bytes, keep=self.folder / name)
        except (OSError, ForgetpackError) as exc:
            log.warning("text feature cache not written (%s)", exc)

    def _write(self, prompts: Sequence[str], feats: np.ndarray) -> str:
        """Write a shard aside and rename it into place; index it if it landed in the open folder."""
        assert self.folder is not None and self._fd is not None
        name = shard_name(self.export_id, prompts)
        tensor = RawTensor.from_array(np.ascontiguousarray(feats, dtype="<f4"))
        meta = {"export_id": self.export_id, "prompts": json.dumps(list(prompts), ensure_ascii=False),
                "sha256": checksum(name, tensor.data), "version": VERSION}
        save_safetensors(self.folder / name, {"features": tensor}, meta)
        try:
            st = os.stat(name, dir_fd=self._fd, follow_symlinks=False)
        except FileNotFoundError:  # the folder was replaced meanwhile: the next look reopens it
            return name
        self._seen[name] = (st.st_ino, st.st_size, st.st_mtime_ns)
        self._index.update(dict.fromkeys(prompts, name))
        return name

    def _compact(self) -> None:
        """Merge the shards into one when there are too many; a shard another process is
        writing meanwhile stays as it is (only shards merged are removed)."""
        fd = self._refresh()
        if fd is None or len(set(self._index.values())) <= MAX_SHARDS:
            return
        merged: dict[str, np.ndarray] = {}
        used: list[str] = []
        for shard in sorted(set(self._index.values())):
            rows = self._read(shard, [p for p, s in self._index.items() if s == shard])
            if rows is not None:
                merged.update(rows)
                used.append(shard)
        if not merged:
            return
        name = self._write(list(merged), np.stack(list(merged.values())))
        for shard in used:
            if shard != name:
                unlink_shard(fd, shard)
                self._seen.pop(shard, None)
        self._index = dict.fromkeys(merged, name)
