"""Checking an index for damage: every row a unit vector, no content twice, each shard's rows
matching the count and digest its ledger row recorded (``forgetpack index --verify``). What is
cheap enough runs on every read instead (:func:`check_unit` on the rows a reader uses); docs/index.md
has the split."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from forgetpack.format.errors import ForgetpackError
from runtime.index.store import NORM_TOLERANCE, VERIFY_HINT, IndexStore, embeddings_of, hex_digest, row_digests


@dataclass
class VerifyReport:
    """What :func:`verify_index` found; ``damaged`` when anything but ``uncommitted`` is nonzero."""

    index: str
    rows: int = 0
    shards: int = 0
    not_unit: int = 0  # embeddings that are not unit vectors (all-zero, scaled, NaN or infinite)
    duplicates: int = 0  # rows whose content is stored more than once
    digest_mismatch: int = 0  # shards whose rows do not give the digest their ledger recorded
    missing_rows: int = 0  # shards with fewer rows than their ledger says were added
    uncommitted: int = 0  # rows of shards without a ledger row: a killed run's, repaired by the next build
    digests: bool = True  # False: an index made before digests were recorded (norms only)
    examples: list[str] = field(default_factory=list)  # the first few damaged rows or shards, named

    @property
    def damaged(self) -> bool:
        return bool(self.not_unit or self.duplicates or self.digest_mismatch or self.missing_rows)

    def summary(self) -> str:
        parts = [f"{n:,} {what}" for n, what in (
            (self.not_unit, "embedding(s) not unit vectors"), (self.duplicates, "duplicate row(s)"),
            (self.digest_mismatch, "shard(s) whose rows differ from their recorded digest"),
            (self.missing_rows, "shard(s) with rows missing")) if n]
        return ", ".join(parts) + (f" (first: {self.examples[0]})" if self.examples else "")


def not_unit(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The one rule for a damaged embedding: not a finite unit vector (within ``NORM_TOLERANCE``).
    Returns the mask of such rows and every row's norm."""
    with np.errstate(invalid="ignore", over="ignore"):
        norms = np.sqrt(np.einsum("ij,ij->i", embeddings, embeddings, dtype=np.float64))
    return ~(np.abs(norms - 1.0) <= NORM_TOLERANCE), norms


def check_unit(uri: str, embeddings: np.ndarray, names: Callable[[int], str]) -> None:
    """Refuse to serve rows that are not unit vectors (what a reader checks on the rows it reads:
    one pass over data it holds already). ``names(i)``: how to name row ``i`` in the error."""
    bad, norms = not_unit(embeddings)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ForgetpackError(f"{uri}: the index is damaged: {int(bad.sum())} stored embedding(s) are not unit vectors "
                              f"(first: {names(first)}, norm {norms[first]:.4g}); {VERIFY_HINT}")


def verify_index(uri: str | os.PathLike[str], chunk_rows: int = 8192) -> VerifyReport:
    """Read every row and check it: unit-length, finite embeddings, no content stored twice, and
    each shard's rows against the ledger (their count, and their digest where recorded). One
    streaming pass, bounded memory but for one content hash per row; Lance errors on the way
    (a truncated or missing data file) are one line naming the index."""
    store = IndexStore.open(uri)
    report = VerifyReport(store.uri)
    ledger = store.done_shards()
    report.shards = len(ledger)
    report.digests = "digest" in store.ledger.schema.names
    sums: dict[str, int] = {}
    counts: dict[str, int] = {}
    seen: set[str] = set()
    for batch in store.batches(["content_hash", "path", "shard", "embedding"], chunk_rows):
        embeddings = embeddings_of(batch, store.dim)
        hashes, paths = batch.column("content_hash").to_pylist(), batch.column("path").to_pylist()
        shards = batch.column("shard").to_pylist()
        bad, norms = not_unit(embeddings)
        report.not_unit += int(bad.sum())
        report.examples += [f"{paths[i]}: embedding norm {norms[i]:.4g}" for i in np.flatnonzero(bad)[:3]]
        digests = list(row_digests(hashes, paths, embeddings)) if report.digests else [0] * len(hashes)
        for path, content, shard, digest in zip(paths, hashes, shards, digests, strict=True):
            if content in seen:
                report.duplicates += 1
                report.examples.append(f"{path}: content stored twice")
            seen.add(content)
            counts[shard] = counts.get(shard, 0) + 1
            sums[shard] = (sums.get(shard, 0) + digest) % (1 << 256)
        report.rows += len(hashes)
        del report.examples[5:]
    for key, row in ledger.items():
        if counts.get(key, 0) < int(row["added"] or 0):
            report.missing_rows += 1
            report.examples.append(f"shard {row['ordinal']}: {counts.get(key, 0)} of {row['added']} rows")
        elif report.digests and row.get("digest") and hex_digest(sums.get(key, 0)) != row["digest"]:
            report.digest_mismatch += 1
            report.examples.append(f"shard {row['ordinal']}: rows differ from their digest")
    report.uncommitted = sum(n for key, n in counts.items() if key not in ledger)
    del report.examples[5:]
    return report
