"""Solvers against independent references: the official loop re-written plainly, and brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from forgetpack.engine.projections import Projection
from forgetpack.engine.solvers import Problem, Solution, Weights, available_solvers, get_solver
from forgetpack.engine.solvers.closed_form import ClosedFormSolver, objective, solve_closed_form
from forgetpack.engine.solvers.nullspace import NullspaceSolver
from forgetpack.engine.solvers.paper import PaperSolver
from forgetpack.format.errors import ForgetpackError


@pytest.fixture(autouse=True)
def one_thread():
    """Small matrices: one thread is much faster than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_problem(seed: int, width: int = 12, embed: int = 8, n_f: int = 2, n_p: int = 6, weights: Weights | None = None,
                   rank: int | None = None) -> Problem:
    rng = np.random.default_rng(seed)
    M = rng.normal(size=(width, embed)) / math.sqrt(width)
    X_f = rng.normal(size=(n_f, width))
    X_p = rng.normal(size=(n_p, width))
    T = rng.normal(size=(n_f, embed))
    T /= np.linalg.norm(T, axis=1, keepdims=True)
    return Problem(M, X_f, T, X_p, X_p @ M, weights or Weights(1.3, 0.4, 1.0), rank=rank, seed=seed)


# ---------------------------------------------------------------------------- paper


class LoraLinear(torch.nn.Module):
    """loralib's ``Linear`` as the official code uses it (r=5, lora_alpha=1, no dropout)."""

    def __init__(self, weight: torch.Tensor, r: int, generator: torch.Generator) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone(), requires_grad=False)
        self.lora_A = torch.nn.Parameter(torch.empty(r, weight.shape[1]))
        self.lora_B = torch.nn.Parameter(torch.zeros(weight.shape[0], r))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.scaling = 1.0 / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def merged(self) -> torch.Tensor:
        return self.weight + (self.lora_B @ self.lora_A) * self.scaling


def official_loop(problem: Problem, steps: int, max_tries: int) -> dict:
    """The official training loop, written out plainly (the reference for ``paper``)."""
    W = torch.tensor(problem.M.T, dtype=torch.float32)
    change_hooks = torch.tensor(problem.X_f, dtype=torch.float32)
    preserve_hooks = torch.tensor(problem.X_p, dtype=torch.float32)
    proj_into = torch.tensor(problem.T, dtype=torch.float32)
    preserve_output = torch.tensor(problem.Y_p, dtype=torch.float32)
    lamb_forget, lamb_preserve, lamb_weight = problem.weights.forget, problem.weights.preserve, problem.weights.update
    generator = torch.Generator().manual_seed(problem.seed)
    tries = 0
    for _ in range(max_tries):
        tries += 1
        used_forget = lamb_forget
        layer = LoraLinear(W, 5, generator)
        optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.01)
        with torch.no_grad():
            initial = torch.norm(proj_into - layer(change_hooks), p=2)
        best_loss = np.inf
        for _epoch in range(steps):
            new_preserve_output = layer(preserve_hooks)
            new_forget_output = layer(change_hooks)
            weight_loss = torch.norm((layer.lora_B @ layer.lora_A).T, p=2)
            loss = lamb_forget * torch.norm(proj_into - new_forget_output, p=2) + \
                lamb_preserve * torch.norm(preserve_output - new_preserve_output, p=2) + lamb_weight * weight_loss
            if loss < best_loss:  # never updated in the original: the snapshot is taken at every step
                best_weights = layer.merged().detach().clone()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            final = torch.norm(proj_into - change_hooks @ best_weights.T, p=2)
            reduction = (initial - final).abs() / initial
        if reduction < 0.7:
            lamb_forget += 0.05
            continue
        break
    return {"weights": best_weights.double().numpy(), "loss": loss.item(), "tries": tries, "forget_weight": used_forget,
            "final": final.item(), "reduction": reduction.item()}


