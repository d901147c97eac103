"""Evaluation results in LAION CLIP_benchmark's format, so its tools can read and aggregate them.

``clip_benchmark eval`` writes one JSON file per (dataset, model, pretrained) run, and
``clip_benchmark build`` merges a folder of them into one CSV: it reads ``metrics`` (flattened
into the row), ``model`` and ``pretrained`` (joined into ``model_fullname``) and keeps every
other top-level field as a column. We write the same files, one per dataset and variant:

- ``pretrained`` is ``"base"`` for the unpatched model, and ``"patched:"`` followed by the
  first 12 hex digits of each patch digest joined by ``+`` for the patched one, so base and
  patched runs are separate rows of one model;
- ``forgetpack_patches`` lists the full patch digests (empty for ``base``).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetpack.evaluation.metrics import TASK
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_output_file, write_bytes_atomic

if TYPE_CHECKING:
    from forgetpack.evaluation.harness import EvalReport

LANGUAGE = "en"  # CLIP_benchmark's default; our prompts are English
DIGEST_PREFIX = 12  # hex digits of each patch digest in ``pretrained``


def pretrained_name(digests: list[str]) -> str:
    """How ``pretrained`` names a patch set: ``base``, or ``patched:<prefix>+<prefix>...``."""
    if not digests:
        return "base"
    return "patched:" + "+".join(d.removeprefix("sha256:")[:DIGEST_PREFIX] for d in digests)


def results(report: EvalReport) -> list[dict[str, Any]]:
    """One CLIP_benchmark result per dataset and variant (base, then patched if there are patches)."""
    variants = [([], report.base)]
    if report.patched is not None:
        variants.append((report.patch_digests, report.patched))
    return [
        {
            "dataset": name,
            "model": report.model,
            "pretrained": pretrained_name(digests),
            "task": TASK,
            "metrics": result.clip_benchmark_metrics(),
            "language": LANGUAGE,
            "forgetpack_patches": list(digests),
        }
        for digests, table in variants
        for name, result in table.items()
    ]


def file_name(entry: dict[str, Any]) -> str:
    """CLIP_benchmark's default ``{dataset}_{pretrained}_{model}_{language}_{task}.json``, made filename-safe."""
    parts = (entry["dataset"], entry["pretrained"], entry["model"], entry["language"], entry["task"])
    return "_".join(re.sub(r"[^\w.+-]+", "-", part, flags=re.ASCII) for part in parts) + ".json"


def write_results(report: EvalReport, folder: str | os.PathLike[str], replace: bool = True) -> list[Path]:
    """Write :func:`results` into ``folder`` (created if missing), each file atomically; returns the paths.

    Files of other runs in the folder are kept, so one folder can collect many patch sets. Without
    ``replace`` a file of this run already there is refused (the overwrite rule), before any is written.
    """
    folder = Path(folder)
    entries = results(report)
    paths = [folder / file_name(e) for e in entries]
    if len(set(paths)) != len(paths):
        raise ForgetpackError("two datasets would share one CLIP_benchmark file name; rename one of them")
    if folder.is_dir():
        for path in paths:
            check_output_file(path, "CLIP_benchmark result", replace=replace)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for path, entry in zip(paths, entries, strict=True):
            write_bytes_atomic(path, (json.dumps(entry, indent=2) + "\n").encode())
    except OSError as exc:
        raise ForgetpackError(f"cannot write CLIP_benchmark results to {folder}: {exc}") from exc
    return paths
