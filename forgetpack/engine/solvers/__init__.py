"""Solvers: given features and targets, find the update of one projection matrix.

Every solver sees the same :class:`Problem`, written in *feature form*: the projection maps a
pre-projection feature row ``x`` to ``y = x @ M`` (``M`` is ``[width, embed]`` whatever the
storage layout; biases are already subtracted from the targets). It returns a
:class:`Solution`: a low-rank update ``Δ = up @ down`` of ``M``, which
:meth:`Solution.layer` turns into a patch :class:`~forgetpack.format.patch.Layer` in the target's
own layout.

Solvers register like runtime backends, in the entry-point group ``forgetpack.solvers``
(``name = "module:Class"``; pyproject.toml declares the three built in), so another package can
add one. Built in:

- ``paper``: the official LoRA/Adam loop of Kravets & Namboodiri, with its retry rule.
- ``closed-form``: the exact optimum of the squared objective (ridge, rank-constrained).
- ``nullspace``: the CCUP baseline, projecting forget directions out of the projection.

numpy only here, except ``paper`` which runs its loop in torch as the original does; listing
the solvers (:func:`available_solvers`) imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import Any, ClassVar, Protocol

import numpy as np

from forgetpack.engine.projections import Projection
from forgetpack.format import registry
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.patch import Layer


@dataclass(frozen=True)
class Weights:
    """Loss weights: forget term, preserve term, size of the update."""

    forget: float
    preserve: float
    update: float

    def to_json(self) -> dict[str, float]:
        return {"forget": self.forget, "preserve": self.preserve, "update": self.update}

    @classmethod
    def from_json(cls, data: Mapping[str, float]) -> Weights:
        return cls(data["forget"], data["preserve"], data["update"])


@dataclass(frozen=True)
class Problem:
    """One forgetting problem in feature form (float64 arrays)."""

    M: np.ndarray  # [width, embed] base projection, y = x @ M
    X_f: np.ndarray  # [n_f, width] features of the forget prompts
    T: np.ndarray  # [n_f, embed] where the forget prompts must go (bias subtracted)
    X_p: np.ndarray  # [n_p, width] features of the preserve prompts
    Y_p: np.ndarray  # [n_p, embed] where they must stay (normally X_p @ M)
    weights: Weights
    rank: int | None = None  # None: the solver's default
    seed: int = 0
    n_preserve: int | None = None  # preserve rows that count for per-row means (extra weighted rows don't)

    def __post_init__(self) -> None:
        width, embed = self.M.shape
        if self.X_f.ndim != 2 or self.X_f.shape[1] != width or self.T.shape != (self.X_f.shape[0], embed):
            raise ValueError(f"forget features {self.X_f.shape} / targets {self.T.shape} do not fit M {self.M.shape}")
        if self.X_p.shape[1:] != (width,) or self.Y_p.shape != (self.X_p.shape[0], embed):
            raise ValueError(f"preserve features {self.X_p.shape} / outputs {self.Y_p.shape} do not fit M {self.M.shape}")
        if self.X_f.shape[0] == 0:
            raise ValueError("no forget rows")

    def with_weights(self, weights: Weights) -> Problem:
        return replace(self, weights=weights)

    def forget_residual(self, delta: np.ndarray | None = None) -> float:
        """``‖T − X_f (M + Δ)‖_F`` (unsquared, as the paper's loss)."""
        m = self.M if delta is None else self.M + delta
        return float(np.linalg.norm(self.T - self.X_f @ m))

    def preserve_residual(self, delta: np.ndarray | None = None) -> float:
        m = self.M if delta is None else self.M + delta
        return float(np.linalg.norm(self.Y_p - self.X_p @ m)) if len(self.X_p) else 0.0


@dataclass
class Solution:
    """A feature-form update ``Δ = up @ down`` and what the solver has to say about it."""

    up: np.ndarray  # [width, rank]
    down: np.ndarray  # [rank, embed]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.up.shape[1])

    def delta(self) -> np.ndarray:
        return self.up.astype(np.float64) @ self.down.astype(np.float64)

    def check_finite(self) -> None:
        if not (np.isfinite(self.up).all() and np.isfinite(self.down).all()):
            raise ForgetpackError("the solver produced non-finite values (NaN or Inf); no patch written")

    def layer(self, projection: Projection) -> Layer:
        """The update as a patch layer on ``projection.target``, in its storage layout."""
        self.check_finite()
        up, down = projection.storage_factors(self.up, self.down)
        return Layer.lowrank(projection.target, up, down)


GROUP = "forgetpack.solvers"


class Solver(Protocol):
    """The interface: defaults, a solve step, and how to push harder when forgetting failed.

    Capabilities the engine reads, declared by every solver class:

    - ``nested_ranks`` (default False): the first ``r`` factor columns of a solution are
      themselves the exact rank-``r`` optimum, so the engine may keep fewer factors when they
      verify as well (a smaller patch).
    - ``uses_background`` (default True): the objective can take the whole vocabulary as extra,
      pre-weighted preserve rows (``Problem.n_preserve`` counts the real preserve rows).
    """

    name: str
    nested_ranks: ClassVar[bool] = False
    uses_background: ClassVar[bool] = True

    def default_weights(self, n_forget_names: int) -> Weights: ...

    def solve(self, problem: Problem) -> Solution: ...

    def strengthen(self, weights: Weights) -> Weights | None:
        """Weights that forget harder, or None if this solver has no such knob."""
        ...


def available_solvers() -> dict[str, metadata.EntryPoint]:
    """Installed solvers by name (entry points of group ``forgetpack.solvers``); imports none."""
    return registry.installed(GROUP, rescan=True)


def find_solver(name: str) -> metadata.EntryPoint:
    """The entry point of solver ``name``, or a one-line error naming the installed ones (the scan is
    remembered: a hardened request builds a dozen requests, one per rank it tries; ``format.registry``)."""
    return registry.find(GROUP, name, "solver")


def get_solver(name: str) -> Solver:
    """A new instance of solver ``name``."""
    return registry.load(GROUP, name, "solver")()  # type: ignore[operator]
