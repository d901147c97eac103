"""What int8 costs in accuracy: a quantized export beside the fp32 model it came from, on held-out images.

``export --quantize int8`` prints it, so the number a user reads is the int8 graph's own. The fp32
side is the torch model with the same patches (the fp32 graph matches it to 1e-4 by the export's
own check), so no second export is written. Only a model with a held-out set of its own has one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetpack.evaluation.datasets import load_dataset
from forgetpack.format.patch import Patch

HELDOUT_SET = {"forgetpack-mini": "digits"}  # architecture -> the held-out set its int8 export is measured on


@dataclass(frozen=True)
class QuantizedAccuracy:
    dataset: str
    images: int
    fp32: float  # top-1 of the (patched) torch model
    int8: float  # top-1 of the int8 export


def quantized_accuracy(loaded: Any, export_dir: str | os.PathLike[str], patches: Sequence[Patch] = ()) -> QuantizedAccuracy | None:
    """Held-out top-1 of ``export_dir`` (an int8 export of ``loaded`` with ``patches`` baked in) and of
    ``loaded`` with the same patches; None for a model without a held-out set (``HELDOUT_SET``)."""
    import runtime

    name = HELDOUT_SET.get(loaded.arch)
    if name is None:
        return None
    data = load_dataset(name)
    templates = list(data.templates)
    reference = runtime.load(loaded, backend="torch")
    for patch in patches:
        reference.apply_patch(patch)
    try:
        fp32 = _top1(reference, data.images, data.classnames, templates, data.labels)
    finally:
        for patch in reversed(patches):
            reference.remove_patch(patch)
    int8 = _top1(runtime.load(export_dir), data.images, data.classnames, templates, data.labels)
    return QuantizedAccuracy(dataset=name, images=len(data.labels), fp32=fp32, int8=int8)


def _top1(model: Any, images: Sequence[Any], classnames: Sequence[str], templates: list[str], labels: np.ndarray) -> float:
    predicted = np.array([p.index for p in model.classify(list(images), list(classnames), templates)])
    return float(np.mean(predicted == labels))
