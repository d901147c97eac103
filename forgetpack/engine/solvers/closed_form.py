"""``closed-form``: the exact optimum of the squared objective, in one linear solve.

Squaring the paper's three norms turns forgetting into ridge-regularised least squares in the
update ``Δ`` of ``M`` (feature form, ``y = x @ M``):

    L(Δ) = a‖R_f − X_f Δ‖² + b‖R_p − X_p Δ‖² + c‖Δ‖²,
    R_f = T − X_f M,  R_p = Y_p − X_p M  (zero when Y_p is the base output),
    a = lf / n_f,  b = lp / n_p,  c = lw · mean‖x‖²
    (n_p counts the preserve prompts; the engine's extra vocabulary rows come pre-weighted)

(per-row means, so the weights do not depend on how many prompts there are, and the ridge
is scaled by the features' size, so ``lw`` means the same on every model). Its gradient
vanishes at

    G Δ* = a X_fᵀ R_f + b X_pᵀ R_p,   G = a X_fᵀX_f + b X_pᵀX_p + c I,

and since ``L(Δ) = ‖Lᵀ(Δ − Δ*)‖² + const`` for ``G = LLᵀ``, the best update of rank ≤ r is
``L⁻ᵀ · SVD_r(Lᵀ Δ*)`` (Eckart–Young in the metric ``G``). With ``R_p = 0`` the right-hand
side has rank ≤ n_f, so the exact optimum already has rank ≤ the number of forget rows.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from forgetpack.engine.solvers import Problem, Solution, Weights
from forgetpack.format.recent import Recent

RANK_TOL = 1e-9  # singular values below this fraction of the largest are numerical noise


class ClosedFormSolver:
    name = "closed-form"
    nested_ranks = True  # the first r factor columns are the exact rank-r optimum
    uses_background = True

    def default_weights(self, n_forget_names: int) -> Weights:
        return Weights(forget=1.0, preserve=1.0, update=1e-3)

    def strengthen(self, weights: Weights) -> Weights:
        return Weights(forget=weights.forget * 2.0, preserve=weights.preserve, update=weights.update)

    def solve(self, problem: Problem) -> Solution:
        up, down = solve_closed_form(problem)
        forget_out = problem.X_f @ problem.M + (problem.X_f @ up) @ down  # through the factors: cheap
        info = {
            "forget_residual": float(np.linalg.norm(problem.T - forget_out)),
            "initial_forget": problem.forget_residual(),
            "preserve_change": float(np.linalg.norm((problem.X_p @ up) @ down)) if len(problem.X_p) else 0.0,
        }
        return Solution(up, down, info)


def coefficients(problem: Problem) -> tuple[float, float, float]:
    """The per-term coefficients ``a, b, c`` of the squared objective."""
    w = problem.weights
    n_f, n_p = len(problem.X_f), len(problem.X_p)
    rows = np.concatenate([problem.X_f, problem.X_p]) if n_p else problem.X_f
    scale = float(np.mean(np.sum(rows * rows, axis=1)))
    a = w.forget / n_f
    b = w.preserve / max(problem.n_preserve or n_p, 1) if n_p else 0.0
    c = w.update * scale
    return a, b, c


def objective(problem: Problem, delta: np.ndarray) -> float:
    """The squared objective ``L(Δ)`` (what ``closed-form`` minimises exactly)."""
    a, b, c = coefficients(problem)
    m = problem.M + delta
    value = a * np.sum((problem.T - problem.X_f @ m) ** 2) + c * np.sum(delta**2)
    if len(problem.X_p):
        value += b * np.sum((problem.Y_p - problem.X_p @ m) ** 2)
    return float(value)


def solve_closed_form(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """Factors ``up [width, r]``, ``down [r, embed]`` of the optimal update of rank ≤ ``problem.rank``.

    Computed without any width×width decomposition (one linear solve): the right-hand side is
    ``Xᵀ C`` with few rows ``X`` (the forget rows, plus the preserve rows only if their targets
    differ from the base output), so ``Δ* = A C`` with ``A = G⁻¹Xᵀ``. For ``G = LLᵀ``,
    ``LᵀA = U₀ Λ^½ Vᵀ`` where ``K = X G⁻¹ Xᵀ = V Λ Vᵀ`` is tiny, hence
    ``LᵀΔ* = U₀ · SVD(Λ^½ Vᵀ C)`` and the rank-r optimum ``L⁻ᵀ SVD_r(LᵀΔ*)`` is
    ``A V Λ^-½ U_c,r S_r V_c,rᵀ``: a few small matrices.
    """
    digests = {name: _digest(getattr(problem, name)) for name in ("M", "X_f", "T", "X_p", "Y_p")}
    key = (repr((problem.weights, problem.n_preserve)), *digests.values())
    found = _DECOMPOSITIONS.get(key, lambda: _decompose(problem, digests))
    lifted, Uc, S, Vct = found
    nonzero = int(np.sum(S > RANK_TOL * max(S[0], 1e-300))) if S.size else 0
    r = max(1, min(nonzero, problem.rank or nonzero))
    root = np.sqrt(S[:r])
    up = lifted @ (Uc[:, :r] * root)
    return up, root[:, None] * Vct[:r]


# What recent solves computed, by the digests of their arrays. Hardening solves one problem at
# several ranks (its rank ladder starts every rank from the same two contexts), and the rank only
# truncates the last SVD; its rounds change the forget rows or the preserve rows' weights, rarely
# both, so each Gram matrix recurs. Every entry is computed exactly as without the cache.
MAX_KEPT = 8
_DECOMPOSITIONS: Recent[Any] = Recent(MAX_KEPT)  # rank-independent part of a solve
_GRAMS: Recent[np.ndarray] = Recent(MAX_KEPT)  # Xᵀ X of a row block
_RESIDUALS: Recent[bool] = Recent(MAX_KEPT)  # whether Y_p = X_p M exactly (the usual preserve target)


def _digest(array: np.ndarray) -> bytes:
    """sha1 of an array's dtype, shape and bytes: a cache key, not a signature (about 2 GB/s)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha1(repr((array.dtype.str, array.shape)).encode(), usedforsecurity=False)
    h.update(array.tobytes() if array.size == 0 else memoryview(array).cast("B"))
    return h.digest()


