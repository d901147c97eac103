"""The embedding store: a LanceDB database holding two tables.

``embeddings`` has one row per distinct image (``content_hash``, ``path``, ``shard``,
``embedding``: the L2-normalised image embedding, float32); its Arrow schema metadata records
which image tower made the embeddings (:func:`model_identity`). ``shards`` is the ledger: one
row per committed shard (how many images it held, added, found already indexed, could not
read, and which). A shard's embeddings are one LanceDB append (one atomic, versioned commit)
and its ledger row is written after it, so a shard is done exactly when its ledger row exists;
rows of a shard without one (a run killed between the two commits) are deleted on reopening.
The ledger row also holds the shard's ``digest`` (:func:`rows_digest` of its rows), which
``runtime.index.verify`` checks. Whatever Lance raises on a damaged file becomes one line naming the
index (:func:`lance_errors`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError, one_line
from forgetpack.format.fit import TargetInfo, check_fit, marks
from forgetpack.format.patch import Patch

FORMAT = "forgetpack.index"
VERSION = 1
METADATA_KEY = b"forgetpack.index"
EMBEDDINGS = "embeddings"
SHARDS = "shards"
ANN_MIN_ROWS = 100_000  # below this an exact scan is fast (and exact); above, an IVF-PQ index
ROWS_PER_PARTITION = 4096  # IVF partitions of about this many rows: 244 for a million
NORM_TOLERANCE = 1e-3  # stored embeddings are unit vectors (float32 rounding: about 1e-7 off)
VERIFY_HINT = "check it with 'forgetpack index --verify'; re-index if it is damaged"


def model_identity(model: Any, source: str) -> dict[str, Any]:
    """What an index must record about the model that embedded it, from the model's own manifest.

    The image embeddings depend only on the image tower, named by the fingerprint of its
    projection as exported (``current``); the text projections' base fingerprints are what a
    patch must have been made for.
    ``image_tower`` names everything else an image embedding depends on: the export's precision
    (an int8 export of the same model gives other embeddings), opset, preprocessing and image
    graph's interface; adding to an index requires it equal (:func:`check_same_tower`)."""
    backend = model.backend
    targets: Mapping[str, TargetInfo] = backend.targets
    manifest = getattr(backend, "manifest", None)
    if manifest is not None:
        image_target = manifest.towers["image"].projection if "image" in manifest.towers else None
        image = manifest.projections[image_target].current if image_target else manifest.graph_id
        export_id = manifest.export_id
        tower = manifest.towers.get("image")
        precision = manifest.precision
        recipe = {"precision": precision, "opset": manifest.opset, "preprocess": manifest.preprocess,
                  "graph": [tower.input, list(tower.input_shape), tower.input_dtype, tower.embeddings] if tower else None}
    else:  # a backend without an export manifest (the torch reference): its targets say it all
        image_target = next((t for t in targets if t.startswith("visual")), None)
        image = targets[image_target].base if image_target else f"model:{backend.model_id}"
        export_id = None
        precision = getattr(backend, "precision", "fp32")
        recipe = {"precision": precision, "backend": getattr(backend, "name", None)}
    recipe.update(model_id=backend.model_id, image_fingerprint=image)
    return {
        "format": FORMAT, "version": VERSION, "model": source, "model_id": backend.model_id, "export_id": export_id,
        "image_target": image_target, "image_fingerprint": image, "image_precision": precision,
        "image_tower": "sha256:" + hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest(),
        "text_targets": {name: {"shape": list(t.shape), "base": t.base, "layout": t.layout}
                         for name, t in targets.items() if name != image_target},
    }


def check_same_tower(meta: Mapping[str, Any], model: Any, where: str, *, adding: bool = False) -> None:
    """Refuse a model whose image tower is not the one that made the index (one line).

    Reading (rescore, search) needs the same image projection: the stored vectors are compared
    with this model's text side. Adding (``adding``: a resumed build) needs the whole image tower
    to be the same (``image_tower``: precision, opset, preprocessing too), or the index would mix
    embeddings of two towers. An index made before ``image_tower`` was recorded is checked on
    what it records."""
    identity = model_identity(model, meta.get("model", ""))
    found = identity["image_fingerprint"]
    if found != meta["image_fingerprint"]:
        raise ForgetpackError(
            f"{where}: was embedded with another image tower ({meta['model_id']}, image projection "
            f"{str(meta['image_fingerprint'])[:23]}…) than {model.model_id} ({str(found)[:23]}…); re-index with this model")
    if adding and "image_tower" in meta and identity["image_tower"] != meta["image_tower"]:
        raise ForgetpackError(
            f"{where}: was embedded by another export of the image tower ({meta['model_id']} "
            f"{meta.get('image_precision')}, {str(meta['image_tower'])[:23]}…) than {model.model_id} "
            f"{identity['image_precision']} ({identity['image_tower'][:23]}…); its embeddings would differ: "
            f"add with the index's own export, or index into a new one")


