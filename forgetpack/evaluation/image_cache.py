"""Image embeddings, cached in memory and on disk.

Image embeddings depend only on the vision tower, which forget patches leave alone, so
they are cached per (vision-tower fingerprint, dataset fingerprint): evaluating many
patches of one model re-encodes only the class prompts. The disk copy lives in the
project's cache folder ``image-embeddings`` (see :mod:`forgetpack.format.cache`;
``FORGETPACK_CACHE=off`` writes nothing), one safetensors file per entry, written
atomically so that concurrent evaluations never read half a file.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.evaluation.datasets import LabeledImages
from forgetpack.format.cache import cache_dir
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import RawTensor, read_safetensors, save_safetensors

if TYPE_CHECKING:
    import torch

CACHE_KIND = "image-embeddings"
_MEMORY_CACHE: dict[str, np.ndarray] = {}  # in-process copy of the disk cache

log = logging.getLogger(__name__)


def vision_fingerprint(model: torch.nn.Module, preprocess: Any) -> str:
    """A hash of everything that decides an image embedding: vision weights and preprocess."""
    import torch

    h = hashlib.sha256(repr(preprocess).encode())
    visual = getattr(model, "visual", model)
    with torch.no_grad():
        for name, tensor in sorted(visual.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_images(
    loaded: Any, data: LabeledImages, *, device: str = "cpu", batch_size: int = 256, fingerprint: str | None = None,
    encoded: Callable[[int], None] | None = None,
) -> np.ndarray:
    """L2-normalised image embeddings of ``data`` (float32, one row per image), cached.

    ``encoded`` hears how many images each step covered (a cached dataset: all at once)."""
    fingerprint = fingerprint or vision_fingerprint(loaded.model, loaded.preprocess)
    dataset_fingerprint = data.fingerprint()
    key = hashlib.sha256(f"{fingerprint}:{dataset_fingerprint}".encode()).hexdigest()[:40]
    encoded = encoded or (lambda _n: None)
    if key in _MEMORY_CACHE:
        encoded(len(data))
        return _MEMORY_CACHE[key]
    folder = cache_dir(CACHE_KIND)
    path = folder / f"{key}.safetensors" if folder is not None else None
    features = _read_entry(path, len(data)) if path is not None else None
    if features is None:
        features = _encode(loaded, data, device, batch_size, encoded)
        if path is not None:
            _write_entry(path, features, {"vision": fingerprint, "dataset": dataset_fingerprint})
    else:
        encoded(len(data))
    _MEMORY_CACHE[key] = features
    return features


def _encode(loaded: Any, data: LabeledImages, device: str, batch_size: int, encoded: Callable[[int], None]) -> np.ndarray:
    import torch

    model = loaded.model
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = torch.stack([loaded.preprocess(im) for im in data.images[start : start + batch_size]])
            chunks.append(model.encode_image(batch.to(device), normalize=True).float().cpu().numpy())
            encoded(len(batch))
    return np.concatenate(chunks).astype(np.float32)


def _read_entry(path: Path, rows: int) -> np.ndarray | None:
    """The cached embeddings, or None when absent or damaged: a damaged entry is a miss, recomputed."""
    try:
        tensors, _ = read_safetensors(path, "image-embedding cache entry")
        features = tensors["embeddings"].to_array()
    except (ForgetpackError, KeyError):
        return None
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] != rows:
        return None
    return features


def _write_entry(path: Path, features: np.ndarray, metadata: dict[str, str]) -> None:
    """Caching is an optimisation: a read-only cache folder must not fail the evaluation, only say so."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(path, {"embeddings": RawTensor.from_array(features)}, metadata)
    except (OSError, ForgetpackError) as exc:
        log.warning("cannot write the image-embedding cache %s: %s", path, exc)
