"""Text-to-image retrieval over the index, with forgetting applied to the query.

The query is embedded by the text tower under the patch set; the images never change. A table
with an ANN index (IVF-PQ, built by ``forgetpack index`` once the table is large) is searched
through it with a refining pass over exact vectors; a smaller one is scanned exactly. The
scores returned are always exact cosine similarities, recomputed from the stored embeddings.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_labels
from runtime.index.rescore import PatchInput, class_weights, open_session, patched
from runtime.index.store import IndexStore, embeddings_of, lance_errors
from runtime.index.verify import check_unit

NPROBES = 32
REFINE_FACTOR = 4


@dataclass
class Hit:
    path: str
    content_hash: str
    score: float  # cosine similarity of the image and the (patched) query


@dataclass
class SearchReport:
    index: str
    query: str
    patches: list[str]
    hits: list[Hit] = field(default_factory=list)
    ann: bool = False
    seconds: float = 0.0


def query_vector(model: Any, patches: Sequence[Any], query: str, templates: Sequence[str] | None = None) -> np.ndarray:
    """The unit query embedding under ``patches``: the text itself, or its template average when given."""
    if templates:
        return class_weights(model, patches, [query], templates)[:, 0]
    with patched(model, patches):
        return model.consistently(lambda: model.encode_text([query])[0])


def nearest(store: IndexStore, vector: np.ndarray, k: int) -> tuple[list[Hit], bool]:
    """The ``k`` stored images most similar to ``vector`` (through the ANN index when there is one)."""
    if type(k) is not int or k < 1:
        raise ForgetpackError(f"k must be a positive whole number, not {k!r}")
    ann = store.has_ann()
    with lance_errors(store.uri, "searching"):
        query = store.table.search(np.asarray(vector, np.float32), vector_column_name="embedding").metric("dot")
        if ann:
            query = query.nprobes(NPROBES).refine_factor(REFINE_FACTOR)
        found = query.select(["path", "content_hash", "embedding", "_distance"]).limit(k).to_arrow()
    paths, hashes = found.column("path").to_pylist(), found.column("content_hash").to_pylist()
    embeddings = embeddings_of(found, store.dim)
    check_unit(store.uri, embeddings, lambda i: paths[i])
    scores = embeddings @ np.asarray(vector, np.float32) if found.num_rows else np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    return [Hit(paths[i], hashes[i], float(scores[i])) for i in order], ann


def search(
    index: str | os.PathLike[str],
    query: str,
    k: int = 10,
    patches: Sequence[PatchInput] = (),
    *,
    model: Any = None,
    templates: Sequence[str] | None = None,
    trusted_keys: Sequence[Any] | None = None,
) -> SearchReport:
    """The ``k`` images of the index that best match ``query`` with ``patches`` applied."""
    started = time.perf_counter()
    (query,) = check_labels([query])
    store = IndexStore.open(index)
    session, loaded = open_session(store, model, patches, trusted_keys)
    hits, ann = nearest(store, query_vector(session, loaded, query, templates), k)
    return SearchReport(store.uri, query, [p.digest for p in loaded], hits, ann, time.perf_counter() - started)
