"""Zero-shot classification of every stored embedding under a patch set, without touching an image.

Forgetting changes only the text projection, so the image embeddings in the index hold under
any patch set: re-scoring is one ``[n, d] @ [d, labels]`` product per chunk of rows, streamed
from the store (memory bounded by ``chunk_rows``, whatever the collection's size). The
arithmetic is ``runtime.Model.classify``'s, so a rescored image gets the label ``classify``
gives it under the same patches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.format.fileio import atomic_output, check_output_file
from forgetpack.format.names import check_labels, check_templates
from forgetpack.format.patch import Patch, read_patch
from runtime.index.embed import load_towers
from runtime.index.store import IndexStore, check_patches_fit, check_same_tower, embeddings_of
from runtime.index.verify import check_unit

CHUNK_ROWS = 8192  # 8,192 x 512 float32 = 16 MiB per chunk for ViT-B-32; LanceDB's scan buffers grow with it

PatchInput = Patch | str | os.PathLike[str]


def open_session(store: IndexStore, model: Any = None, patches: Sequence[PatchInput] = (),
                 trusted_keys: Sequence[Any] | None = None, threads: int | None = None) -> tuple[Any, list[Patch]]:
    """The runtime model for the index (the one recorded in it unless ``model`` is given), after
    checking it has the index's image tower and that every patch was made for the index's base.

    An export directory is loaded with its text tower only: stored embeddings need no image tower,
    and ViT-B-32's image session is most of the model's memory."""
    if model is None or isinstance(model, (str, os.PathLike)):
        model = load_towers(str(model or store.meta["model"]), ("text",), threads, trusted_keys=trusted_keys)
    check_same_tower(store.meta, model, store.uri)
    loaded = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    check_patches_fit(store.meta, loaded, store.uri)
    return model, loaded


@contextmanager
def patched(model: Any, patches: Sequence[Patch]) -> Iterator[Any]:
    """``model`` with exactly ``patches`` hot-applied, and its own patches put back afterwards."""
    previous = list(model.patches)
    model.set_patches(list(patches))
    try:
        yield model
    finally:
        model.set_patches(previous)


def class_weights(model: Any, patches: Sequence[Patch], labels: Sequence[str], templates: Sequence[str] | None) -> np.ndarray:
    """``[d, n_labels]`` zero-shot weights with exactly ``patches`` applied to ``model``."""
    with patched(model, patches):
        return model.consistently(lambda: model.classifier(labels, templates))


def classify_embeddings(embeddings: np.ndarray, weights: np.ndarray, logit_scale: float,
                        work: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Labels and their softmax probability, as ``runtime.Model.classify`` computes them.

    ``work``: a float32 ``[rows >= n, labels]`` buffer to compute in, so a scan allocates nothing per chunk."""
    n = len(embeddings)
    logits = np.empty((n, weights.shape[1]), np.float32) if work is None else work[:n]
    np.matmul(embeddings, weights, out=logits)
    label = np.argmax(logits, axis=1)
    logits *= np.float32(logit_scale)
    logits -= logits.max(axis=1, keepdims=True)
    np.exp(logits, out=logits)
    score = logits[np.arange(n), label] / logits.sum(axis=1)
    return label, score


@dataclass
class RescoreReport:
    index: str
    rows: int
    labels: list[str]
    templates: list[str]
    patches: list[str]  # digests, in order
    counts: dict[str, int]  # images per label under the patches
    base_counts: dict[str, int] | None = None  # with compare: under no hot patch
    changed: int = 0  # with compare: images whose label changed
    moved: dict[str, dict[str, int]] = field(default_factory=dict)  # base label -> patched label -> images
    output: str | None = None
    seconds: float = 0.0


