"""Measuring a change of the text projection in text space, with no images at all.

Images are stood in for by each candidate's *original* embedding and classified over the
candidates' *patched* embeddings, template by template: a forget name is *outranked* when some
other candidate now wins for its own stand-in, and every other candidate should keep its class,
each one, under every template: a retained candidate that loses its class is *lost*, whatever the
average. Besides the request's templates, retained candidates are checked under a few held-out
*probe* phrasings (``PROBE_TEMPLATES``) that nothing is solved on: a solve that pins a class down
under five phrasings can still drag it along under a sixth, and images do not use the request's
phrasings (forgetting "two" and "nine" kept every candidate under the five forgetting templates,
lost "one" under four probes, and cost 14 pt of UCI "one" images).
:class:`TextSpace` holds the features and embeddings of every prompt the engine looked at;
:class:`SolveContext` holds it together with the names one request works on, and is what every
step of a solve receives.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.engine.preserve import Neighbourhood, unit_rows
from forgetpack.engine.projections import Projection
from forgetpack.engine.request import Effect, NameEffect
from forgetpack.format.patch import Layer, Patch
from forgetpack.format.recent import Recent

MOVED_MIN = 1e-4  # cosine drift below which a name has not moved
# Held-out phrasings retained candidates are checked under (open_clip's ImageNet templates, none
# of them a forgetting template); never solved on unless a repair adds a lost class under them.
PROBE_TEMPLATES = (
    "a bad photo of the {}.", "a black and white photo of the {}.", "a low resolution photo of the {}.",
    "a pixelated photo of the {}.", "a close-up photo of the {}.", "a cropped photo of the {}.",
    "a drawing of a {}.", "itap of a {}.",
)  # fmt: skip

# A change of the feature-form projection: the whole patched matrix, or the low-rank factors
# ``(up, down)`` of its update (the same numbers, far cheaper on a big vocabulary).
Change = np.ndarray | tuple[np.ndarray, np.ndarray]


MAX_BLOCKS = 64  # prompt lists a TextSpace keeps stacked (a hardened request uses a few dozen)
LOW_RANK = 32  # changes of at most this rank are measured through their factors (``per_template``)
SIMILARITY_BUDGET = 32_000_000  # base similarities a block may keep for that (float64: 256 MB)


@dataclass(frozen=True)
class Block:
    """One list of prompts, stacked once: their features, base embeddings and unit base embeddings.

    Verification and hardening look at the same prompt lists (a template's candidates, the
    grid's variants) through dozens of changes; stacking their rows from the feature dict on
    every look cost a hardened mini request more time than the arithmetic. Read-only."""

    X: np.ndarray  # [n, width] float64 features
    base: np.ndarray  # [n, embed] embeddings through the base projection
    unit: np.ndarray  # base, each row scaled to unit length
    _kept: dict[Any, np.ndarray] = field(default_factory=dict, compare=False)

    def squared(self) -> np.ndarray:
        """Each base row's squared length, kept."""
        if "squared" not in self._kept:
            self._kept["squared"] = _frozen(np.sum(self.base * self.base, axis=1))
        return self._kept["squared"]

    def similar(self, rows: slice, to: np.ndarray | None = None, key: Any = None) -> np.ndarray:
        """``to @ base[rows].T`` (``to``: unit rows named by ``key``; default ``unit[rows]``),
        kept: the part of a low-rank change's cosines that no change alters (``per_template``)."""
        key = (rows.start or 0, rows.stop, key)
        if key not in self._kept:
            self._kept[key] = _frozen((self.unit[rows] if to is None else to) @ self.base[rows].T)
        return self._kept[key]


@dataclass
class TextSpace:
    """Pre-projection features of prompts, and their embeddings through the base projection."""

    features: dict[str, np.ndarray]
    M: np.ndarray  # feature-form base projection, y = x @ M
    bias: np.ndarray | None
    _base: dict[str, np.ndarray] = field(default_factory=dict)  # base embeddings, computed once per prompt
    _blocks: Recent[Block] = field(default_factory=lambda: Recent(MAX_BLOCKS))  # the last MAX_BLOCKS prompt lists

    def features_of(self, prompts: Sequence[str]) -> np.ndarray:
        """Features of ``prompts`` (float64; a copy the caller may change)."""
        return self.block(prompts).X.copy()

    def block(self, prompts: Sequence[str]) -> Block:
        """The stacked :class:`Block` of ``prompts`` (memoised; a prompt's features never change)."""
        key = tuple(prompts)
        return self._blocks.get(key, lambda: self._stack(key))

    def _stack(self, prompts: tuple[str, ...]) -> Block:
        if not prompts:
            return Block(*(_frozen(np.zeros((0, d))) for d in (self.M.shape[0], self.M.shape[1], self.M.shape[1])))
        X = np.stack([self.features[p] for p in prompts]).astype(np.float64)
        todo = list(dict.fromkeys(p for p in prompts if p not in self._base))
        if todo:
            todo_X = X if len(todo) == len(prompts) else np.stack([self.features[p] for p in todo]).astype(np.float64)
            self._base.update(zip(todo, self._project(todo_X, self.M), strict=True))
        base = np.stack([self._base[p] for p in prompts])
        return Block(_frozen(X), _frozen(base), _frozen(unit_rows(base)))

    def embed(self, prompts: Sequence[str], M: np.ndarray | None = None) -> np.ndarray:
        """Embeddings through ``M`` (default: the base projection, memoised)."""
        if M is None:
            return self.block(prompts).base
        return self._project(self.block(prompts).X, M)

    def embed_changed(self, prompts: Sequence[str], change: Change) -> np.ndarray:
        """Embeddings through the projection after ``change``."""
        return self.changed(self.block(prompts), change)

    def changed(self, block: Block, change: Change) -> np.ndarray:
        """A block's embeddings through the projection after ``change``."""
        if isinstance(change, tuple):
            up, down = change
            return block.base + (block.X @ up) @ down
        return self._project(block.X, change)

    def _project(self, X: np.ndarray, M: np.ndarray) -> np.ndarray:
        y = X @ M
        return y + self.bias if self.bias is not None else y


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


@dataclass(frozen=True)
class SolveContext:
    """The names one request works on and the space they live in: what every solve step needs."""

    space: TextSpace
    projection: Projection
    forget: tuple[str, ...]
    preserve: tuple[str, ...]
    candidates: tuple[str, ...]  # forget, preserve, neighbour and alias names: the classes verified over
    neighbourhood: Neighbourhood
    templates: tuple[str, ...]
    pool: tuple[str, ...]  # the whole vocabulary (forget names excluded)
    probes: tuple[str, ...] = ()  # held-out templates retained candidates are also checked under
    emphasis: Mapping[str, float] = field(default_factory=dict)  # preserve prompt -> weight factor (repairs)
    extra_forget: tuple[tuple[str, str], ...] = ()  # hardening: (bypass prompt, its stand-in: Variant.stand_in)
    forget_emphasis: Mapping[str, float] = field(default_factory=dict)  # hardening: forget prompt -> weight factor

    def prompts(self, names: Sequence[str]) -> list[str]:
        """Every template of every name, template-major (the order of the solver's rows)."""
        return [t.format(n) for t in self.templates for n in names]

    def checked_prompts(self) -> list[str]:
        """Every prompt ``measure`` embeds: each candidate under each template and probe."""
        return [t.format(c) for t in (*self.templates, *self.probes) for c in self.candidates]


def probe_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The probes a request with ``templates`` is checked under (those it does not solve on)."""
    return tuple(t for t in PROBE_TEMPLATES if t not in templates)


def candidates_of(forget: Sequence[str], preserve: Sequence[str], hood: Neighbourhood) -> tuple[str, ...]:
    """The classes a request is verified over, each once."""
    neighbours = (n for pairs in hood.neighbours.values() for n, _ in pairs)
    return tuple(dict.fromkeys([*forget, *preserve, *neighbours, *hood.alias_names()]))


def feature_change(layer: Layer, projection: Projection) -> tuple[np.ndarray, np.ndarray]:
    """A low-rank layer's stored factors as a feature-form change ``up @ down`` (float64)."""
    up, down = layer.up.astype(np.float64), layer.down.astype(np.float64)
    return (up, down) if projection.layout == "in_out" else (down.T, up.T)


def measure(ctx: SolveContext, change: Change) -> Effect:
    """The text-space effect of ``change`` on the candidates of ``ctx``.

    For each template, each candidate's original embedding is classified over the candidates'
    changed embeddings; ``retained`` counts the request's templates, ``lost`` names every
    retained candidate that loses its class under any template or probe. ``vocabulary_retained``
    does the same over the whole vocabulary with bare names (their features are at hand anyway),
    which shows what happens to names that were neither preserved nor neighbours.
    """
    space, candidates, hood = ctx.space, ctx.candidates, ctx.neighbourhood
    forget_set = set(ctx.forget)
    alias_set = set(hood.alias_names())
    idx = {c: i for i, c in enumerate(candidates)}
    keepers = [c for c in candidates if c not in forget_set and c not in alias_set]
    similarity: dict[str, list[float]] = {f: [] for f in ctx.forget}
    predicted: dict[str, dict[str, str]] = {f: {} for f in ctx.forget}
    outranked = dict.fromkeys(ctx.forget, True)
    retained_by_template = {}
    lost: dict[str, list[str]] = {}
    for t, _, own, pred in per_template(space, (*ctx.templates, *ctx.probes), candidates, change):
        for c in keepers:
            if pred[idx[c]] != idx[c]:
                lost.setdefault(c, []).append(t)
        if t not in ctx.templates:
            continue  # a probe: per-class verdicts only
        for f in ctx.forget:
            i = idx[f]
            similarity[f].append(float(own[i]))
            predicted[f][t] = candidates[pred[i]]
            if pred[i] == i:
                outranked[f] = False
        kept = [c for c in keepers if pred[idx[c]] == idx[c]]
        retained_by_template[t] = len(kept) / len(keepers) if keepers else 1.0
    drift = float(np.mean(cosine_drift(space, ctx.prompts(ctx.preserve), change))) if ctx.preserve else 0.0
    vocabulary_retained = 1.0
    if ctx.pool:
        names = [*ctx.forget, *ctx.pool]
        _, _, _, pred = next(per_template(space, ["{}"], names, change))
        keep = [i for i, n in enumerate(names) if n not in forget_set and n not in alias_set]
        vocabulary_retained = float(np.mean(pred[keep] == np.asarray(keep))) if keep else 1.0  # never NaN: metadata refuses it
    return Effect(
        forget={f: NameEffect(round(float(np.mean(similarity[f])), 4), outranked[f], predicted[f]) for f in ctx.forget},
        retained=round(float(np.mean(list(retained_by_template.values()))), 4),
        retained_min=round(float(min(retained_by_template.values())), 4),
        vocabulary_retained=round(vocabulary_retained, 4),
        preserve_drift=round(drift, 6),
        candidates=len(candidates),
        aliases={f: [n for n, _ in a] for f, a in hood.aliases.items()},
        dropped_preserve=list(hood.dropped),
        retained_by_template={t: round(v, 4) for t, v in retained_by_template.items()},
        lost=lost,
    )


def per_template(space: TextSpace, templates: Sequence[str], names: Sequence[str],
                 change: Change) -> Iterator[tuple[str, list[str], np.ndarray, np.ndarray]]:
    """For each template: its prompts of ``names``, each base embedding's cosine to its own
    changed embedding, and for each prompt the one whose changed embedding its base embedding is
    closest to (its own index when it keeps its class). Every template's rows are changed at once
    (a hardened check looks at 85 templates of a few hundred names, dozens of times).

    A change of rank ``r ≤ LOW_RANK`` is measured through its factors: with base rows ``b_j``,
    unit rows ``u_i`` and ``q_j = x_j·up``, the cosine of ``u_i`` and the changed ``a_j`` is
    ``(u_i·b_j + (u_i·downᵀ)·q_j) / ‖b_j + q_j·down‖``, whose first term is the same for every
    change (``Block.similar``): a product of width ``r`` instead of the embedding's, for the
    rank search's low-rank solves. The same numbers, rounded differently in the last bits."""
    n = len(names)
    prompts = [t.format(c) for t in templates for c in names]
    block = space.block(prompts)
    low = factored(block, change) if n * len(prompts) <= SIMILARITY_BUDGET else None
    if low is not None:
        for k, t in enumerate(templates):
            rows = slice(k * n, (k + 1) * n)
            cosine = cosines_after(block, rows, change, low)
            yield t, prompts[rows], np.diagonal(cosine), np.argmax(cosine, axis=1)
        return
    after = unit_rows(space.changed(block, change))
    for k, t in enumerate(templates):
        rows = slice(k * n, (k + 1) * n)
        before = block.unit[rows]
        yield t, prompts[rows], np.einsum("ij,ij->i", before, after[rows]), np.argmax(before @ after[rows].T, axis=1)


def factored(block: Block, change: Change | None) -> tuple[np.ndarray, np.ndarray] | None:
    """For a change of rank at most ``LOW_RANK``: ``Q = X·up`` of the block's rows and the lengths
    of their changed embeddings ``‖b + Q·down‖``, from products of width ``r``; otherwise None."""
    if not isinstance(change, tuple) or change[0].shape[1] > LOW_RANK:
        return None
    up, down = change
    base = block.base
    Q = block.X @ up
    squared = block.squared() + 2 * np.sum((base @ down.T) * Q, axis=1) + np.sum((Q @ (down @ down.T)) * Q, axis=1)
    return Q, np.sqrt(np.maximum(squared, 1e-24))


def cosines_after(block: Block, rows: slice, change: Change, low: tuple[np.ndarray, np.ndarray],
                  to: np.ndarray | None = None, key: Any = None) -> np.ndarray:
    """Cosines of unit rows ``to`` (named by ``key``; default the block's own unit rows) to the changed
    embeddings of the block's ``rows``, through a low-rank change's factors (``low = factored(...)``):
    ``(u_i·b_j + (u_i·downᵀ)·q_j) / ‖b_j + q_j·down‖``, the first term kept by the block."""
    Q, norm = low
    units = block.unit[rows] if to is None else to
    return (block.similar(rows, to, key) + (units @ change[1].T) @ Q[rows].T) / norm[rows]


def cosine_drift(space: TextSpace, prompts: Sequence[str], change: Change) -> np.ndarray:
    """Per prompt, how far ``change`` turns its embedding: ``1 - cos(before, after)``."""
    block = space.block(prompts)
    low = factored(block, change)
    if low is None:
        return 1.0 - np.sum(block.unit * unit_rows(space.changed(block, change)), axis=1)
    Q, norm = low
    own = np.sum(block.unit * block.base, axis=1) + np.sum((block.unit @ change[1].T) * Q, axis=1)
    return 1.0 - own / norm


def most_moved(space: TextSpace, change: Change, pool: Sequence[str], exclude: set[str], count: int) -> list[str]:
    """The ``count`` vocabulary names whose bare embedding the change turns most (cosine drift
    above ``MOVED_MIN``): the names an automatic preserve set should hold next."""
    names = [n for n in pool if n not in exclude]
    if not names or count <= 0:
        return []
    drift = cosine_drift(space, names, change)
    order = np.argsort(-drift, kind="stable")[:count]
    return [names[i] for i in order if drift[i] > MOVED_MIN]


def measure_patches(loaded: Any, patches: Sequence[Patch], report: dict[str, Any]) -> Effect:
    """The text-space effect of applying ``patches`` in order, on the candidates of ``report``
    (a ``ForgetResult.report``): how stacked patches compare with a composed one."""
    from forgetpack.engine.features import text_features
    from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix
    from forgetpack.engine.vocabulary import vocabulary as full_vocabulary

    proj = find_projection(loaded.model, "text")
    W = projection_matrix(loaded.model, proj)
    patched = W
    for p in patches:
        patched = p.apply({proj.target: patched})[proj.target]
    recipe = report["recipe"]
    forget, preserve, templates = tuple(recipe["forget"]), tuple(recipe["preserve"]), tuple(recipe["templates"])
    hood = Neighbourhood(list(preserve), {f: [tuple(x) for x in v] for f, v in report["neighbours"].items()},
                         {f: [tuple(x) for x in v] for f, v in report["aliases"].items()})
    candidates = candidates_of(forget, preserve, hood)
    known = recipe.get("vocabulary", {})
    pool = tuple(full_vocabulary([*known.get("model", []), *known.get("extra", []), *preserve], exclude=forget))
    space = TextSpace({}, proj.feature_form(W), projection_bias(loaded.model, proj))
    ctx = SolveContext(space, proj, forget, preserve, candidates, hood, templates, pool, probe_templates(templates))
    prompts = list(dict.fromkeys([*pool, *forget, *ctx.checked_prompts()]))
    space.features.update(zip(prompts, text_features(loaded, prompts), strict=True))
    return measure(ctx, proj.feature_form(patched))
