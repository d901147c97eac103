"""Small synthetic bases and patches for the tests (numpy only, no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.fileio import RawTensor, save_safetensors
from forgetpack.format.patch import Layer, Patch

SHAPES = {"text_projection": (24, 16), "visual.proj": (32, 16)}


def base_matrices(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def write_base(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A checkpoint with two patchable matrices plus untouched tensors of other dtypes."""
    matrices = base_matrices(seed)
    tensors = {name: RawTensor.from_array(m) for name, m in matrices.items()}
    tensors["logit_scale"] = RawTensor.from_array(np.array(4.6, dtype=np.float32))
    tensors["positional_embedding"] = RawTensor.from_array(np.arange(12, dtype=np.float16).reshape(3, 4))
    tensors["token_ids"] = RawTensor.from_array(np.arange(5, dtype=np.int64))
    save_safetensors(path, tensors, {"format": "pt"})
    return matrices


def make_patch(base: dict[str, np.ndarray], seed: int, targets=("text_projection",), rank: int = 2, scale: float = 0.05) -> Patch:
    rng = np.random.default_rng(seed)
    layers = []
    for name in targets:
        rows, cols = base[name].shape
        layers.append(Layer.lowrank(name, rng.standard_normal((rows, rank)) * scale, rng.standard_normal((rank, cols))))
    return Patch.create(
        "test-model",
        base,
        layers,
        recipe={"forget": [f"class{seed}"], "preserve": ["a", "b"], "solver": "test"},
        effect={"note": "synthetic"},
    )


def forget_patch(model: Any, label: str, template: str, model_id: str) -> Patch:
    """A rank-1 patch sending ``template(label)`` to the opposite of its embedding (an "antipode" forget).

    Built from the export's own ``features`` output, so it needs no solver and no torch.
    """
    backend = model.backend
    target = backend.manifest.towers["text"].projection
    info = backend.targets[target]
    w = backend.matrices[target]
    x = backend.text_features([template.replace("{}", label)])[0].astype(np.float64)
    y = x @ (w if info.layout == "in_out" else w.T)
    u, v = x / (x @ x), -2.0 * y
    layer = Layer.lowrank(target, u[:, None], v[None, :]) if info.layout == "in_out" else Layer.lowrank(target, v[:, None], u[None, :])
    return Patch.create(model_id, {target: w}, [layer], layouts={target: info.layout},
                        recipe={"forget": [label], "templates": [template], "solver": "test-antipode"})