def rescore(
    index: str | os.PathLike[str],
    labels: Sequence[str],
    templates: Sequence[str] | None = None,
    patches: Sequence[PatchInput] = (),
    *,
    model: Any = None,
    out: str | os.PathLike[str] | None = None,
    compare: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    trusted_keys: Sequence[Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RescoreReport:
    """Classify every image of the index over ``labels`` with ``patches`` applied (and, with
    ``compare``, without them too); optionally write one row per image to ``out`` (Parquet)."""
    started = time.perf_counter()
    labels = check_labels(labels)
    templates = check_templates(templates)
    if out is not None:
        check_output_file(out, "rescore output")
    store = IndexStore.open(index)
    session, loaded = open_session(store, model, patches, trusted_keys)
    weights = np.ascontiguousarray(class_weights(session, loaded, labels, templates), np.float32)
    base = np.ascontiguousarray(class_weights(session, [], labels, templates), np.float32) if compare else None
    scale = float(session.backend.logit_scale)
    del session  # the weights are all the scan needs: a model loaded here is freed before the scan's buffers grow
    total, n = store.count(), len(labels)
    counts = np.zeros(n, np.int64)
    transitions = np.zeros((n, n), np.int64)
    work = np.empty((chunk_rows, n), np.float32)
    base_work = np.empty((chunk_rows, n), np.float32) if compare else None
    done = 0
    with _Output(out, compare) as output:
        columns_read = ["content_hash", "path", "embedding"] if out is not None else ["embedding"]
        for batch in store.batches(columns_read, chunk_rows):
            embeddings = embeddings_of(batch, store.dim)
            check_unit(store.uri, embeddings, lambda i, start=done: f"row {start + i:,}")
            label, score = classify_embeddings(embeddings, weights, scale, work)
            counts += np.bincount(label, minlength=n)
            columns: dict[str, Any] = {"label": label, "score": score}
            if base is not None:
                base_label, base_score = classify_embeddings(embeddings, base, scale, base_work)
                transitions += np.bincount(base_label * n + label, minlength=n * n).reshape(n, n)
                columns.update(base_label=base_label, base_score=base_score)
            output.write(batch, labels, columns)
            done += len(label)
            if progress is not None:
                progress(done, total)
    report = RescoreReport(store.uri, done, list(labels), list(templates), [p.digest for p in loaded],
                           dict(zip(labels, counts.tolist(), strict=True)), output=None if out is None else str(out))
    if base is not None:
        report.base_counts = dict(zip(labels, transitions.sum(axis=1).tolist(), strict=True))
        report.changed = int(transitions.sum() - np.trace(transitions))
        report.moved = {labels[i]: {labels[j]: int(transitions[i, j]) for j in range(n) if j != i and transitions[i, j]}
                        for i in range(n) if transitions[i].sum() - transitions[i, i]}
    report.seconds = time.perf_counter() - started
    return report


class _Output:
    """The optional Parquet output, written aside and renamed at the end (never half-written)."""

    def __init__(self, path: str | os.PathLike[str] | None, compare: bool):
        self.path, self.compare = path, compare
        self._file: Any = None
        self._writer: Any = None

    def __enter__(self) -> _Output:
        if self.path is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            fields = [("content_hash", pa.string()), ("path", pa.string()), ("label", pa.string()), ("score", pa.float32())]
            if self.compare:
                fields += [("base_label", pa.string()), ("base_score", pa.float32())]
            self._schema = pa.schema(fields)
            self._context = atomic_output(self.path)
            self._file = self._context.__enter__()
            self._writer = pq.ParquetWriter(self._file, self._schema)
        return self

    def write(self, batch: Any, labels: Sequence[str], columns: dict[str, np.ndarray]) -> None:
        if self._writer is None:
            return
        import pyarrow as pa

        names = pa.array(list(labels))
        data = {"content_hash": batch.column("content_hash"), "path": batch.column("path"),
                "label": names.take(pa.array(columns["label"])), "score": pa.array(columns["score"], pa.float32())}
        if self.compare:
            data["base_label"] = names.take(pa.array(columns["base_label"]))
            data["base_score"] = pa.array(columns["base_score"], pa.float32())
        self._writer.write_table(pa.table(data, schema=self._schema))

    def __exit__(self, *exc: Any) -> None:
        if self._writer is not None:
            self._writer.close()
            self._context.__exit__(*exc)