@pytest.mark.parametrize("seed", [0, 1])
def test_paper_matches_the_official_loop(seed: int) -> None:
    problem = random_problem(seed, width=24, embed=16, n_f=2, n_p=8)
    reference = official_loop(problem, steps=400, max_tries=100)
    solution = PaperSolver(steps=400).solve(problem)
    log = solution.info["log"]
    assert solution.rank == 5
    assert solution.info["tries"] == reference["tries"]
    assert log["forget_weight"] == pytest.approx(reference["forget_weight"])
    assert log["loss"] == pytest.approx(reference["loss"], rel=1e-4)
    assert log["final_forget"] == pytest.approx(reference["final"], rel=1e-4)
    assert log["reduction"] == pytest.approx(reference["reduction"], rel=1e-4)
    np.testing.assert_allclose(problem.M + solution.delta(), reference["weights"].T, atol=2e-5)


def test_paper_retry_rule_raises_the_forget_weight() -> None:
    # a heavy preserve weight and few steps: the forget term cannot drop by 70%, so every try fails
    problem = random_problem(3, weights=Weights(1.3, 50.0, 1.0))
    reference = official_loop(problem, steps=30, max_tries=3)
    solution = PaperSolver(steps=30, max_tries=3).solve(problem)
    assert reference["tries"] == solution.info["tries"] == 3
    assert solution.info["final_forget_weight"] == pytest.approx(1.3 + 2 * 0.05)
    assert not solution.info["criterion_met"]
    assert solution.info["log"]["loss"] == pytest.approx(reference["loss"], rel=1e-4)


def test_paper_defaults_are_the_papers() -> None:
    solver = PaperSolver()
    assert solver.default_weights(1) == Weights(1.3, 0.4, 1.0)
    assert solver.default_weights(3) == Weights(1.1, 0.3, 1.0)


# ---------------------------------------------------------------------------- closed form


def brute_objective(problem: Problem, delta: np.ndarray) -> float:
    """The squared objective written out independently of the solver module."""
    n_f, n_p = len(problem.X_f), len(problem.X_p)
    rows = np.vstack([problem.X_f, problem.X_p])
    scale = np.mean(np.sum(rows**2, axis=1))
    w = problem.weights
    m = problem.M + delta
    return (w.forget / n_f * np.sum((problem.T - problem.X_f @ m) ** 2)
            + w.preserve / n_p * np.sum((problem.Y_p - problem.X_p @ m) ** 2)
            + w.update * scale * np.sum(delta**2))


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_is_the_least_squares_optimum(seed: int) -> None:
    problem = random_problem(seed, width=6, embed=5, n_f=2, n_p=4, weights=Weights(1.0, 0.7, 1e-2))
    up, down = solve_closed_form(problem)
    delta = up @ down
    # brute force: the same problem as one stacked least-squares system, solved column by column
    n_f, n_p = len(problem.X_f), len(problem.X_p)
    scale = np.mean(np.sum(np.vstack([problem.X_f, problem.X_p]) ** 2, axis=1))
    w = problem.weights
    A = np.vstack([math.sqrt(w.forget / n_f) * problem.X_f, math.sqrt(w.preserve / n_p) * problem.X_p,
                   math.sqrt(w.update * scale) * np.eye(6)])
    B = np.vstack([math.sqrt(w.forget / n_f) * (problem.T - problem.X_f @ problem.M),
                   math.sqrt(w.preserve / n_p) * (problem.Y_p - problem.X_p @ problem.M), np.zeros((6, 5))])
    expected, *_ = np.linalg.lstsq(A, B, rcond=None)
    np.testing.assert_allclose(delta, expected, atol=1e-10)
    assert objective(problem, delta) == pytest.approx(brute_objective(problem, delta), rel=1e-12)
    assert up.shape[1] <= n_f  # the optimum's rank is at most the number of forget rows


