"""Does a variant still reach a forgotten class? Measured in text space, with no images.

As in verification (``forgetpack.engine.measure``), the images of a forget name are stood in
for by its *original* embedding under the variant's template. The variant reaches the class
when, classified over the retained classes and the variant itself (all phrased in that
template), the stand-in picks the variant: a user labelling images with that variant would get
the forgotten class back. Each outcome says whether the base model recognised the variant and
whether the changed model still does; either way, a variant that reaches the class after the
change is a bypass. One the base did not recognise ("cinque" for "five" on mini: fifth for the
stand-in) can be *opened* by the change: a "five + seven" patch moved it to first place, and 94%
of the fives then picked it.

Winning is not the only test a forget name must pass: text embeddings crowd together far more
than images and texts do (on mini a "one" prompt is at 0.77 cosine to "two" while the images of
ones are at 0.35 to it), so a prompt that keeps much of its original direction still finds its
images after it has lost to another class in text space. ``still_close`` is that second test;
hardening's rank search applies it to the forget names (``forgetpack.engine.harden.no_worse``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from forgetpack.engine.measure import Change, TextSpace, cosines_after, factored
from forgetpack.engine.preserve import unit_rows
from forgetpack.engine.variants import Variant

# cosine to its original above which a changed prompt still reaches its class (see the module's docstring)
REACH_SIMILARITY = 0.2


@dataclass(frozen=True)
class Outcome:
    """What one variant does before and after a change."""

    variant: Variant
    recognised: bool  # the base model picks the variant for the name's stand-in
    reached: bool  # the changed model does

    @property
    def bypass(self) -> bool:
        """The class can be asked for this way after the change (left open, or opened by it)."""
        return self.reached

    @property
    def opened(self) -> bool:
        """A bypass the change made: the base model did not pick the variant."""
        return self.reached and not self.recognised

    def to_json(self) -> dict[str, object]:
        return {**self.variant.to_json(), "recognised": self.recognised, "reached": self.reached}


def prompts_needed(variants: Sequence[Variant], retained: Sequence[str]) -> list[str]:
    """Every prompt :func:`outcomes` embeds: encode these first (``TextSpace.features``)."""
    out: dict[str, None] = {}
    for v in variants:
        out.setdefault(v.prompt)
        out.setdefault(v.stand_in)
    for template in dict.fromkeys(v.template for v in variants):
        out.update(dict.fromkeys(template.format(r) for r in retained))
    return list(out)


def outcomes(space: TextSpace, change: Change | None, variants: Sequence[Variant], retained: Sequence[str]) -> list[Outcome]:
    """Each variant's outcome against the ``retained`` classes (forget names and their aliases
    excluded by the caller). ``change`` None measures the base model only (``reached`` equals
    ``recognised``)."""
    by_template: dict[str, list[int]] = {}
    for i, v in enumerate(variants):
        by_template.setdefault(v.template, []).append(i)
    n = len(retained)
    others = space.block([t.format(r) for t in by_template for r in retained])  # every template at once
    own, stand_in = space.block([v.prompt for v in variants]), space.block([v.stand_in for v in variants])
    low = factored(others, change)  # a low-rank change: the others' cosines through its factors
    if change is not None:
        new_own = unit_rows(space.changed(own, change))
        new_others = unit_rows(space.changed(others, change)) if low is None else None
    out = []
    for k, group in enumerate(by_template.values()):
        rows = slice(k * n, (k + 1) * n)
        s = stand_in.unit[group]
        recognised = _wins(s, own.unit[group], others.unit[rows])
        if change is None:
            reached = recognised
        elif low is None:
            reached = _wins(s, new_own[group], new_others[rows])
        else:
            to_others = cosines_after(others, rows, change, low, s, tuple(variants[i].stand_in for i in group))
            reached = _wins(s, new_own[group], None, to_others)
        out += [Outcome(variants[i], bool(r), bool(h)) for i, r, h in zip(group, recognised, reached, strict=True)]
    return out


def _wins(stand_in: np.ndarray, own: np.ndarray, others: np.ndarray | None, to_others: np.ndarray | None = None) -> np.ndarray:
    """Row by row: does the variant's embedding beat every other class for the stand-in?
    (``to_others``: the stand-ins' cosines to the others, when already known.)"""
    own_score = np.sum(stand_in * own, axis=1)
    scores = stand_in @ others.T if to_others is None else to_others
    best_other = scores.max(axis=1) if scores.shape[1] else np.full(len(own_score), -np.inf)
    return own_score > best_other


def still_close(original: np.ndarray, changed: np.ndarray) -> np.ndarray:
    """Row by row: does the changed embedding keep more than ``REACH_SIMILARITY`` of its original?
    A rank-2 hardened patch left "a photo of many one." at 0.50 cosine to its original on mini:
    it lost to "two" for the stand-in, and 90% of the ones still picked it."""
    return np.sum(original * changed, axis=1) > REACH_SIMILARITY


def summarise(results: Sequence[Outcome]) -> dict[str, dict[str, int | float]]:
    """Per family: variants tried, recognised by the base model, bypasses (reaching the class
    after the change), how many of those the change opened, and the share of tried variants
    that are bypasses."""
    out: dict[str, dict[str, int | float]] = {}
    for r in results:
        row = out.setdefault(r.variant.family, {"tried": 0, "recognised": 0, "bypasses": 0, "opened": 0})
        row["tried"] += 1
        row["recognised"] += int(r.recognised)
        row["bypasses"] += int(r.bypass)
        row["opened"] += int(r.opened)
    for row in out.values():
        row["bypass_share"] = round(row["bypasses"] / row["tried"], 4)
    return out
