"""Warm runs: solve from cached features and the projection read straight from the weights file.

A forgetting request needs, from the model, only the pre-projection text features of its
prompts (cached on disk by ``forgetpack.engine.features``) and the text projection. Building
the model costs seconds (importing torch and open_clip, constructing and loading it) while
the solve takes a fraction of a second, so a user iterating on a request waits mostly for
the model. Here a cold run leaves a small record per model spec (``remember``): the
checkpoint file's identity (size, modification time, inode), the fingerprint of its text
tower, where the projection lives and its fingerprint. The next run (``run_with_model``) first
tries a ``WeightsOnlyModel``: the projection memory-mapped from the safetensors file, checked
against the recorded fingerprint, and the recorded text fingerprint to find the features. If
any feature is missing it raises ``FeaturesNotCached`` before anything is written, and the
run falls back to loading the model: torch and open_clip are imported only then.

Supported: ``ARCH:PATH`` specs naming a ``.safetensors`` checkpoint, and ``ARCH:TAG`` pretrained
tags whose file (in open_clip's download cache) is one; a ``.pt``/``.bin`` pickle is never
parsed here, so those runs stay cold, as do ``mini`` and ``hf-hub:`` specs. The file identity stands for its text tower: a
file rewritten in place with the same size and modification time would not be noticed, while
every ordinary write (and ``forgetpack apply``, which writes a new file) is.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from forgetpack.engine.features import FeaturesNotCached, text_fingerprint
from forgetpack.engine.models import LoadedModel
from forgetpack.engine.projections import Projection, find_projection, projection_matrix
from forgetpack.engine.threads import solve_threads
from forgetpack.format.cache import cache_dir
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import write_bytes_atomic
from forgetpack.format.patch import fingerprint

RECORD_VERSION = 1
T = TypeVar("T")
log = logging.getLogger(__name__)

__all__ = ["FeaturesNotCached", "WeightsOnlyModel", "remember", "run_with_model", "weights_only"]


class _Stored:
    """A stored matrix as ``projection_matrix`` reads a parameter (``p.detach().cpu().numpy()``)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array
        self.shape = array.shape

    def detach(self) -> _Stored:
        return self

    def cpu(self) -> _Stored:
        return self

    def numpy(self) -> np.ndarray:
        return self.array


class WeightsOnlyModel:
    """What solving needs of a model, without the model: its text projection (and bias) and
    the fingerprint of its text tower, which finds the cached features. It cannot encode."""

    can_encode = False

    def __init__(self, projection: Projection, matrix: np.ndarray, bias: np.ndarray | None, text_fingerprint: str):
        self.located_projections = {"text": projection}  # answers find_projection for itself
        self.text_fingerprint = text_fingerprint
        self._params = {projection.target: _Stored(matrix)}
        if projection.bias is not None and bias is not None:
            self._params[projection.bias] = _Stored(bias)

    def named_parameters(self) -> Iterator[tuple[str, _Stored]]:
        return iter(self._params.items())

    def named_buffers(self) -> Iterator[tuple[str, _Stored]]:
        return iter(())


def run_with_model(spec: str, work: Callable[[Any], T], loading: Callable[[str], None] | None = None) -> T:
    """``work(model)`` on the weights alone when a cold run recorded them and every feature it
    needs is cached; otherwise on the loaded model, recorded for the next run. Either way
    under ``solve_threads`` (one BLAS thread: see forgetpack/engine/threads.py). ``loading`` hears
    when a model is about to be loaded (seconds a progress display should name)."""
    warm = weights_only(spec)
    if warm is not None:
        try:
            with solve_threads():
                return work(warm)
        except FeaturesNotCached:
            pass
    from forgetpack.engine.models import load_model

    if loading is not None:
        loading(f"loading {spec}")
    loaded = load_model(spec)
    with solve_threads():  # the same limit as a warm run: the same arithmetic, the same patch
        result = work(loaded)
    remember(spec, loaded)
    return result


# ---------------------------------------------------------------------------- the record


def _checkpoint(spec: str) -> tuple[str, str, Path | None] | None:
    """(model id, arch, path) as ``load_model`` names them: ``ARCH:PATH.safetensors`` gives the
    file; ``ARCH:TAG`` gives no path (its file is the one a cold run recorded). Else None."""
    arch, _, rest = (spec or "").strip().partition(":")
    if not arch or not rest or rest == "none" or spec.strip().startswith("hf-hub:"):
        return None
    arch = arch.replace("/", "-")
    path = Path(rest).expanduser()
    if path.suffix == ".safetensors" and path.is_file():
        return f"{arch}:{path.resolve()}", arch, path.resolve()
    if any(c in rest for c in "/\\."):  # a path, but not to a safetensors file: stays cold
        return None
    return f"{arch}:{rest}", arch, None


