"""The one "does this patch fit?" rule, and applying patches in order under it.

Every place that puts a patch on a model (a checkpoint file, an in-memory torch model, an
ONNX export in the runtime, the exporter baking patches in, ``compose`` re-solving recorded
requests) describes the model's patchable matrices as :class:`TargetInfo` and calls
:func:`check_fit` or :func:`apply_in_order`. The rule, in one place:

- the patch is not already applied, nor one of the same recipe on the same base (a regenerated
  duplicate: ``metadata.recipe_key``), as recorded in a checkpoint, an export or the model itself;
- every matrix it changes exists, with the same shape (and layout, where the model knows it);
- it was made for this base: each target's base fingerprint equals the model's;
- a patch computed on top of other patches (``parent``) applies only on exactly that state.

numpy only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetpack.format.errors import PatchError
from forgetpack.format.metadata import recipe_names
from forgetpack.format.patch import Patch, display_name, fingerprint

__all__ = ["PROJECTION_NAMES", "TargetInfo", "apply_in_order", "check_fit", "display_name", "expected_layout", "marks", "patchable_names",
           "recorded_marks", "targets_of"]

# The matrices forgetpack's projection rules patch (``forgetpack.engine.projections``; a test keeps
# the two in step): the last linear map of each kind of text and image tower, as state dicts name it.
PROJECTION_NAMES = (
    "text_projection", "text_projection.weight", "text.text_projection", "text.text_projection.weight", "text.proj.weight",
    "visual.proj", "visual.attnpool.c_proj.weight", "visual.head.proj.weight",
)  # fmt: skip


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
    patchable: Sequence[str] | None = None,
) -> None:
    """Raise a one-line ``PatchError`` unless ``patch`` applies to a model with ``targets``.

    A refusal for a mismatch names the patch's file and the model it was made for (what the
    patch records), beside ``model``, the one it was given. ``patchable`` lists the model's
    patchable matrices for that message when ``targets`` holds only the ones at hand (a
    checkpoint, a torch model: ``patchable_names``); by default, ``targets``'s names.

    ``state`` holds the current fingerprints of the targets (needed only for patches that
    record a ``parent``; without it the model is taken to be at its base). ``applied`` lists
    the :func:`marks` (digests and recipe keys) of the patches already on the model.
    """
    where = display_name(patch)
    if patch.digest in applied:
        raise PatchError(f"{where}: is already applied to {model}")
    if patch.recipe_key is not None and patch.recipe_key in applied:
        raise PatchError(f"{where}: a patch of the same recipe (forget {recipe_names(patch.recipe, patch.components)}) is already "
                         f"applied to {model}; applying it again would move the same names again")
    made = f"{where} (a patch for {patch.model!r})"
    for name, target in patch.targets.items():
        info = targets.get(name)
        if info is None:
            known = ", ".join(sorted(targets if patchable is None else patchable)) or "none"
            raise PatchError(f"{made}: targets {name!r}, which {model} cannot patch (its patchable matrices: {known})")
        if tuple(target.shape) != tuple(info.shape):
            raise PatchError(f"{made}: target {name!r} is {list(target.shape)} but {model} has {list(info.shape)}")
        layout = expected_layout(name, info.layout)
        if layout is not None and target.layout != layout:
            raise PatchError(f"{made}: target {name!r} is stored {target.layout}, {model} stores it {layout}")
        if patch.base[name] != info.base:
            raise PatchError(
                f"{made}: made for a different base: {name!r} base fingerprint {patch.base[name]}, {model} has {info.base}"
            )
        if patch.parent is not None:
            now = (state or {}).get(name, info.base)
            if patch.parent[name] != now:
                raise PatchError(
                    f"{where}: computed on top of other patches ({name!r} parent {patch.parent[name]}), "
                    f"but {model} is at {now}"
                )


def expected_layout(name: str, known: str | None = None) -> str | None:
    """The layout a model stores matrix ``name`` in: what it says (``known``: an export's manifest, a
    loaded model), else what a projection's state-dict name implies (an ``nn.Linear`` weight,
    ``….weight``, is ``out_in``; a bare projection parameter ``in_out``: ``engine.projections``, a
    test keeps the two in step), else None (a matrix no projection rule names: shape decides).

    The one layout rule: a bare checkpoint (``apply``, ``verify --base``) refuses a layout-flipped
    patch exactly as the runtime does."""
    if known is not None:
        return known
    if name not in PROJECTION_NAMES:
        return None
    return "out_in" if name.endswith(".weight") else "in_out"


def patchable_names(names: Iterable[str]) -> list[str]:
    """The matrices among a model's tensor ``names`` that patches target (``PROJECTION_NAMES``): what a
    checkpoint or a bare module, which cannot say for itself, lists as its patchable matrices."""
    present = set(names)
    return [n for n in PROJECTION_NAMES if n in present]


def marks(patch: Patch) -> list[str]:
    """What a model records of a patch applied to it, for the already-applied check: its digest and,
    when it records a recipe, its recipe key."""
    return [patch.digest] + ([patch.recipe_key] if patch.recipe_key is not None else [])


def recorded_marks(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The :func:`marks` of patches as a checkpoint record or an export manifest lists them
    (``{"digest": …, "recipe": …}``; older files have no ``recipe``)."""
    return [m for e in entries for m in (e.get("digest"), e.get("recipe")) if isinstance(m, str)]


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
    patchable: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """``matrices`` with ``patches`` applied in order (the patch format's exact arithmetic),
    each checked by :func:`check_fit` against the state the patches before it left."""
    current = dict(matrices)
    done = list(applied)
    for patch in patches:
        state = {n: fingerprint(current[n]) for n in patch.targets if n in current} if patch.parent is not None else None
        check_fit(patch, targets, model=model, state=state, applied=done, patchable=patchable)
        current.update(patch.apply({n: current[n] for n in patch.targets}))
        done.extend(marks(patch))
    return current
