"""Preserve sets: the names whose embeddings must not move, and the aliases that must.

Forgetting changes a shared projection, so it disturbs most what lies nearest the forgotten
class. The automatic preserve set therefore holds, for each forget name, its ``k`` nearest
vocabulary names in the model's own text space, measured where the solver works: the cosine of
the pre-projection bare-name features after subtracting the vocabulary's mean feature (random-init
and real towers alike put every prompt in one narrow cone; centring removes that shared part).

An *alias* is a name so close to a forget name that preserving it would undo the forgetting
("7" for "seven"): the solver would have to keep one point fixed while moving an almost
identical one away. A centred cosine of at least ``ALIAS_THRESHOLD`` marks an alias. Measured: on MiniLM (``mini``) "seven" vs "7" 0.91,
"seven." 0.89, "sevens" 0.86, but "six" 0.75 and "the number seven" 0.77; among the 1,000
ImageNet names of a random-init ViT-B-32 or RN50 no two distinct names exceed 0.66 at the
99.99th percentile. Aliases are reported and never preserved; the user may forget them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

ALIAS_THRESHOLD = 0.85
DEFAULT_AUTO_K = 20
DEFAULT_NEIGHBOURS = 10


@dataclass
class Neighbourhood:
    """Where the forget names sit: their neighbours, their aliases, and the preserve set."""

    preserve: list[str]
    neighbours: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # forget -> nearest names, cosine
    aliases: dict[str, list[tuple[str, float]]] = field(default_factory=dict)  # forget -> aliases, centred cosine
    dropped: list[str] = field(default_factory=list)  # explicit preserve names left out as aliases

    def alias_names(self) -> list[str]:
        return list(dict.fromkeys(n for pairs in self.aliases.values() for n, _ in pairs))


def unit_rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def find_neighbourhood(
    forget: Sequence[str],
    forget_features: np.ndarray,
    pool: Sequence[str],
    pool_features: np.ndarray,
    center: np.ndarray,
    *,
    k: int | None = DEFAULT_AUTO_K,
    explicit: Sequence[str] | None = None,
    n_neighbours: int = DEFAULT_NEIGHBOURS,
    threshold: float = ALIAS_THRESHOLD,
) -> Neighbourhood:
    """Neighbours, aliases and preserve set of ``forget`` among ``pool`` (which must not contain them).

    ``*_features`` are pre-projection features (bare template), ``center`` the mean feature of
    the vocabulary; nearness is the cosine of centred features. With ``explicit`` the preserve set
    is that list minus its aliases; otherwise the ``k`` nearest non-alias pool names per forget name.
    """
    pool = list(pool)
    sim = closeness = unit_rows(forget_features - center) @ unit_rows(pool_features - center).T
    alias_mask = closeness >= threshold
    aliases = {
        f: [(pool[j], round(float(closeness[i, j]), 4)) for j in np.argsort(-closeness[i]) if alias_mask[i, j]]
        for i, f in enumerate(forget)
    }
    any_alias = alias_mask.any(axis=0)
    neighbours = {}
    for i, f in enumerate(forget):
        order = np.argsort(-sim[i], kind="stable")
        neighbours[f] = [(pool[j], round(float(sim[i, j]), 4)) for j in order[:n_neighbours]]
    if explicit is not None:
        index = {n: j for j, n in enumerate(pool)}
        dropped = [n for n in explicit if n in index and any_alias[index[n]]]
        preserve = [n for n in explicit if n not in dropped]
        return Neighbourhood(preserve, neighbours, {f: a for f, a in aliases.items() if a}, dropped)
    chosen: dict[str, None] = {}
    for i in range(len(forget)):
        taken = 0
        for j in np.argsort(-sim[i], kind="stable"):
            if taken >= (k or 0):
                break
            if any_alias[j]:
                continue
            taken += 1
            chosen.setdefault(pool[j])
    return Neighbourhood(list(chosen), neighbours, {f: a for f, a in aliases.items() if a})
