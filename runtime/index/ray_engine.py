"""The Ray Data engine: the same shard embedding as the local engine, spread over Ray actors.

One dataset row per shard; ``map_batches`` hands each row to an actor (:class:`ShardEmbedder`)
that loaded its own runtime session once, and which runs :func:`runtime.index.embed.embed_shard`,
the very function the local engine runs, so both engines give identical embeddings. Results
stream back to the driver as shards finish (in any order) and are committed there, one shard
at a time: the store is written by the driver only. Works on a local Ray instance or on a
cluster (``address``); on a cluster the workers need forgetpack installed and the image paths
readable (shared or object storage), or the images as bytes in a Parquet source.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from runtime.index.embed import ModelFactory, Shard, embed_shard
from runtime.index.sources import Item
from runtime.index.store import ShardRows


class ShardEmbedder:
    """A Ray Data actor: one runtime session, loaded once, embedding one shard per call."""

    def __init__(self, factory: ModelFactory, batch: int):
        self.model = factory()
        self.batch = batch

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, list[Any]] = {"ordinal": [], "rows": [], "embeddings": [], "seconds": []}
        for ordinal, keys, blobs in zip(rows["ordinal"], rows["keys"], rows["blobs"], strict=True):
            items = [Item(str(k), bytes(b) if b is not None and len(b) else None) for k, b in zip(keys, blobs, strict=True)]
            start = time.perf_counter()
            result = embed_shard(self.model, items, self.batch)
            out["ordinal"].append(int(ordinal))
            out["rows"].append(json.dumps({"hashes": result.hashes, "paths": result.paths, "items": result.items,
                                           "failures": result.failures, "duplicates": result.duplicates}))
            out["embeddings"].append(np.ascontiguousarray(result.embeddings, dtype=np.float32).tobytes())
            out["seconds"].append(time.perf_counter() - start)
        return {"ordinal": np.asarray(out["ordinal"], np.int64), "rows": np.asarray(out["rows"], dtype=object),
                "embeddings": np.asarray(out["embeddings"], dtype=object), "seconds": np.asarray(out["seconds"])}


def embed_on_ray(
    factory: ModelFactory, shards: list[Shard], batch: int, *, address: str | None = None, workers: int = 1,
    cpus_per_worker: float = 1.0,
) -> Iterator[tuple[Shard, ShardRows, float]]:
    """Embed ``shards`` with ``workers`` actors; yields each shard's rows as it finishes.

    Uses the Ray instance already initialised in this process, else starts or joins one
    (``address``: a cluster, ``None``: a local instance, shut down again at the end)."""
    if not shards:
        return
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        by_ordinal = {s.ordinal: s for s in shards}
        dataset = ray.data.from_items([
            {"ordinal": s.ordinal, "keys": [i.key for i in s.items], "blobs": [i.data or b"" for i in s.items]}
            for s in shards
        ], override_num_blocks=len(shards))
        embedded = dataset.map_batches(ShardEmbedder, fn_constructor_kwargs={"factory": factory, "batch": batch},
                                       compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1,
                                       num_cpus=cpus_per_worker, batch_format="numpy")
        for row in embedded.iter_rows():
            rows = json.loads(row["rows"])
            embeddings = np.frombuffer(row["embeddings"], dtype=np.float32)
            width = embeddings.size // max(1, len(rows["hashes"]))
            result = ShardRows(rows["hashes"], rows["paths"], embeddings.reshape(len(rows["hashes"]), width),
                               rows["items"], [tuple(f) for f in rows["failures"]], rows["duplicates"])
            yield by_ordinal[int(row["ordinal"])], result, float(row["seconds"])
    finally:
        if started_here:
            ray.shutdown()