def check_patches_fit(meta: Mapping[str, Any], patches: Sequence[Patch], where: str) -> None:
    """Refuse patches made for another base than the model the index was embedded with."""
    targets = {name: TargetInfo(tuple(t["shape"]), t["base"], t["layout"]) for name, t in meta["text_targets"].items()}
    done: list[str] = []
    for patch in patches:  # a stacked patch's parent is checked by the runtime, which holds the matrices
        state = dict(patch.parent) if patch.parent is not None else None
        check_fit(patch, targets, model=f"the model of index {where}", applied=done, state=state)
        done.extend(marks(patch))


@contextlib.contextmanager
def lance_errors(uri: str, doing: str = "reading") -> Iterator[None]:
    """The index's one rule for a failure inside Lance (a truncated, missing or garbled file):
    one line naming the index and what Lance said, never its traceback."""
    import pyarrow as pa

    try:
        yield
    except ForgetpackError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError, IndexError, pa.ArrowException) as exc:
        said = re.sub(r",? ?/\S*\.rs:\d+:\d+|lance error: |LanceError\(\w+\): ", "", one_line(exc, 1000))  # Rust source lines
        if doing in ("writing", "creating"):  # a full disk or a read-only folder as much as damage
            raise ForgetpackError(f"{uri}: could not write the index ({doing}: {said[:200]})") from None
        raise ForgetpackError(f"{uri}: the index is damaged or unreadable ({doing}: {said[:200]}); {VERIFY_HINT}") from None


