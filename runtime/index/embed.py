"""Embedding one shard: the work both engines do, with the same code, so they agree bit for bit.

Images are read, hashed, decoded and encoded a batch at a time, so memory stays bounded by one
batch of decoded images whatever the shard size. An image that cannot be read, decoded or
preprocessed is recorded as a failure with its reason and never stops the shard.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError, one_line
from runtime.index.sources import Item, content_hash
from runtime.index.store import ShardRows

DEFAULT_BATCH = 32
DEFAULT_SHARD = 1024


@dataclass(frozen=True)
class ModelSpec:
    """A picklable recipe for a runtime model, so that each Ray actor can load its own session."""

    source: str
    threads: int | None = None
    towers: tuple[str, ...] | None = ("image",)  # an export's towers to load: indexing never encodes text

    def __call__(self) -> Any:
        return load_towers(self.source, self.towers, self.threads)


def load_towers(source: str, towers: Sequence[str] | None, threads: int | None = None, **options: Any) -> Any:
    """``runtime.load`` with only ``towers`` of an export (None: all); a model spec loads the torch
    reference whole. The index's one rule for what its jobs load: indexing the image tower,
    rescoring and search the text tower."""
    import runtime

    if threads is not None:
        options["threads"] = threads
    if towers is not None and Path(source).is_dir():
        options["towers"] = tuple(towers)
    return runtime.load(source, **options)


ModelFactory = Callable[[], Any]


@dataclass(frozen=True)
class Shard:
    """A fixed run of items; ``key`` is a hash of their keys, stable across runs of the same source."""

    key: str
    ordinal: int
    items: tuple[Item, ...]


def plan_shards(items: Sequence[Item], size: int = DEFAULT_SHARD) -> list[Shard]:
    if type(size) is not int or size < 1:
        raise ForgetpackError(f"shard size must be a positive whole number, not {size!r}")
    shards = []
    for ordinal, start in enumerate(range(0, len(items), size)):
        chunk = tuple(items[start : start + size])
        digest = hashlib.sha256()
        for item in chunk:  # bytes items are named by position, so their content joins the key
            digest.update(item.key.encode() + b"\0" + (content_hash(item.data).encode() if item.data is not None else b"") + b"\n")
        shards.append(Shard(digest.hexdigest()[:32], ordinal, chunk))
    return shards


def embed_shard(model: Any, items: Sequence[Item], batch: int = DEFAULT_BATCH, skip: Collection[str] = ()) -> ShardRows:
    """Embeddings of the shard's readable images, once per content hash; ``skip`` holds hashes already stored."""
    from runtime.preprocess import load_image

    hashes: list[str] = []
    keys: list[str] = []
    chunks: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    duplicates = 0
    seen: set[str] = set()
    pending: list[tuple[str, str, Any]] = []

    def flush() -> None:
        kept, embeddings = _encode(model, pending, failures)
        hashes.extend(h for h, _, _ in kept)
        keys.extend(k for _, k, _ in kept)
        if len(embeddings):
            chunks.append(embeddings)
        pending.clear()

    for item in items:
        try:
            data = item.read()
        except (ForgetpackError, OSError) as exc:
            failures.append((item.key, _reason(exc)))
            continue
        digest = content_hash(data)
        if digest in seen or digest in skip:
            duplicates += 1
            continue
        try:
            image = load_image(data, model.max_pixels)
        except ForgetpackError as exc:
            failures.append((item.key, _reason(exc)))
            continue
        seen.add(digest)
        pending.append((digest, item.key, image))
        if len(pending) == batch:
            flush()
    flush()
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)
    return ShardRows(hashes, keys, embeddings, len(items), failures, duplicates)


def _encode(model: Any, pending: list[tuple[str, str, Any]], failures: list[tuple[str, str]]) -> tuple[list, np.ndarray]:
    """One batch through the image tower; if the batch fails, image by image, to name the culprit."""
    if not pending:
        return [], np.zeros((0, 0), np.float32)
    try:
        return list(pending), model.encode_image([image for _, _, image in pending])
    except ForgetpackError:
        pass
    kept, rows = [], []
    for entry in pending:
        try:
            rows.append(model.encode_image([entry[2]]))
            kept.append(entry)
        except ForgetpackError as exc:
            failures.append((entry[1], _reason(exc)))
    return kept, (np.concatenate(rows) if rows else np.zeros((0, 0), np.float32))


def _reason(exc: BaseException) -> str:
    text = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", one_line(exc, 300))  # PIL names the buffer
    return text.removeprefix("<bytes>: ")
