"""``paper``: the official LoRA/Adam loop of Kravets & Namboodiri (TMLR 2025), faithfully.

The official code wraps the text projection in a loralib ``Linear`` (rank 5, ``lora_alpha``
1, so the LoRA branch is scaled by ``s = 1/5``; ``A`` kaiming-uniform, ``B`` zero) and runs
full-batch Adam (lr 0.01) for 2000 steps on

    L = lf·‖T − X_f W'ᵀ‖ + lp·‖Y_p − X_p W'ᵀ‖ + lw·‖BA‖,   W' = W + s·BA   (Frobenius, unsquared)

If the forget term dropped by less than 70% it adds 0.05 to lf and retries with a fresh LoRA
(at most 100 tries). Details kept from the original:

- the forward is loralib's: ``x Wᵀ + s·(x Aᵀ) Bᵀ`` (the merged ``W'`` is never formed while
  training);
- the kept weights are those of the *last forward pass*: the original's ``best_loss`` is never
  updated, so its "best" snapshot is taken at every step, before that step's update;
- the reduction is ``|initial − final| / initial`` of the forget term.

It runs in float32 like the original. Only the seed source differs: ``A`` is drawn from a
generator seeded with ``Problem.seed`` (the original draws from the global RNG after other
initialisations), which makes the loop reproducible on its own.
"""

from __future__ import annotations

import math

import numpy as np

from forgetpack.engine.solvers import Problem, Solution, Weights

RANK = 5
LORA_ALPHA = 1.0
LR = 0.01
STEPS = 2000
REDUCTION_THRESHOLD = 0.7
FORGET_STEP = 0.05
MAX_TRIES = 100


class PaperSolver:
    name = "paper"
    nested_ranks = False  # a LoRA of fixed rank, trained as a whole
    uses_background = False  # the paper's objective and weights know only the preserve set

    def __init__(self, steps: int = STEPS, max_tries: int = MAX_TRIES) -> None:
        self.steps = steps
        self.max_tries = max_tries

    def default_weights(self, n_forget_names: int) -> Weights:
        """The paper's defaults: lp 0.4, lf 1.3 for one class; lp 0.3, lf 1.1 for several."""
        return Weights(forget=1.3, preserve=0.4, update=1.0) if n_forget_names <= 1 else Weights(forget=1.1, preserve=0.3, update=1.0)

    def strengthen(self, weights: Weights) -> Weights:
        return Weights(forget=weights.forget * 1.5, preserve=weights.preserve, update=weights.update)

    def solve(self, problem: Problem) -> Solution:
        up, down, info = paper_loop(problem, steps=self.steps, max_tries=self.max_tries)
        return Solution(up, down, info)


def paper_loop(problem: Problem, steps: int = STEPS, max_tries: int = MAX_TRIES, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """Run the official loop; returns feature-form factors (``Δ = up @ down``) and a log.

    One thread: the matrices are small, and with several threads the per-op synchronisation
    costs more than the arithmetic (measured 25-90x slower on a busy 2-core machine).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _loop(problem, steps, max_tries, rank)
    finally:
        torch.set_num_threads(threads)


def _loop(problem: Problem, steps: int, max_tries: int, rank: int | None) -> tuple[np.ndarray, np.ndarray, dict]:
    import torch

    r = rank or problem.rank or RANK
    scale = LORA_ALPHA / r
    W = torch.tensor(problem.M.T, dtype=torch.float32)  # nn.Linear weight [embed, width]
    x_f = torch.tensor(problem.X_f, dtype=torch.float32)
    x_p = torch.tensor(problem.X_p, dtype=torch.float32)
    target = torch.tensor(problem.T, dtype=torch.float32)
    keep = torch.tensor(problem.Y_p, dtype=torch.float32)
    base_f = x_f @ W.T  # loralib computes F.linear(x, W) each step; W is frozen, so this is the same value
    base_p = x_p @ W.T
    generator = torch.Generator().manual_seed(int(problem.seed))
    lf, lp, lw = problem.weights.forget, problem.weights.preserve, problem.weights.update

    initial = torch.linalg.norm(target - base_f).item()
    tries = []
    for _ in range(max_tries):
        A = torch.empty(r, W.shape[1])
        torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=generator)
        A.requires_grad_(True)
        B = torch.zeros(W.shape[0], r, requires_grad=True)
        optimizer = torch.optim.Adam([A, B], lr=LR)
        for _step in range(steps):
            out_p = base_p + (x_p @ A.T) @ B.T * scale
            out_f = base_f + (x_f @ A.T) @ B.T * scale
            forget_term = torch.linalg.norm(target - out_f)
            preserve_term = torch.linalg.norm(keep - out_p)
            update_term = torch.linalg.norm(B @ A)
            loss = lf * forget_term + lp * preserve_term + lw * update_term
            kept_A, kept_B = A.detach().clone(), B.detach().clone()  # the original's snapshot, taken every step
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        with torch.no_grad():
            final = torch.linalg.norm(target - (base_f + x_f @ (scale * kept_B @ kept_A).T)).item()
        reduction = abs(initial - final) / initial if initial > 0 else 1.0
        tries.append({"forget_weight": lf, "loss": loss.item(), "forget_term": forget_term.item(),
                      "preserve_term": preserve_term.item(), "update_term": update_term.item(),
                      "final_forget": final, "reduction": reduction})
        if reduction >= REDUCTION_THRESHOLD:
            break
        lf += FORGET_STEP
    up = (scale * kept_A.T).double().numpy()  # Δ (feature form) = (s·BA)ᵀ = (s·Aᵀ) @ Bᵀ
    down = kept_B.T.double().numpy()
    info = {"tries": len(tries), "final_forget_weight": tries[-1]["forget_weight"], "initial_forget": initial,
            "criterion_met": tries[-1]["reduction"] >= REDUCTION_THRESHOLD, "log": tries[-1]}
    return up, down, info