def _pretrained_file(arch: str, tag: str) -> Path | None:
    """The file open_clip loaded for a pretrained tag (already downloaded by the cold run)."""
    import open_clip

    try:
        found = open_clip.pretrained.download_pretrained(open_clip.get_pretrained_cfg(arch, tag))
    except Exception:  # offline, unknown tag: this run simply stays cold next time
        return None
    return Path(found).resolve() if found else None


def _record_path(model_id: str) -> Path | None:
    root = cache_dir("warm-models")
    return None if root is None else root / (hashlib.sha256(model_id.encode()).hexdigest()[:32] + ".json")


def _identity(path: Path) -> dict[str, int]:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}


def _read_stored(path: Path, name: str, dtype: str) -> np.ndarray | None:
    """One tensor memory-mapped from a safetensors file, in the model's dtype; None if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            if name not in f.keys():
                return None
            return np.ascontiguousarray(f.get_tensor(name), dtype=np.dtype(dtype))
    except Exception:  # bf16 (numpy has none), a torn or foreign file: stay cold
        return None


def remember(spec: str, loaded: LoadedModel) -> None:
    """After a cold run: record what a warm run needs, if the spec is a safetensors checkpoint whose
    projection reads back from the file exactly as the model holds it. Never an error."""
    found = _checkpoint(spec)
    where = _record_path(found[0]) if found else None
    if found is None or where is None or found[0] != loaded.model_id:
        return
    model_id, arch, path = found
    if path is None:
        path = _pretrained_file(arch, model_id.split(":", 1)[1])
        if path is None or path.suffix != ".safetensors":
            return  # a pickled checkpoint is never parsed here
    try:
        proj = find_projection(loaded.model, "text")
        matrix = projection_matrix(loaded.model, proj)
        stored = _read_stored(path, proj.target, matrix.dtype.str)
        if stored is None or fingerprint(stored) != fingerprint(matrix):
            return  # renamed or converted at load time: the file alone cannot stand for the model
        stored_bias = None
        if proj.bias is not None:
            raw = dict(loaded.model.named_parameters())[proj.bias].detach().cpu().numpy()
            read = _read_stored(path, proj.bias, raw.dtype.str)
            if read is None or fingerprint(read) != fingerprint(raw):
                return
            stored_bias = {"dtype": raw.dtype.str, "fingerprint": fingerprint(raw)}
        record = {
            "version": RECORD_VERSION, "model_id": model_id, "arch": arch, "file": {"path": str(path), **_identity(path)},
            "text_fingerprint": text_fingerprint(loaded.model, loaded.tokenizer),
            "projection": {"target": proj.target, "layout": proj.layout, "rule": proj.rule, "bias": proj.bias},
            "matrix": {"dtype": matrix.dtype.str, "fingerprint": fingerprint(matrix)},
            "bias": stored_bias, "vocabulary": list(loaded.vocabulary),
        }
        where.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(where, json.dumps(record, sort_keys=True).encode())
    except (OSError, ForgetpackError) as exc:  # a cache that cannot be written only costs the next run time
        log.warning("warm-run record not written (%s)", exc)


def weights_only(spec: str) -> LoadedModel | None:
    """A ``LoadedModel`` holding a ``WeightsOnlyModel``, when a cold run recorded this very file; else None."""
    found = _checkpoint(spec)
    where = _record_path(found[0]) if found else None
    if found is None or where is None or not where.is_file():
        return None
    model_id, arch, path = found
    try:
        record = json.loads(where.read_text(encoding="utf-8"))
        path = path or Path(record["file"]["path"])  # a pretrained tag: the file the cold run loaded
        if (record.get("version") != RECORD_VERSION or record.get("model_id") != model_id
                or record["file"] != {"path": str(path), **_identity(path)}):
            return None
        p = record["projection"]
        proj = Projection(p["target"], p["layout"], p["rule"], p["bias"])
        matrix = _read_stored(path, proj.target, record["matrix"]["dtype"])
        if matrix is None or fingerprint(matrix) != record["matrix"]["fingerprint"]:
            return None
        bias = None
        if proj.bias is not None:
            bias = _read_stored(path, proj.bias, record["bias"]["dtype"])
            if bias is None or fingerprint(bias) != record["bias"]["fingerprint"]:
                return None
        model = WeightsOnlyModel(proj, matrix, bias, record["text_fingerprint"])
        return LoadedModel(model, None, None, model_id, arch, tuple(record.get("vocabulary", ())))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # a stale or foreign record: stay cold
        return None
