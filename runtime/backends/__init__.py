"""Runtime backends: the interface, the shared patch arithmetic, and discovery by entry point.

A backend is any class registered in the ``forgetpack.runtime_backends`` entry-point group
(``name = "module:Class"``); ``runtime.load(..., backend=name)`` instantiates it as
``Class(source, providers=providers, **options)``. It must provide what :class:`Backend`
lists; the ``Model`` facade in ``runtime/__init__.py`` does the rest (image loading,
normalisation, zero-shot classification, signature checks, patch bookkeeping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import numpy as np

from forgetpack.errors import ForgetpackError, PatchError
from forgetpack.patch import Patch, fingerprint

GROUP = "forgetpack.runtime_backends"


@dataclass(frozen=True)
class TargetInfo:
    """A patchable matrix as a backend exposes it."""

    shape: tuple[int, int]
    layout: str  # "in_out" | "out_in"
    base: str  # fingerprint of the unpatched matrix: what patches must be made for


class Backend:
    """The interface a backend implements (subclassing is optional; duck typing is enough).

    ``encode_images`` receives decoded PIL images and ``encode_texts`` strings; both return
    ``[n, embed_dim]`` float arrays, not necessarily normalised. ``set_patches`` replaces the
    set of hot-applied patches (in order) on top of the backend's starting state; it is only
    called with patches the facade has already checked against ``targets``, and must leave
    the backend unchanged if it raises.
    """

    name: str = ""
    model_id: str = ""
    logit_scale: float = 100.0
    targets: Mapping[str, TargetInfo] = {}
    baked: Sequence[str] = ()  # digests of patches built into the model itself (not removable)

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def set_patches(self, patches: Sequence[Patch]) -> None:
        raise NotImplementedError


def discover() -> dict[str, metadata.EntryPoint]:
    """Installed backends by name (entry points of group ``forgetpack.runtime_backends``)."""
    return {ep.name: ep for ep in metadata.entry_points(group=GROUP)}


def backend_class(name: str) -> type:
    """The backend class registered under ``name``, imported now."""
    found = discover()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ForgetpackError(f"unknown runtime backend {name!r} (installed: {known}; backends register in entry-point group {GROUP})")
    try:
        return found[name].load()
    except ImportError as exc:
        raise ForgetpackError(f"runtime backend {name!r} cannot be imported ({exc}); is its package installed?") from None


def check_patch(patch: Patch, targets: Mapping[str, TargetInfo], baked: Sequence[str] = ()) -> None:
    """Raise unless ``patch`` was made for this model's base: targets, shapes, layouts, fingerprints."""
    where = patch.source or patch.digest[:23]
    if patch.digest in baked:
        raise PatchError(f"{where}: is already baked into this model")
    for name, target in patch.targets.items():
        info = targets.get(name)
        if info is None:
            raise PatchError(f"{where}: targets {name!r}, which this model cannot patch (it has {', '.join(sorted(targets)) or 'no targets'})")
        if tuple(target.shape) != tuple(info.shape) or target.layout != info.layout:
            raise PatchError(f"{where}: target {name!r} is {list(target.shape)} {target.layout}, the model has {list(info.shape)} {info.layout}")
        if patch.base[name] != info.base:
            raise PatchError(f"{where}: made for a different base: {name!r} base fingerprint {patch.base[name]}, this model has {info.base}")


def compose(start: Mapping[str, np.ndarray], patches: Sequence[Patch]) -> dict[str, np.ndarray]:
    """``start`` with ``patches`` applied in order (patch.py's exact arithmetic), parents checked."""
    current = dict(start)
    for patch in patches:
        if patch.parent is not None:
            for name in patch.targets:
                if patch.parent[name] != fingerprint(current[name]):
                    raise PatchError(f"{patch.source or patch.digest[:23]}: computed on top of other patches; {name!r} is not in that state")
        current.update(patch.apply({n: current[n] for n in patch.targets}))
    return current
