"""Apply patches to an in-memory torch model (open_clip), with the same checks as files.

The arithmetic is the patch module's own (numpy, float64, one rounding), so a model
patched here holds exactly the matrices ``forgetpack apply`` would write to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from forgetpack.format.errors import PatchError
from forgetpack.format.fit import apply_in_order, targets_of
from forgetpack.format.patch import Patch, fingerprint

if TYPE_CHECKING:
    import torch


def _parameter(model: torch.nn.Module, name: str) -> torch.Tensor:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    if name not in state:
        raise PatchError(f"model has no parameter {name!r} (the patch targets it)")
    return state[name]


def read_matrices(model: torch.nn.Module, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Copies of the named parameters as numpy arrays (their own dtype)."""
    return {n: _parameter(model, n).detach().cpu().numpy().copy() for n in names}


def apply_patches(
    model: torch.nn.Module, patches: Sequence[Patch], base_fingerprints: dict[str, str] | None = None
) -> dict[str, str]:
    """Apply ``patches`` in order to ``model`` in place; returns the new target fingerprints.

    ``base_fingerprints`` are the unpatched model's; by default the model is taken to be
    the base. Each patch must fit (``forgetpack.format.fit``) the state the ones before it left.
    """

    names = sorted({n for p in patches for n in p.targets})
    current = read_matrices(model, names)
    targets = targets_of(current, base_fingerprints)
    current = apply_in_order(current, patches, targets, model="the model")
    write_matrices(model, current)
    return {n: fingerprint(m) for n, m in current.items()}


def write_matrices(model: torch.nn.Module, matrices: Mapping[str, np.ndarray]) -> None:
    """Copy matrices into the model's parameters of the same names, exactly (no arithmetic)."""
    import torch

    with torch.no_grad():
        for name, matrix in matrices.items():
            param = _parameter(model, name)
            param.copy_(torch.from_numpy(np.ascontiguousarray(matrix)).to(param.device, param.dtype))
