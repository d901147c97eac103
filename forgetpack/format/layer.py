"""The pieces of a patch: target matrices, their fingerprints, and additive low-rank layers.

Exactness is designed in rather than hoped for: applying a layer is defined as
``float(W) + delta`` computed in float64 with a fixed summation order and rounded once to
the matrix's dtype, so the result depends only on the bytes of ``W`` and of the patch,
never on BLAS threading (docs/patch-format.md).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetpack.format.errors import PatchError

# Limits on what a patch may hold (docs/patch-format.md, docs/threat-model.md). A projection's
# entries are of order 1 and a forget update of the same order; factors far beyond that can only
# be a mistake or an attack (3e38 is finite, but the patched matrix would be all Inf).
MAX_ABS_VALUE = 1e6

# How a target matrix is used, so a reader knows which side is the feature side.
LAYOUTS = {
    "in_out": "y = x @ W (open_clip text_projection, visual.proj)",
    "out_in": "y = x @ W.T (nn.Linear weight, e.g. text.proj.weight)",
}


# ---------------------------------------------------------------------------- fingerprints


def fingerprint(matrix: np.ndarray) -> str:
    """sha256 over dtype, shape and the little-endian bytes of a matrix."""
    array = np.ascontiguousarray(matrix)
    array = array.astype(array.dtype.newbyteorder("<"), copy=False)
    h = hashlib.sha256()
    h.update(f"{array.dtype.str}|{','.join(map(str, array.shape))}|".encode())
    h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Layer:
    """One additive update of one target matrix: ``up @ down`` or a dense ``delta``."""

    target: str
    up: np.ndarray | None = None  # [rows, rank]
    down: np.ndarray | None = None  # [rank, cols]
    dense: np.ndarray | None = None  # [rows, cols]

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "lowrank"

    @property
    def rank(self) -> int:
        return int(self.up.shape[1]) if self.up is not None else 0

    def delta(self) -> np.ndarray:
        """The update in float64, summed rank-one term by term in a fixed order."""
        if self.dense is not None:
            return self.dense.astype(np.float64)
        up = self.up.astype(np.float64)
        down = self.down.astype(np.float64)
        out = np.zeros((up.shape[0], down.shape[1]), dtype=np.float64)
        for k in range(up.shape[1]):  # elementwise outer products: no BLAS, no thread-dependence
            out += np.multiply.outer(up[:, k], down[k, :])
        return out

    def apply(self, matrix: np.ndarray) -> np.ndarray:
        """``matrix + delta``, computed in float64 and rounded once to the matrix's dtype.

        A result that is not finite in that dtype (an fp16 overflow, say) is refused: a model
        with Inf in its projection answers NaN for everything."""
        with np.errstate(over="ignore", invalid="ignore"):
            out = (matrix.astype(np.float64) + self.delta()).astype(matrix.dtype)
        if not np.isfinite(out).all():
            raise PatchError(f"applying the update of {self.target!r} gives values that are not finite in {matrix.dtype}")
        return out

    def tensors(self, index: int) -> dict[str, np.ndarray]:
        prefix = f"layers.{index}.{self.target}"
        if self.dense is not None:
            return {f"{prefix}.delta": self.dense}
        return {f"{prefix}.up": self.up, f"{prefix}.down": self.down}

    @staticmethod
    def lowrank(target: str, up: np.ndarray, down: np.ndarray) -> Layer:
        return Layer(target, up=np.ascontiguousarray(up, np.float32), down=np.ascontiguousarray(down, np.float32))

# ---------------------------------------------------------------------------- the patch


@dataclass(frozen=True)
class Target:
    """A matrix a patch changes: its state-dict name, shape and storage layout."""

    name: str
    shape: tuple[int, int]
    layout: str = "in_out"

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "layout": self.layout}


def check_tensor(where: str, name: str, array: np.ndarray, shape: tuple[int, int]) -> None:
    if array.dtype != np.float32:
        raise PatchError(f"{where}tensor {name} has dtype {array.dtype}, expected float32")
    if tuple(array.shape) != shape:
        raise PatchError(f"{where}tensor {name} has shape {list(array.shape)}, expected {list(shape)}")
    if not np.isfinite(array).all():
        raise PatchError(f"{where}tensor {name} contains NaN or Inf")
    if array.size and float(np.abs(array).max()) > MAX_ABS_VALUE:
        raise PatchError(f"{where}tensor {name} holds values up to {float(np.abs(array).max()):.3g}, beyond the "
                         f"limit of {MAX_ABS_VALUE:.0e} for a patch")
