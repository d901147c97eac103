"""Where forget prompts are sent (forgetpack.engine.targets): the default mirror lands at most orthogonal."""

from __future__ import annotations

import numpy as np

from forgetpack.engine.models import load_model
from forgetpack.engine.solve import forget
from forgetpack.engine.targets import _at_most_orthogonal


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_a_target_is_turned_at_most_orthogonal_and_keeps_the_original_norm() -> None:
    rng = np.random.default_rng(0)
    original = rng.normal(size=(6, 16)) * np.array([[1.0], [2.0], [5.0], [0.5], [3.0], [1.5]])
    target = np.concatenate([original[:3] + 0.3 * rng.normal(size=(3, 16)), -original[3:] + rng.normal(size=(3, 16))])
    before = _cosines(target, original)
    turned = _at_most_orthogonal(target, original)
    after = _cosines(turned, original)
    assert (before[:3] > 0.5).all() and np.allclose(after[:3], 0.0, atol=1e-12)  # pointed along: now orthogonal
    assert (before[3:] < 0).all() and np.allclose(after[3:], before[3:])  # already away: direction kept
    assert np.allclose(np.linalg.norm(turned, axis=1), np.linalg.norm(original, axis=1))
    along = _at_most_orthogonal(2 * original[:2], original[:2])  # nothing left after the turn: opposite, not zero
    assert np.allclose(along, -original[:2])


def test_the_default_target_sends_the_forget_name_at_most_orthogonal_not_opposite() -> None:
    """The default is ``mirror``: the forgotten name ends near cosine 0 to where it was (the antipode
    sent it to about -0.85), and the other candidates keep their class."""
    result = forget(load_model("mini"), ["cat"])
    assert result.patch.recipe["target"] == "mirror"
    effect = result.report["effect"]
    assert effect["all_outranked"] and effect["lost"] == {}
    assert -0.3 < effect["forget"]["cat"]["self_similarity"] <= 0.05
