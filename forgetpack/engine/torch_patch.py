"""Apply patches to an in-memory torch model (open_clip), with the same checks as files.

The arithmetic is the patch module's own (numpy, float64, one rounding), so a model
patched here holds exactly the matrices ``forgetpack apply`` would write to disk.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.format.errors import PatchError
from forgetpack.format.fit import apply_in_order, marks, patchable_names, targets_of
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
    model: torch.nn.Module, patches: Sequence[Patch], base_fingerprints: dict[str, str] | None = None,
    *, name: str = "the model",
) -> dict[str, str]:
    """Apply ``patches`` in order to ``model`` in place; returns the new target fingerprints.

    ``base_fingerprints`` are the unpatched model's; by default the model is taken to be
    the base, or what an earlier call recorded. Each patch must fit (``forgetpack.format.fit``)
    the state the ones before it left; one already applied by an earlier call, or one of the
    same recipe, is refused while the model still holds what that call wrote. ``name`` is how a
    refusal names the model.
    """
    record = _record(model)
    current = read_matrices(model, _present(model, patches))
    targets = targets_of(current, {**record["base"], **(base_fingerprints or {})})
    current = apply_in_order(current, patches, targets, model=name, applied=record["marks"], patchable=_patchable(model))
    write_matrices(model, current)
    after = {n: fingerprint(m) for n, m in current.items()}
    setattr(model, RECORD, {
        "base": {**record["base"], **{n: t.base for n, t in targets.items()}},
        "after": {**record["after"], **after},
        "marks": [*record["marks"], *(m for p in patches for m in marks(p))],
    })
    return after


def patched_matrices(model: torch.nn.Module, patches: Sequence[Patch], *, name: str = "the model") -> dict[str, np.ndarray]:
    """The target matrices ``apply_patches`` would write, checked by the same fit rule, the model
    untouched: a caller refuses a patch before spending time on the model."""
    record = _record(model)
    current = read_matrices(model, _present(model, patches))
    targets = targets_of(current, record["base"])
    return apply_in_order(current, patches, targets, model=name, applied=record["marks"], patchable=_patchable(model))


def _present(model: torch.nn.Module, patches: Sequence[Patch]) -> list[str]:
    """The patches' targets the model has (one it lacks is the fit rule's to name)."""
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    return sorted({n for p in patches for n in p.targets if n in names})


def _patchable(model: torch.nn.Module) -> list[str]:
    """The model's projections, as a refusal lists them (``fit.patchable_names``)."""
    return patchable_names([*(n for n, _ in model.named_parameters()), *(n for n, _ in model.named_buffers())])


RECORD = "_forgetpack_patches"  # what apply_patches left on a model: base and after fingerprints, marks


def _record(model: torch.nn.Module) -> dict[str, Any]:
    """What earlier ``apply_patches`` calls recorded, if the model still holds exactly what they wrote
    (anything that rewrote the matrices since, such as a runtime backend restoring its base, voids it)."""
    record = getattr(model, RECORD, None)
    empty: dict[str, Any] = {"base": {}, "after": {}, "marks": []}
    if not isinstance(record, dict) or not record.get("after"):
        return empty
    now = read_matrices(model, record["after"])
    return record if all(fingerprint(now[n]) == fp for n, fp in record["after"].items()) else empty


def write_matrices(model: torch.nn.Module, matrices: Mapping[str, np.ndarray]) -> None:
    """Copy matrices into the model's parameters of the same names, exactly (no arithmetic)."""
    import torch

    with torch.no_grad():
        for name, matrix in matrices.items():
            param = _parameter(model, name)
            param.copy_(torch.from_numpy(np.ascontiguousarray(matrix)).to(param.device, param.dtype))
