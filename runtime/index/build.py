"""Building an index: list the source, cut it into shards, embed the shards not yet committed, commit each.

The engine (local: this process's runtime session; ray: Ray Data actors) only embeds; this
module alone decides what is new, drops content already stored, and commits. A run killed at any
moment leaves only whole shards behind (see store.py), and the next run with ``resume=True``
embeds only the shards missing from the ledger.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import atomic_directory
from runtime.index.embed import DEFAULT_BATCH, DEFAULT_SHARD, ModelFactory, ModelSpec, Shard, embed_shard, plan_shards
from runtime.index.sources import list_items
from runtime.index.store import (
    ANN_MIN_ROWS,
    EMBEDDINGS,
    SHARDS,
    IndexStore,
    ShardRows,
    check_same_tower,
    model_identity,
    writer_lock,
)

log = logging.getLogger(__name__)
ENGINES = ("local", "ray")
ANN_TRAIN_ROWS = 256  # IVF-PQ needs this many rows to train its codebooks


@dataclass
class BuildProgress:
    """Fed to the progress callback after each committed shard."""

    shards_done: int
    shards_total: int
    items_done: int
    items_total: int
    added: int
    failed: int
    seconds: float


@dataclass
class BuildReport:
    index: str
    engine: str
    items: int
    shards_total: int
    shards_skipped: int  # committed by an earlier run: not recomputed
    shards_committed: int
    added: int
    duplicates: int
    failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    repaired: int = 0  # half-committed shards of a killed run, deleted and redone
    rows: int = 0
    ann_index: bool = False
    seconds: float = 0.0
    skipped: int = 0  # images in the shards an earlier run committed: not read again
    skipped_unreadable: int = 0  # of those, the ones that earlier run could not read (it listed them)

    @property
    def already_indexed(self) -> int:
        """Images found already in the index: those of shards an earlier run committed (less the ones
        it could not read) and, in the shards embedded now, those whose content was already stored."""
        return self.skipped - self.skipped_unreadable + self.duplicates

    @property
    def images_per_s(self) -> float:
        embedded = self.added + self.failed
        return embedded / self.seconds if self.seconds > 0 else 0.0


def build_index(
    source: str | os.PathLike[str],
    index: str | os.PathLike[str],
    model: str | ModelFactory,
    *,
    engine: str = "local",
    resume: bool = False,
    batch: int = DEFAULT_BATCH,
    shard_size: int = DEFAULT_SHARD,
    threads: int | None = None,
    column: str | None = None,
    ray_address: str | None = None,
    workers: int = 1,
    ann: bool | None = None,
    progress: Callable[[BuildProgress], None] | None = None,
    force: bool = False,
    lock_timeout: float = 0.0,
) -> BuildReport:
    """Embed the images of ``source`` into the index at ``index`` (created, or continued with ``resume``).

    ``model`` is an export directory / model spec, or a picklable callable returning a runtime
    ``Model``. ``ann``: build the ANN index (None: when the table reaches ``ANN_MIN_ROWS``).
    ``force``: build a new index beside a local one and swap it in when complete, so
    the old one stays usable until then (a killed run leaves it as it was).
    One build writes to a local index at a time (:func:`~runtime.index.store.writer_lock`): another
    fails at once (or after ``lock_timeout`` seconds) in one line."""
    with writer_lock(index, lock_timeout):
        return _build(source, index, model, engine=engine, resume=resume, batch=batch, shard_size=shard_size,
                      threads=threads, column=column, ray_address=ray_address, workers=workers, ann=ann,
                      progress=progress, force=force)


def _build(source: str | os.PathLike[str], index: str | os.PathLike[str], model: str | ModelFactory, *, engine: str,
           resume: bool, batch: int, shard_size: int, threads: int | None, column: str | None, ray_address: str | None,
           workers: int, ann: bool | None, progress: Callable[[BuildProgress], None] | None, force: bool) -> BuildReport:
    if force:
        if resume:
            raise ForgetpackError("give only one of resume (add to the index) and force (build it anew)")
        if "://" in str(index):
            raise ForgetpackError(f"{index}: an index in object storage cannot be replaced in one step; remove it first")
        with atomic_directory(index, replace=True) as fresh:  # private to this run: the lock on ``index`` covers it
            report = _build(source, fresh, model, engine=engine, resume=False, batch=batch, shard_size=shard_size,
                            threads=threads, column=column, ray_address=ray_address, workers=workers, ann=ann,
                            progress=progress, force=False)
        report.index = str(index)
        return report
    if engine not in ENGINES:
        raise ForgetpackError(f"unknown engine {engine!r} (choose {', '.join(ENGINES)})")
    if type(batch) is not int or batch < 1:
        raise ForgetpackError(f"batch must be a positive whole number, not {batch!r}")
    factory = ModelSpec(_model_source(model), threads) if isinstance(model, (str, os.PathLike)) else model
    started = time.perf_counter()
    shards = plan_shards(list_items(source, column), shard_size)
    # the driver of the Ray engine only records and checks the model: its manifest, no session
    session = replace(factory, towers=())() if engine == "ray" and isinstance(factory, ModelSpec) else factory()
    store, repaired = _open_store(str(index), session, str(getattr(factory, "source", model)), resume)
    done = store.done_shards()
    pending = [s for s in shards if s.key not in done]
    known = store.known_hashes()
    finished = [s for s in shards if s.key in done]
    report = BuildReport(str(index), engine, sum(len(s.items) for s in shards), len(shards),
                         len(finished), 0, 0, 0, 0, repaired=repaired,
                         skipped=sum(len(s.items) for s in finished),
                         skipped_unreadable=sum(int(done[s.key]["failed"] or 0) for s in finished))
    run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    items_done = report.skipped
    if engine == "local":
        results = _local(session, pending, batch, known)
    else:
        from runtime.index.ray_engine import embed_on_ray

        del session  # each actor loads its own
        results = embed_on_ray(factory, pending, batch, address=ray_address, workers=workers)
    for shard, rows, seconds in results:
        rows = _drop_known(rows, known)
        store.commit_shard(shard.key, shard.ordinal, rows, run, seconds)
        known.update(rows.hashes)
        report.shards_committed += 1
        report.added += len(rows.hashes)
        report.duplicates += rows.duplicates
        report.failed += len(rows.failures)
        report.failures += rows.failures
        items_done += len(shard.items)
        if progress is not None:
            progress(BuildProgress(report.shards_skipped + report.shards_committed, len(shards), items_done,
                                   report.items, report.added, report.failed, time.perf_counter() - started))
    if report.failures:  # listed in the report; one line here, however many there are
        key, reason = report.failures[0]
        log.warning("%d image(s) could not be read and were skipped (first: %s: %s)", len(report.failures), key, reason)
    report.rows = store.count()
    if ann or (ann is None and report.shards_committed and not store.has_ann()):
        report.ann_index = store.build_ann(min_rows=ANN_TRAIN_ROWS if ann else ANN_MIN_ROWS)
    report.seconds = time.perf_counter() - started
    return report


def _open_store(uri: str, model: Any, source: str, resume: bool) -> tuple[IndexStore, int]:
    """The existing index (with ``resume``, after checking it was made by the same image tower) or a new one."""
    remote = "://" in uri  # object storage: an index is there if it opens
    exists = (Path(uri) / f"{EMBEDDINGS}.lance").is_dir() if not remote else _opens(uri)
    if exists:
        if not resume:
            raise ForgetpackError(f"{uri}: an index is already there (pass --resume to continue it or add to it)")
        store = IndexStore.open(uri)
        check_same_tower(store.meta, model, uri, adding=True)
        return store, store.repair()
    leftover = {p.name for p in Path(uri).iterdir()} if not remote and Path(uri).is_dir() else set()
    if not remote and Path(uri).exists() and not leftover <= {SHARDS + ".lance"}:  # a run killed while creating: go on
        raise ForgetpackError(f"{uri}: exists and is not an index (choose a new folder)")
    identity = model_identity(model, source)
    store = IndexStore.create(uri, identity, _embed_dim(model))
    check_same_tower(store.meta, model, uri, adding=True)  # object storage: another writer may have made it meanwhile
    return store, 0


def _model_source(model: str | os.PathLike[str]) -> str:
    """What the index records to reload the model: an export directory as an absolute path, a spec as given."""
    return str(Path(model).resolve()) if Path(model).is_dir() else str(model)


def _opens(uri: str) -> bool:
    try:
        IndexStore.open(uri)
    except ForgetpackError:
        return False
    return True


def _embed_dim(model: Any) -> int:
    backend = model.backend
    manifest = getattr(backend, "manifest", None)
    if manifest is not None:
        return int(manifest.embed_dim)
    target = model_identity(model, "")["image_target"]
    if target is None:
        raise ForgetpackError(f"{backend.model_id}: cannot tell the image embedding width (no image projection)")
    info = backend.targets[target]
    return int(info.shape[1] if info.layout != "out_in" else info.shape[0])


def _local(model: Any, shards: list[Shard], batch: int, known: set[str]) -> Iterator[tuple[Shard, ShardRows, float]]:
    for shard in shards:
        start = time.perf_counter()
        rows = embed_shard(model, shard.items, batch, skip=known)
        yield shard, rows, time.perf_counter() - start


def _drop_known(rows: ShardRows, known: set[str]) -> ShardRows:
    """Rows whose content is already stored (an engine that embedded without knowing) are duplicates."""
    keep = [i for i, h in enumerate(rows.hashes) if h not in known]
    if len(keep) == len(rows.hashes):
        return rows
    embeddings = rows.embeddings[keep] if keep else np.zeros((0, 0), np.float32)
    return ShardRows([rows.hashes[i] for i in keep], [rows.paths[i] for i in keep], embeddings, rows.items,
                     rows.failures, rows.duplicates + len(rows.hashes) - len(keep))