def _lance(doing: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def wrap(method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def call(self: IndexStore, *args: Any, **kwargs: Any) -> Any:
            with lance_errors(self.uri, doing):
                return method(self, *args, **kwargs)
        return call
    return wrap


def rows_digest(hashes: Sequence[str], paths: Sequence[str], embeddings: np.ndarray) -> int:
    """The sum (mod 2**256) of each row's sha256 over its content hash, path and float32 embedding:
    independent of row order, so a shard's digest is checked in one streaming pass."""
    return sum(row_digests(hashes, paths, embeddings)) % (1 << 256)


def row_digests(hashes: Sequence[str], paths: Sequence[str], embeddings: np.ndarray) -> Iterator[int]:
    embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
    for content, path, row in zip(hashes, paths, embeddings, strict=True):
        yield int.from_bytes(hashlib.sha256(f"{content}\0{path}\0".encode() + row.tobytes()).digest(), "big")


def hex_digest(digest: int) -> str:
    return f"{digest:064x}"


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
        with lance_errors(uri, "opening"):
            raw = (table.schema.metadata or {}).get(METADATA_KEY)
            if raw is None:
                raise ForgetpackError(f"{uri}: is a LanceDB database but not a forgetpack index (no {METADATA_KEY.decode()} metadata)")
            try:
                self.meta: dict[str, Any] = json.loads(raw)
                self.dim = int(table.schema.field("embedding").type.list_size)
            except (ValueError, KeyError, AttributeError) as exc:
                raise ForgetpackError(f"{uri}: the index's metadata is damaged ({one_line(exc, 120)}); {VERIFY_HINT}") from None

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, uri: str | os.PathLike[str]) -> IndexStore:
        import lancedb

        uri = str(uri)
        if "://" not in uri and not (Path(uri) / f"{EMBEDDINGS}.lance").is_dir():
            raise ForgetpackError(f"{uri}: not an index (no {EMBEDDINGS} table; make one with 'forgetpack index')")
        with lance_errors(uri, "opening"):
            db = lancedb.connect(uri)
            try:
                tables = db.open_table(EMBEDDINGS), db.open_table(SHARDS)
            except (ValueError, FileNotFoundError) as exc:
                if "not found" not in str(exc).lower() and "does not exist" not in str(exc).lower():
                    raise
                raise ForgetpackError(f"{uri}: cannot open the index ({one_line(exc, 200)})") from None
            store = cls(uri, db, *tables)
            store.check_rows()
        return store

    def check_rows(self) -> None:
        """The check every open makes, cheap at any size: both tables' manifests read, and the
        table holds at least the rows the ledger says were committed (Lance's row counts come
        from its manifests; the ledger is one row per shard). More rows are a killed run's half
        commit (repaired by the next build); fewer are lost data."""
        with lance_errors(self.uri, "opening"):
            rows = self.table.count_rows()
            added = self.ledger.search().select(["added"]).limit(None).to_arrow().column("added").to_pylist()
        committed = sum(int(a or 0) for a in added)
        if rows < committed:
            raise ForgetpackError(f"{self.uri}: the index is damaged: {rows:,} embeddings stored, "
                                  f"{committed:,} committed by its ledger; {VERIFY_HINT}")

    @classmethod
    def create(cls, uri: str | os.PathLike[str], meta: Mapping[str, Any], dim: int) -> IndexStore:
        import lancedb

        uri = str(uri)
        db = lancedb.connect(uri)
        with lance_errors(uri, "creating"):
            db = lancedb.connect(uri)
            ledger = db.create_table(SHARDS, schema=_ledger_schema(), exist_ok=True)
            schema = _embedding_schema(dim).with_metadata({METADATA_KEY: json.dumps(dict(meta), sort_keys=True).encode()})
            # created last: its presence marks a usable index; one made meanwhile (object storage,
            # where no lock is taken) is opened, and the caller checks it was made by the same tower
            table = db.create_table(EMBEDDINGS, schema=schema, exist_ok=True)
        return cls(uri, db, table, ledger)

    # -- the ledger ----------------------------------------------------------------------

    @_lance("reading the ledger")
    def done_shards(self) -> dict[str, dict[str, Any]]:
        """Committed shards by key, with their ledger row."""
        rows = self.ledger.to_arrow().to_pylist()
        return {r["shard"]: r for r in rows}

    @_lance("reading the ledger")
    def failures(self) -> list[tuple[str, str]]:
        return [tuple(f) for r in self.ledger.to_arrow().to_pylist() for f in json.loads(r["failures"])]

    @_lance("repairing")
    def repair(self) -> int:
        """Delete the rows of shards whose ledger row was never written (a run killed between the two commits)."""
        done = set(self.done_shards())
        present = set(self.table.search().select(["shard"]).limit(None).to_arrow().column("shard").unique().to_pylist())
        orphans = sorted(present - done)
        for key in orphans:
            self.table.delete(f"shard = '{_sql_literal(key)}'")
        return len(orphans)

    @_lance("reading")
    def known_hashes(self) -> set[str]:
        """Content hashes already stored (one column scan; see docs/index.md for collections beyond memory)."""
        column = self.table.search().select(["content_hash"]).limit(None).to_arrow().column("content_hash")
        return set(column.to_pylist())

    @_lance("writing")
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
        digest = rows_digest(rows.hashes, rows.paths, rows.embeddings) if rows.hashes else 0
        entry = pa.table({
            "shard": [key], "ordinal": [ordinal], "items": [rows.items], "added": [len(rows.hashes)],
            "duplicates": [rows.duplicates], "failed": [len(rows.failures)],
            "failures": [json.dumps([list(f) for f in rows.failures])], "run": [run], "seconds": [float(seconds)],
            "digest": [hex_digest(digest)],
        }, schema=_ledger_schema())
        self.ledger.add(entry.select([n for n in entry.column_names if n in self.ledger.schema.names]))  # older ledgers: no digest

    # -- reading -------------------------------------------------------------------------

    @_lance("reading")
    def count(self) -> int:
        return int(self.table.count_rows())

    def batches(self, columns: Sequence[str], rows: int = 8192) -> Iterator[Any]:
        """The table in record batches of at most ``rows`` (bounded memory, whatever the table's size)."""
        bound_scan_readahead()
        with lance_errors(self.uri):
            yield from self.table.search().select(list(columns)).limit(None).to_batches(rows)

    @_lance("reading")
    def has_ann(self) -> bool:
        return any("embedding" in list(getattr(i, "columns", [])) for i in self.table.list_indices())

    @_lance("building the ANN index")
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


def lock_path(uri: str | os.PathLike[str]) -> Path:
    """The lock file of a local index: beside its folder (so it outlives ``force``'s swap of the folder)."""
    path = Path(uri).resolve()
    return path.parent / f".{path.name}.forgetpack-lock"


@contextlib.contextmanager
def writer_lock(uri: str | os.PathLike[str], timeout: float = 0.0) -> Iterator[None]:
    """One writer at a time on a local index: an inter-process lock (filelock: flock on POSIX,
    released by the OS if the holder dies). A second writer waits ``timeout`` seconds (0: not
    at all), then fails in one line naming the index. Object storage takes no lock."""
    if "://" in str(uri):
        yield
        return
    from filelock import FileLock, Timeout

    path = lock_path(uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path), timeout=timeout)
    try:
        lock.acquire()
    except Timeout:
        raise ForgetpackError(f"{uri}: another build is writing to this index (it holds {path.name}); "
                              "let it finish, then add to it with --resume") from None
    try:
        yield
    finally:
        lock.release()


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
        pa.field("digest", pa.string()),  # rows_digest of the shard's rows (absent from indexes made before it)
    ])


def _sql_literal(text: str) -> str:
    return text.replace("'", "''")
