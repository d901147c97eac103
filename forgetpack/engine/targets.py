"""Where each forget prompt should land after the patch.

- ``mirror`` (default): its reflection through the mean direction of the other candidates
  (same template): what every class shares is kept, what distinguishes this one is negated,
  and never less than orthogonal to the original; the norm is kept.
- ``antipode``: minus its own original embedding.
- ``empty``: the paper's, the normalised embedding of the empty string, re-drawn with N(0, 0.5)
  noise while its nearest candidate class is a forget class.

``target_norm`` says whether the target is a unit vector (the paper) or carries the prompt's
original norm (the default: a unit target among embeddings of norm ~20 is mostly reached by
shrinking, which keeps the direction, so cosine classification still recognises the class;
see docs/engine.md for the numbers). ``antipode`` and ``mirror`` keep the norm either way.
"""

from __future__ import annotations

import numpy as np

from forgetpack.engine.measure import SolveContext
from forgetpack.engine.preserve import unit_rows
from forgetpack.format.errors import ForgetpackError

EMPTY_NOISE = 0.5  # the paper's re-draw noise for the empty-string target
EMPTY_MAX_DRAWS = 1000


def forget_targets(ctx: SolveContext, target: str, norm: str, seed: int) -> np.ndarray:
    """One target row per forget prompt (template-major, like the forget features)."""
    original = ctx.space.embed(ctx.prompts(ctx.forget))
    if target == "antipode":
        return -original
    if target == "mirror":
        return _mirror(ctx, original)
    return _empty(ctx, original, norm, seed)


def _mirror(ctx: SolveContext, original: np.ndarray) -> np.ndarray:
    """Reflect through the other candidates' mean direction, then take away what still points
    along the original (a class that resembles the mean, such as "dog", reflects to a positive
    cosine, and 2 of its 9 drawings stayed found on mini). A prompt lands at cosine ≤ 0 to where it
    was rather than at −1 (the antipode), a shorter move, and the update carries other prompts
    along less: docs/engine.md, "Targets", has the numbers on mini's everyday objects."""
    others = [c for c in ctx.candidates if c not in set(ctx.forget)]
    n = len(ctx.forget)
    rows = []
    for k, t in enumerate(ctx.templates):
        y = original[k * n : (k + 1) * n]  # this template's rows (template-major)
        mean = ctx.space.embed([t.format(c) for c in others]).mean(axis=0) if others else y.mean(axis=0)
        u = mean / max(float(np.linalg.norm(mean)), 1e-12)
        rows.append(2 * (y @ u)[:, None] * u[None, :] - y)
    return _at_most_orthogonal(np.concatenate(rows), original)


def _at_most_orthogonal(target: np.ndarray, original: np.ndarray) -> np.ndarray:
    """``target`` without its positive component along ``original`` (row by row), at the original's
    norm. A row left with nothing (a target along the original: no other candidate to reflect
    through) goes opposite the original instead of to zero."""
    unit = unit_rows(original)
    turned = target - np.maximum((target * unit).sum(axis=1, keepdims=True), 0.0) * unit
    empty = np.linalg.norm(turned, axis=1) <= 1e-9 * np.linalg.norm(target, axis=1)
    turned[empty] = -unit[empty]
    return unit_rows(turned) * np.linalg.norm(original, axis=1, keepdims=True)


def _empty(ctx: SolveContext, original: np.ndarray, norm: str, seed: int) -> np.ndarray:
    """The normalised empty-string embedding, re-drawn while a forget class is nearest to it."""
    rows = np.repeat(ctx.space.embed([""]), len(original), axis=0)
    cand = unit_rows(ctx.space.embed(ctx.prompts(ctx.candidates)))
    is_forget = np.isin(np.tile(np.asarray(ctx.candidates, dtype=object), len(ctx.templates)), list(ctx.forget))
    rng = np.random.default_rng(seed)
    unit = unit_rows(rows)
    for _ in range(EMPTY_MAX_DRAWS):
        nearest = np.argmax(unit @ cand.T, axis=1)
        if not is_forget[nearest].any():
            break
        unit = unit_rows(rows + rng.normal(0.0, EMPTY_NOISE, size=rows.shape))
    else:
        raise ForgetpackError(
            f"the empty-string target stays nearest to a forget class after {EMPTY_MAX_DRAWS} noisy draws; use --target antipode"
        )
    return unit * np.linalg.norm(original, axis=1, keepdims=True) if norm == "original" else unit
