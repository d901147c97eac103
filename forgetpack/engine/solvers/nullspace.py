"""``nullspace``: the CCUP baseline (Mishra et al., 2025), on the text projection.

CCUP erases a class by projecting the directions of its text embeddings out of the final
projection: with ``U`` an orthonormal basis of those directions, ``M' = M (I − α U Uᵀ)``.
Taken literally on the text side this sends each forget embedding to ``(1 − α)·y``: the same
direction (nothing forgotten under cosine similarity) or, at α = 1, the zero vector (an
undefined direction). The "consistent" variant used here first removes from the forget
directions everything in the span of the preserve embeddings, so that preserve embeddings are
left exactly unchanged, and ``U`` spans only what is unique to the forget classes:

    U = orth((I − P_p) E_fᵀ),   Δ = −α M U Uᵀ   (rank = number of independent forget directions)

α = 1 removes the unique part (the forget embedding falls into the preserve span); the
``strengthen`` step uses α = 2, which reflects it. The solver's ``forget`` weight is α.
"""

from __future__ import annotations

import numpy as np

from forgetpack.engine.solvers import Problem, Solution, Weights
from forgetpack.format.errors import ForgetpackError

SPAN_TOL = 1e-6


class NullspaceSolver:
    name = "nullspace"
    nested_ranks = False  # its columns are forget directions, not nested optima
    uses_background = False  # a 1,000-name preserve span would leave no direction to remove

    def default_weights(self, n_forget_names: int) -> Weights:
        return Weights(forget=1.0, preserve=1.0, update=0.0)

    def strengthen(self, weights: Weights) -> Weights | None:
        return Weights(forget=2.0, preserve=weights.preserve, update=weights.update) if weights.forget < 2.0 else None

    def solve(self, problem: Problem) -> Solution:
        alpha = problem.weights.forget
        E_f = _unit_rows(problem.X_f @ problem.M)
        residual = E_f.T  # [embed, n_f]
        if len(problem.Y_p):
            E_p = _unit_rows(problem.Y_p)
            _, s, vt = np.linalg.svd(E_p, full_matrices=False)
            basis = vt[s > SPAN_TOL * s[0]].T  # [embed, k] orthonormal span of the preserve embeddings
            residual = residual - basis @ (basis.T @ residual)
        u, s, _ = np.linalg.svd(residual, full_matrices=False)
        if not s.size or s[0] < 1e-8:
            raise ForgetpackError("nullspace: the forget embeddings lie inside the span of the preserve embeddings; preserve fewer names or use another solver")
        keep = s > SPAN_TOL * s[0]
        if problem.rank:
            keep[problem.rank :] = False
        U = u[:, keep]  # [embed, k]
        up = -alpha * (problem.M @ U)
        down = U.T
        delta = up @ down
        info = {"alpha": alpha, "directions": int(U.shape[1]), "forget_residual": problem.forget_residual(delta),
                "initial_forget": problem.forget_residual(), "preserve_residual": problem.preserve_residual(delta)}
        return Solution(up, down, info)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