@pytest.mark.parametrize("seed,rank", [(0, 1), (1, 1), (2, 2)])
def test_closed_form_rank_constrained_beats_brute_force(seed: int, rank: int) -> None:
    from scipy.optimize import minimize

    problem = random_problem(seed, width=5, embed=4, n_f=3, n_p=3, weights=Weights(1.0, 0.5, 1e-2), rank=rank)
    up, down = solve_closed_form(problem)
    assert up.shape[1] == rank
    best_closed = brute_objective(problem, up @ down)

    def f(params: np.ndarray) -> float:
        u = params[: 5 * rank].reshape(5, rank)
        v = params[5 * rank :].reshape(rank, 4)
        return brute_objective(problem, u @ v)

    rng = np.random.default_rng(seed)
    found = min(minimize(f, rng.normal(size=9 * rank), method="BFGS", options={"gtol": 1e-10}).fun for _ in range(12))
    assert best_closed <= found + 1e-9
    assert found == pytest.approx(best_closed, rel=1e-6)


def test_closed_form_without_preserve_and_solver_info() -> None:
    problem = random_problem(5, n_p=0)
    solution = ClosedFormSolver().solve(problem)
    assert solution.info["forget_residual"] < solution.info["initial_forget"]
    assert solution.info["preserve_change"] == 0.0


# ---------------------------------------------------------------------------- nullspace


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_nullspace_leaves_preserve_exactly_and_moves_forget(alpha: float) -> None:
    problem = random_problem(7, width=16, embed=12, n_f=2, n_p=4, weights=Weights(alpha, 1.0, 0.0))
    solution = NullspaceSolver().solve(problem)
    delta = solution.delta()
    np.testing.assert_allclose(problem.X_p @ delta, 0.0, atol=1e-10)
    y = problem.X_f @ problem.M
    y_new = problem.X_f @ (problem.M + delta)
    basis = np.linalg.svd(problem.Y_p / np.linalg.norm(problem.Y_p, axis=1, keepdims=True), full_matrices=False)[2]
    inside = (y @ basis.T) @ basis  # the part of each forget embedding in the preserve span is kept
    np.testing.assert_allclose(y_new, inside - (alpha - 1.0) * (y - inside), atol=1e-10)
    assert NullspaceSolver().strengthen(Weights(1.0, 1.0, 0.0)) == Weights(2.0, 1.0, 0.0)
    assert NullspaceSolver().strengthen(Weights(2.0, 1.0, 0.0)) is None


def test_nullspace_fails_clearly_inside_the_preserve_span() -> None:
    problem = random_problem(8, width=6, embed=4, n_f=1, n_p=6)
    with pytest.raises(ForgetpackError, match="span of the preserve"):
        NullspaceSolver().solve(problem)


# ---------------------------------------------------------------------------- the shared interface


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_solution_layer_has_the_same_delta_in_either_layout(layout: str) -> None:
    problem = random_problem(9)
    solution = get_solver("closed-form").solve(problem)
    proj = Projection("w", layout, "test")
    stored = problem.M if layout == "in_out" else problem.M.T
    layer = solution.layer(proj)
    np.testing.assert_allclose(proj.feature_form(layer.delta()), solution.delta(), atol=1e-5)
    assert layer.up.dtype == np.float32 and layer.delta().shape == stored.shape


def test_non_finite_solutions_are_refused() -> None:
    bad = Solution(np.full((3, 1), np.nan), np.ones((1, 2)))
    with pytest.raises(ForgetpackError, match="non-finite"):
        bad.layer(Projection("w", "in_out", "test"))


def test_unknown_solver() -> None:
    with pytest.raises(ForgetpackError, match="unknown solver 'magic' .installed: closed-form, nullspace, paper"):
        get_solver("magic")


def test_solvers_register_by_entry_point_and_declare_their_capabilities() -> None:
    found = available_solvers()
    assert {"closed-form", "paper", "nullspace"} <= set(found)
    for name, cls in (("closed-form", ClosedFormSolver), ("paper", PaperSolver), ("nullspace", NullspaceSolver)):
        assert found[name].load() is cls and isinstance(get_solver(name), cls) and cls.name == name
        # set on the class itself, not inherited from the protocol's documented defaults
        assert isinstance(vars(cls)["nested_ranks"], bool) and isinstance(vars(cls)["uses_background"], bool)
    assert ClosedFormSolver.nested_ranks and ClosedFormSolver.uses_background
    assert not PaperSolver.uses_background and not NullspaceSolver.uses_background