def _decompose(problem: Problem, digests: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``A V Λ^-½`` and the SVD of ``Λ^½ Vᵀ C`` (see ``solve_closed_form``)."""
    a, b, c = coefficients(problem)
    X_f, X_p, M = problem.X_f, problem.X_p, problem.M
    G = a * _GRAMS.get(digests["X_f"], lambda: X_f.T @ X_f) + c * np.eye(M.shape[0])
    X, C = X_f, a * (problem.T - X_f @ M)
    if len(X_p):
        G += b * _GRAMS.get(digests["X_p"], lambda: X_p.T @ X_p)
        residual = (digests["Y_p"], digests["X_p"], digests["M"])
        if not _RESIDUALS.get(residual, lambda: not np.any(problem.Y_p - X_p @ M != 0)):
            X, C = np.concatenate([X, X_p]), np.concatenate([C, b * (problem.Y_p - X_p @ M)])
    A = np.linalg.solve(G, X.T)  # [width, n]
    K = X @ A
    lam, V = np.linalg.eigh((K + K.T) / 2)
    keep = lam > RANK_TOL * max(lam.max(), 1e-300)
    lam, V = lam[keep], V[:, keep]
    small = (np.sqrt(lam)[:, None] * V.T) @ C  # Λ^½ Vᵀ C
    Uc, S, Vct = np.linalg.svd(small, full_matrices=False)
    return A @ (V / np.sqrt(lam)), Uc, S, Vct
