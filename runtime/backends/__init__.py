"""Runtime backends: the interface and discovery by entry point.

A backend is any class registered in the ``forgetpack.runtime_backends`` entry-point group
(``name = "module:Class"``); ``runtime.load(..., backend=name)`` instantiates it as
``Class(source, providers=providers, **options)``. It must provide what :class:`Backend`
lists; the ``Model`` facade in ``runtime/__init__.py`` does the rest (image loading,
normalisation, zero-shot classification, signature checks, patch bookkeeping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np

from forgetpack.format import registry
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import TargetInfo
from forgetpack.format.patch import Patch

GROUP = "forgetpack.runtime_backends"


class Backend:
    """The interface a backend implements (subclassing is optional; duck typing is enough).

    ``encode_images`` receives decoded PIL images and ``encode_texts`` strings; both return
    ``[n, embed_dim]`` float arrays, not necessarily normalised. ``set_patches`` replaces the
    set of hot-applied patches (in order) on top of the backend's starting state, with
    ``forgetpack.format.fit.apply_in_order`` (the one fit rule and the exact arithmetic), and
    must leave the backend unchanged if it raises.
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
    return registry.installed(GROUP, rescan=True)


def backend_class(name: str) -> type:
    """The backend class registered under ``name``, imported now (the scan is remembered: ``format.registry``)."""
    return registry.load(GROUP, name, "runtime backend")  # type: ignore[return-value]


MAX_THREADS = 256


def check_threads(threads: Any) -> int | None:
    """The one rule for a ``threads`` option: None (the backend's default) or 1 to ``MAX_THREADS``."""
    if threads is None:
        return None
    if type(threads) is not int or not 1 <= threads <= MAX_THREADS:
        raise ForgetpackError(f"threads must be a whole number from 1 to {MAX_THREADS}, not {threads!r}")
    return threads


def check_towers(towers: Any, available: Sequence[str], where: str) -> tuple[str, ...]:
    """The one rule for a ``towers`` option: None (every tower of the model) or some of ``available``.

    Loading only the towers a job uses saves their memory and load time (an index scan needs the
    text tower alone, an indexing worker the image tower alone)."""
    if towers is None:
        return tuple(available)
    names = (towers,) if isinstance(towers, str) else towers
    if not isinstance(names, (tuple, list)) or not all(isinstance(t, str) for t in names):
        raise ForgetpackError(f"towers must be a list of tower names ({', '.join(available)}), not {towers!r}")
    unknown = [t for t in names if t not in available]
    if unknown:
        raise ForgetpackError(f"{where}: has no {unknown[0]!r} tower (towers: {', '.join(available)})")
    return tuple(t for t in available if t in names)
