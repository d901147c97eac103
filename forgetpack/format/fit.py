"""The one "does this patch fit?" rule, and applying patches in order under it.

Every place that puts a patch on a model (a checkpoint file, an in-memory torch model, an
ONNX export in the runtime, the exporter baking patches in, ``compose`` re-solving recorded
requests) describes the model's patchable matrices as :class:`TargetInfo` and calls
:func:`check_fit` or :func:`apply_in_order`. The rule, in one place:

- the patch is not already applied;
- every matrix it changes exists, with the same shape (and layout, where the model knows it);
- it was made for this base: each target's base fingerprint equals the model's;
- a patch computed on top of other patches (``parent``) applies only on exactly that state.

numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from forgetpack.format.errors import PatchError
from forgetpack.format.patch import Patch, display_name, fingerprint

__all__ = ["TargetInfo", "apply_in_order", "check_fit", "display_name", "targets_of"]


@dataclass(frozen=True)
class TargetInfo:
    """A patchable matrix as a model exposes it."""

    shape: tuple[int, int]
    base: str  # fingerprint of the unpatched matrix: what patches must be made for
    layout: str | None = None  # "in_out" | "out_in"; None where the model cannot say (a bare checkpoint)


def check_fit(
    patch: Patch,
    targets: Mapping[str, TargetInfo],
    *,
    model: str = "this model",
    state: Mapping[str, str] | None = None,
    applied: Sequence[str] = (),
) -> None:
    """Raise a one-line ``PatchError`` unless ``patch`` applies to a model with ``targets``.

    ``state`` holds the current fingerprints of the targets (needed only for patches that
    record a ``parent``; without it the model is taken to be at its base). ``applied`` lists
    the digests already on the model.
    """
    where = display_name(patch)
    if patch.digest in applied:
        raise PatchError(f"{where}: is already applied to {model}")
    for name, target in patch.targets.items():
        info = targets.get(name)
        if info is None:
            known = ", ".join(sorted(targets)) or "none"
            raise PatchError(f"{where}: targets {name!r}, which {model} cannot patch (its patchable matrices: {known})")
        if tuple(target.shape) != tuple(info.shape):
            raise PatchError(f"{where}: target {name!r} is {list(target.shape)} but {model} has {list(info.shape)}")
        if info.layout is not None and target.layout != info.layout:
            raise PatchError(f"{where}: target {name!r} is stored {target.layout}, {model} stores it {info.layout}")
        if patch.base[name] != info.base:
            raise PatchError(
                f"{where}: made for a different base: {name!r} base fingerprint {patch.base[name]}, {model} has {info.base}"
            )
        if patch.parent is not None:
            now = (state or {}).get(name, info.base)
            if patch.parent[name] != now:
                raise PatchError(
                    f"{where}: computed on top of other patches ({name!r} parent {patch.parent[name]}), "
                    f"but {model} is at {now}"
                )


def targets_of(matrices: Mapping[str, np.ndarray], base: Mapping[str, str] | None = None,
               layouts: Mapping[str, str] | None = None) -> dict[str, TargetInfo]:
    """``TargetInfo`` for matrices at hand; ``base`` gives base fingerprints when they are not the base."""
    base = base or {}
    layouts = layouts or {}
    return {
        name: TargetInfo(tuple(int(d) for d in m.shape), base.get(name) or fingerprint(m), layouts.get(name))
        for name, m in matrices.items()
    }


def apply_in_order(
    matrices: Mapping[str, np.ndarray],
    patches: Sequence[Patch],
    targets: Mapping[str, TargetInfo],
    *,
    model: str = "this model",
    applied: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """``matrices`` with ``patches`` applied in order (the patch format's exact arithmetic),
    each checked by :func:`check_fit` against the state the patches before it left."""
    current = dict(matrices)
    done = list(applied)
    for patch in patches:
        state = {n: fingerprint(current[n]) for n in patch.targets if n in current} if patch.parent is not None else None
        check_fit(patch, targets, model=model, state=state, applied=done)
        current.update(patch.apply({n: current[n] for n in patch.targets}))
        done.append(patch.digest)
    return current
