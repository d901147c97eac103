"""Text features on disk, so that a restarted service or a second ``classify`` re-encodes nothing.

The text graph's ``features`` output (before the projection) depends only on the export and
the prompt, never on the patches applied, so it is keyed by (export id, prompt). Layout::

    $FORGETPACK_CACHE/runtime-text/<export id>/<hash of the prompts>.safetensors

Each shard is a safetensors file (never pickle) with one float32 tensor ``features``
``[n, width]`` and, in its metadata, the export id and the ``n`` prompts as JSON. Shards are
written whole by the project's atomic writer (``forgetpack.format.fileio``), so a reader sees
a complete shard or none; several processes may read and write the same folder, and a shard
that vanishes (evicted by another process) or cannot be parsed is only a cache miss.

The cache is bounded: past ``max_bytes`` over every export, the least recently used shards
go (a hit refreshes a shard's time), and past ``MAX_SHARDS`` in one folder the shards are
merged into one. ``FORGETPACK_CACHE=off`` turns it off (``forgetpack.format.cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from forgetpack.format.cache import cache_dir
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import RawTensor, save_safetensors

KIND = "runtime-text"
VERSION = "1"
DEFAULT_MAX_BYTES = 1 << 30  # 1 GiB: ~500,000 prompts of a 512-wide tower
MAX_SHARDS = 64  # merge one export's shards beyond this many files
log = logging.getLogger(__name__)


class TextFeatureCache:
    """One export's text features on disk; ``get`` what is there, ``put`` what was encoded."""

    def __init__(self, export_id: str, width: int, max_bytes: int = DEFAULT_MAX_BYTES,
                 root: str | os.PathLike[str] | None = None):
        base = Path(root) if root is not None else cache_dir(KIND)
        self.export_id = export_id
        self.width = int(width)
        self.max_bytes = int(max_bytes)
        self.folder = None if base is None else base / export_id.split(":")[-1][:32]
        self._index: dict[str, str] = {}  # prompt -> shard file name
        self._seen: set[str] = set()  # shard names already indexed
        self._lock = threading.Lock()  # one backend serves many threads
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.folder is not None

    # -- reading ---------------------------------------------------------------------

    def get(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        """The cached features of those ``prompts`` that are on disk (a row per prompt, float32)."""
        if self.folder is None or not prompts:
            return {}
        with self._lock:
            return self._get(prompts)

    def _get(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        assert self.folder is not None
        self._refresh()
        by_shard: dict[str, list[str]] = {}
        for prompt in dict.fromkeys(prompts):
            shard = self._index.get(prompt)
            if shard is not None:
                by_shard.setdefault(shard, []).append(prompt)
        found: dict[str, np.ndarray] = {}
        for shard, wanted in by_shard.items():
            rows = self._read(shard, wanted)
            if rows is None:  # vanished or unreadable: forget the shard, the prompts are misses
                self._index = {p: s for p, s in self._index.items() if s != shard}
                continue
            found.update(rows)
            _touch(self.folder / shard)
        self.hits += len(found)
        return found

    def _refresh(self) -> None:
        """Index the shards written since the last look (by this or another process)."""
        assert self.folder is not None
        try:
            names = sorted(p.name for p in self.folder.glob("*.safetensors"))
        except OSError:
            return
        for name in names:
            if name in self._seen:
                continue
            prompts = self._prompts(name)
            if prompts is not None:
                self._seen.add(name)
                self._index.update(dict.fromkeys(prompts, name))

    def _prompts(self, name: str) -> list[str] | None:
        from safetensors import safe_open

        assert self.folder is not None
        try:
            with safe_open(str(self.folder / name), framework="numpy") as f:
                meta = f.metadata() or {}
            if meta.get("export_id") != self.export_id or meta.get("version") != VERSION:
                return None
            prompts = json.loads(meta["prompts"])
            return prompts if isinstance(prompts, list) and all(isinstance(p, str) for p in prompts) else None
        except Exception:  # torn, foreign or vanished: not ours to use
            return None

    def _read(self, name: str, wanted: Sequence[str]) -> dict[str, np.ndarray] | None:
        from safetensors import safe_open

        assert self.folder is not None
        try:
            with safe_open(str(self.folder / name), framework="numpy") as f:
                prompts = json.loads((f.metadata() or {})["prompts"])
                feats = f.get_tensor("features")
        except Exception:  # vanished since indexed, or replaced by something unreadable
            return None
        if feats.dtype != np.float32 or feats.shape != (len(prompts), self.width):
            return None
        row = {p: i for i, p in enumerate(prompts)}
        return {p: feats[row[p]] for p in wanted if p in row}

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
            self.folder.mkdir(parents=True, exist_ok=True)
            name = self._write(prompts, np.stack([rows[p] for p in prompts]))
            self._seen.add(name)
            self._index.update(dict.fromkeys(prompts, name))
            self._compact()
            evict(self.folder.parent, self.max_bytes, keep=self.folder / name)
        except (OSError, ForgetpackError) as exc:
            log.warning("text feature cache not written (%s)", exc)

    def _write(self, prompts: Sequence[str], feats: np.ndarray) -> str:
        assert self.folder is not None
        name = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:24] + ".safetensors"
        meta = {"export_id": self.export_id, "prompts": json.dumps(list(prompts), ensure_ascii=False), "version": VERSION}
        save_safetensors(self.folder / name, {"features": RawTensor.from_array(np.asarray(feats, dtype=np.float32))}, meta)
        return name

    def _compact(self) -> None:
        """Merge the shards into one when there are too many; a shard another process is
        writing meanwhile stays as it is (only shards merged are removed)."""
        assert self.folder is not None
        shards = sorted(self.folder.glob("*.safetensors"))
        if len(shards) <= MAX_SHARDS:
            return
        self._refresh()
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
                (self.folder / shard).unlink(missing_ok=True)
        self._seen.add(name)
        self._index = dict.fromkeys(merged, name)


def evict(root: Path, max_bytes: int, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used shards under ``root`` (every export) until they fit ``max_bytes``."""
    entries = []
    for path in _shards(root.glob("*/*.safetensors")):
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed by another process meanwhile
            continue
        entries.append((stat.st_mtime_ns, stat.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, path in sorted(entries, key=lambda e: (e[0], str(e[2]))):
        if total <= max_bytes:
            break
        if path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
    return removed


def _shards(paths: Iterable[Path]) -> list[Path]:
    return [p for p in paths if not p.name.startswith(".")]


def _touch(path: Path) -> None:
    """Mark a shard as used now (eviction goes by modification time)."""
    try:
        os.utime(path)
    except OSError:  # vanished or read-only: eviction order is a hint, not a guarantee
        pass
