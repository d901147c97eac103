"""The embedding store: a LanceDB database holding two tables.

``embeddings`` has one row per distinct image (``content_hash``, ``path``, ``shard``,
``embedding``: the L2-normalised image embedding, float32); its Arrow schema metadata records
which image tower made the embeddings (:func:`model_identity`). ``shards`` is the ledger: one
row per committed shard (how many images it held, added, found already indexed, could not
read, and which). A shard's embeddings are one LanceDB append (one atomic, versioned commit)
and its ledger row is written after it, so a shard is done exactly when its ledger row exists;
rows of a shard without one (a run killed between the two commits) are deleted on reopening.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import TargetInfo, check_fit, marks
from forgetpack.format.patch import Patch

FORMAT = "forgetpack.index"
VERSION = 1
METADATA_KEY = b"forgetpack.index"
EMBEDDINGS = "embeddings"
SHARDS = "shards"
ANN_MIN_ROWS = 100_000  # below this an exact scan is fast (and exact); above, an IVF-PQ index
ROWS_PER_PARTITION = 4096  # IVF partitions of about this many rows: 244 for a million


def model_identity(model: Any, source: str) -> dict[str, Any]:
    """What an index must record about the model that embedded it, from the model's own manifest.

    The image embeddings depend only on the image tower, named by the fingerprint of its
    projection as exported (``current``); the text projections' base fingerprints are what a
    patch must have been made for."""
    backend = model.backend
    targets: Mapping[str, TargetInfo] = backend.targets
    manifest = getattr(backend, "manifest", None)
    if manifest is not None:
        image_target = manifest.towers["image"].projection if "image" in manifest.towers else None
        image = manifest.projections[image_target].current if image_target else manifest.graph_id
        export_id = manifest.export_id
    else:  # a backend without an export manifest (the torch reference): its targets say it all
        image_target = next((t for t in targets if t.startswith("visual")), None)
        image = targets[image_target].base if image_target else f"model:{backend.model_id}"
        export_id = None
    return {
        "format": FORMAT, "version": VERSION, "model": source, "model_id": backend.model_id, "export_id": export_id,
        "image_target": image_target, "image_fingerprint": image,
        "text_targets": {name: {"shape": list(t.shape), "base": t.base, "layout": t.layout}
                         for name, t in targets.items() if name != image_target},
    }


def check_same_tower(meta: Mapping[str, Any], model: Any, where: str) -> None:
    """Refuse a model whose image tower is not the one that made the index (one line)."""
    found = model_identity(model, meta.get("model", ""))["image_fingerprint"]
    if found != meta["image_fingerprint"]:
        raise ForgetpackError(
            f"{where}: was embedded with another image tower ({meta['model_id']}, image projection "
            f"{str(meta['image_fingerprint'])[:23]}…) than {model.model_id} ({str(found)[:23]}…); re-index with this model")


def check_patches_fit(meta: Mapping[str, Any], patches: Sequence[Patch], where: str) -> None:
    """Refuse patches made for another base than the model the index was embedded with."""
    targets = {name: TargetInfo(tuple(t["shape"]), t["base"], t["layout"]) for name, t in meta["text_targets"].items()}
    done: list[str] = []
    for patch in patches:  # a stacked patch's parent is checked by the runtime, which holds the matrices
        state = dict(patch.parent) if patch.parent is not None else None
        check_fit(patch, targets, model=f"the model of index {where}", applied=done, state=state)
        done.extend(marks(patch))


@dataclass
class ShardRows:
    """What one shard adds: parallel lists plus the embeddings ``[n, d]``, and what could not be read."""

    hashes: list[str]
    paths: list[str]
    embeddings: np.ndarray
    items: int
    failures: list[tuple[str, str]]
    duplicates: int = 0


class IndexStore:
    """An open index: its two tables and its metadata."""

    def __init__(self, uri: str, db: Any, table: Any, ledger: Any):
        self.uri, self.db, self.table, self.ledger = uri, db, table, ledger
        raw = (table.schema.metadata or {}).get(METADATA_KEY)
        if raw is None:
            raise ForgetpackError(f"{uri}: is a LanceDB database but not a forgetpack index (no {METADATA_KEY.decode()} metadata)")
        self.meta: dict[str, Any] = json.loads(raw)
        self.dim = int(table.schema.field("embedding").type.list_size)

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str | os.PathLike[str]) -> IndexStore:
        import lancedb

        uri = str(uri)
        if "://" not in uri and not (Path(uri) / f"{EMBEDDINGS}.lance").is_dir():
            raise ForgetpackError(f"{uri}: not an index (no {EMBEDDINGS} table; make one with 'forgetpack index')")
        db = lancedb.connect(uri)
        try:
            return cls(uri, db, db.open_table(EMBEDDINGS), db.open_table(SHARDS))
        except (ValueError, FileNotFoundError, OSError) as exc:
            raise ForgetpackError(f"{uri}: cannot open the index ({' '.join(str(exc).split())[:200]})") from None

    @classmethod
    def create(cls, uri: str | os.PathLike[str], meta: Mapping[str, Any], dim: int) -> IndexStore:
        import lancedb

        uri = str(uri)
        db = lancedb.connect(uri)
        ledger = db.create_table(SHARDS, schema=_ledger_schema(), exist_ok=True)
        schema = _embedding_schema(dim).with_metadata({METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()})
        table = db.create_table(EMBEDDINGS, schema=schema)  # created last: its presence marks a usable index
        return cls(uri, db, table, ledger)

    # -- the ledger ----------------------------------------------------------------------

    def done_shards(self) -> dict[str, dict[str, Any]]:
        """Committed shards by key, with their ledger row."""
        rows = self.ledger.to_arrow().to_pylist()
        return {r["shard"]: r for r in rows}

    def failures(self) -> list[tuple[str, str]]:
        return [tuple(f) for r in self.ledger.to_arrow().to_pylist() for f in json.loads(r["failures"])]

    def repair(self) -> int:
        """Delete the rows of shards whose ledger row was never written (a run killed between the two commits)."""
        done = set(self.done_shards())
        present = set(self.table.search().select(["shard"]).limit(None).to_arrow().column("shard").unique().to_pylist())
        orphans = sorted(present - done)
        for key in orphans:
            self.table.delete(f"shard = '{_sql_literal(key)}'")
        return len(orphans)

    def known_hashes(self) -> set[str]:
        """Content hashes already stored (one column scan; see docs/index.md for collections beyond memory)."""
        column = self.table.search().select(["content_hash"]).limit(None).to_arrow().column("content_hash")
        return set(column.to_pylist())

    def commit_shard(self, key: str, ordinal: int, rows: ShardRows, run: str, seconds: float) -> None:
        """Append the shard's embeddings (one commit), then its ledger row (the commit that marks it done)."""
        import pyarrow as pa

        if rows.hashes:
            embeddings = np.ascontiguousarray(rows.embeddings, dtype=np.float32)
            flat = pa.array(embeddings.reshape(-1), type=pa.float32())
            self.table.add(pa.table({
                "content_hash": rows.hashes, "path": rows.paths, "shard": [key] * len(rows.hashes),
                "embedding": pa.FixedSizeListArray.from_arrays(flat, self.dim),
            }, schema=self.table.schema))
        self.ledger.add(pa.table({
            "shard": [key], "ordinal": [ordinal], "items": [rows.items], "added": [len(rows.hashes)],
            "duplicates": [rows.duplicates], "failed": [len(rows.failures)],
            "failures": [json.dumps([list(f) for f in rows.failures])], "run": [run], "seconds": [float(seconds)],
        }, schema=_ledger_schema()))

    # -- reading -------------------------------------------------------------------------

    def count(self) -> int:
        return int(self.table.count_rows())

    def batches(self, columns: Sequence[str], rows: int = 8192) -> Iterator[Any]:
        """The table in record batches of at most ``rows`` (bounded memory, whatever the table's size)."""
        bound_scan_readahead()
        yield from self.table.search().select(list(columns)).limit(None).to_batches(rows)

    def has_ann(self) -> bool:
        return any("embedding" in list(getattr(i, "columns", [])) for i in self.table.list_indices())

    def build_ann(self, min_rows: int = ANN_MIN_ROWS) -> bool:
        """An IVF-PQ index on the embeddings (dot product) once the table has ``min_rows``; True if built."""
        n = self.count()
        if n < min_rows:
            return False
        partitions = max(1, n // ROWS_PER_PARTITION)
        sub_vectors = next(s for s in (self.dim // 16, self.dim // 8, self.dim // 4, 1) if s >= 1 and self.dim % s == 0)
        self.table.create_index(metric="dot", vector_column_name="embedding", num_partitions=partitions,
                                num_sub_vectors=sub_vectors, index_type="IVF_PQ", replace=True)
        return True


def bound_scan_readahead() -> None:
    """Have LanceDB read one fragment ahead, not several: a full scan then holds about 300 MB less
    (measured at d = 512) for no loss of speed on local disk. Read when a scan starts; the
    environment wins if it sets ``LANCE_DEFAULT_FRAGMENT_READAHEAD`` (object storage may want more)."""
    os.environ.setdefault("LANCE_DEFAULT_FRAGMENT_READAHEAD", "1")


def embeddings_of(batch: Any, dim: int) -> np.ndarray:
    """The ``embedding`` column of a record batch as a float32 ``[n, d]`` array (no copy where Arrow allows)."""
    column = batch.column("embedding")
    if hasattr(column, "combine_chunks"):  # a Table's ChunkedArray
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)  # flatten, unlike .values, honours a slice


def _embedding_schema(dim: int):  # -> pyarrow.Schema
    import pyarrow as pa

    return pa.schema([
        pa.field("content_hash", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("embedding", pa.list_(pa.float32(), dim), nullable=False),
    ])


def _ledger_schema():  # -> pyarrow.Schema
    import pyarrow as pa

    return pa.schema([
        pa.field("shard", pa.string()), pa.field("ordinal", pa.int64()), pa.field("items", pa.int64()),
        pa.field("added", pa.int64()), pa.field("duplicates", pa.int64()), pa.field("failed", pa.int64()),
        pa.field("failures", pa.string()), pa.field("run", pa.string()), pa.field("seconds", pa.float64()),
    ])


def _sql_literal(text: str) -> str:
    return text.replace("'", "''")
