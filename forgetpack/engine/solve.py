"""The forgetting engine: names in, a verified patch out, with no images at all.

``forget`` follows the paper (Kravets & Namboodiri, TMLR 2025): take the text tower's
pre-projection features of the forget names and of names to preserve, choose where each forget
prompt should land, and change only the text projection so that it sends the forget prompts
there while the preserve prompts stay put. Around that core it adds what a tool needs:

- several templates at once (a patch must hold for the phrasings users classify with);
- an automatic preserve set and alias detection (``forgetpack.engine.preserve``);
- verification in text space: with each name's original embedding as the stand-in for its
  images, the patched zero-shot classifier over every candidate class (forget names, preserve
  names, vocabulary neighbours) must not predict a forget name for its own stand-in, for every
  template. If it still does, the forget weight is strengthened and the problem solved again;
  if that cannot fix it, ``forget`` fails with one clear line;
- the recipe (everything needed to solve again, which ``compose`` uses) and the measured
  effect are recorded in the patch.

Targets: ``antipode`` (default) sends each forget prompt to minus its own original embedding;
``mirror`` reflects it through the mean direction of the other candidates (keeping the part all
classes share, negating what distinguishes it); ``empty`` is the paper's: the normalised embedding of the empty string, re-drawn with N(0, 0.5)
noise while its nearest candidate class is a forget class. ``target_norm`` says whether the
target is a unit vector (the paper) or carries the prompt's original norm (the default: a unit
target among embeddings of norm ~20 is mostly reached by shrinking, which keeps the direction,
so cosine classification still recognises the class; see docs/engine.md for the numbers).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.engine.preserve import DEFAULT_AUTO_K, DEFAULT_NEIGHBOURS, Neighbourhood, find_neighbourhood, unit_rows
from forgetpack.engine.solvers import Problem, Solution, Weights, get_solver
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import FORGET_TEMPLATES, check_disjoint, check_templates, clean_names, normalize_name
from forgetpack.format.patch import Patch, display_name, fingerprint

ENGINE_VERSION = 1
DEFAULT_SOLVER = "closed-form"
DEFAULT_TARGET = "antipode"
TARGETS = ("antipode", "mirror", "empty")
TARGET_NORMS = ("original", "unit")
DEFAULT_TEMPLATES = FORGET_TEMPLATES
MAX_STRENGTHEN = 6  # re-solves with a stronger forget weight before giving up
MAX_PRESERVE_STEPS = 3  # re-solves with a stronger preserve weight while retention is short of RETAIN_GOAL
PRESERVE_STEP = 4.0
ADAPTIVE_ROUNDS = 1  # automatic preserve sets: re-solve once with the most-moved vocabulary names added
MOVED_MIN = 1e-4
EMPTY_NOISE = 0.5  # the paper's re-draw noise for the empty-string target
EMPTY_MAX_DRAWS = 1000
RETAIN_GOAL = 0.98
RANK_SLACK = 0.005  # vocabulary retention a smaller rank may give up against the full solve
DEFAULT_BACKGROUND = 1.0  # weight of the whole-vocabulary preserve block, relative to the preserve set


@dataclass
class ForgetResult:
    """The patch and a report of how it was made and what it does (also stored in the patch)."""

    patch: Patch
    report: dict[str, Any]
    solution: Solution | None = field(default=None, repr=False)


@dataclass
class _Space:
    """Features and embeddings of every prompt the engine looked at."""

    features: dict[str, np.ndarray]
    M: np.ndarray  # feature-form base projection
    bias: np.ndarray | None
    _base: dict[str, np.ndarray] = field(default_factory=dict)  # base embeddings, computed once per prompt

    def X(self, prompts: Sequence[str]) -> np.ndarray:
        return np.stack([self.features[p] for p in prompts]).astype(np.float64)

    def embed(self, prompts: Sequence[str], M: np.ndarray | None = None) -> np.ndarray:
        if M is None:
            todo = list(dict.fromkeys(p for p in prompts if p not in self._base))
            if todo:
                self._base.update(zip(todo, self._project(self.X(todo), self.M), strict=True))
            return np.stack([self._base[p] for p in prompts])
        return self._project(self.X(prompts), M)

    def _project(self, X: np.ndarray, M: np.ndarray) -> np.ndarray:
        y = X @ M
        return y + self.bias if self.bias is not None else y


# ---------------------------------------------------------------------------- forget


def forget(
    loaded: Any,
    forget_names: Sequence[str],
    *,
    preserve: Sequence[str] | None = None,
    auto_preserve: int | None = None,
    vocabulary: Sequence[str] = (),
    solver: str = DEFAULT_SOLVER,
    target: str = DEFAULT_TARGET,
    target_norm: str = "original",
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    rank: int | None = None,
    seed: int = 0,
    weights: Weights | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    background: float = DEFAULT_BACKGROUND,
    verify: bool = True,
    progress: bool = False,
) -> ForgetResult:
    """Make ``loaded`` forget ``forget_names``; returns the patch and a report.

    ``preserve`` is an explicit preserve list; otherwise the ``auto_preserve`` (default 20)
    nearest vocabulary names per forget name are preserved, and then (one adaptive round) the
    vocabulary names that solve moved most. The vocabulary is the built-in one, the model's own
    class names (``LoadedModel.vocabulary``) and the ``vocabulary`` given here. ``verify=False`` skips the strengthening loop (the effect is
    still measured and recorded), for benchmarks of raw solvers.
    """
    from forgetpack.engine import vocabulary as vocab
    from forgetpack.engine.features import text_features
    from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix

    started = time.perf_counter()
    forget_names = clean_names(forget_names, "forget")
    if not forget_names:
        raise ForgetpackError("no forget names given")
    explicit = clean_names(preserve, "preserve") if preserve is not None else None
    if explicit is not None:
        check_disjoint(forget_names, explicit)
        if auto_preserve is not None:
            raise ForgetpackError("give either an explicit preserve list or --auto-preserve K, not both")
    k = DEFAULT_AUTO_K if auto_preserve is None else int(auto_preserve)
    if explicit is None and k < 0:
        raise ForgetpackError(f"--auto-preserve must be ≥ 0, got {k}")
    if rank is not None and int(rank) <= 0:
        raise ForgetpackError(f"rank must be a positive integer, got {rank}")
    if target not in TARGETS:
        raise ForgetpackError(f"unknown target {target!r} (choose from {', '.join(TARGETS)})")
    if target_norm not in TARGET_NORMS:
        raise ForgetpackError(f"unknown target norm {target_norm!r} (choose from {', '.join(TARGET_NORMS)})")
    templates = check_templates(templates, FORGET_TEMPLATES)
    the_solver = get_solver(solver)
    extra = clean_names(vocabulary, "vocabulary") if vocabulary else []
    model_names = [n for n in getattr(loaded, "vocabulary", ()) if n not in extra]

    model = loaded.model
    proj = find_projection(model, "text")
    W = projection_matrix(model, proj)
    bias = projection_bias(model, proj)
    M = proj.feature_form(W)

    # 1. bare-name features of the vocabulary, forget and preserve names: neighbours and aliases
    pool = vocab.vocabulary([*model_names, *extra, *(explicit or [])], exclude=forget_names)
    bare = list(dict.fromkeys([*forget_names, *pool, ""]))
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    space = _Space(dict(zip(bare, text_features(loaded, bare, progress=progress), strict=True)), M, bias)
    timings["encode_vocabulary"] = time.perf_counter() - t0
    center = space.X(pool).mean(axis=0)
    hood = find_neighbourhood(
        forget_names, space.X(forget_names), pool, space.X(pool), center,
        k=k, explicit=explicit, n_neighbours=max(neighbours, k if explicit is None else 0),
    )  # fmt: skip
    preserve_names = list(hood.preserve)
    alias_set = set(hood.alias_names())
    timings["encode_templates"] = timings["solve"] = 0.0
    attempts: list[dict[str, Any]] = []
    current = weights or the_solver.default_weights(len(forget_names))
    added: list[str] = []
    rounds = 1 + (ADAPTIVE_ROUNDS if explicit is None and verify and k > 0 else 0)
    for round_ in range(rounds):
        candidates = list(dict.fromkeys([*forget_names, *preserve_names, *(n for ns in hood.neighbours.values() for n, _ in ns), *alias_set]))

        # 2. every template of every candidate
        prompts = [p for p in (t.format(n) for t in templates for n in candidates) if p not in space.features]
        t0 = time.perf_counter()
        if prompts:
            space.features.update(zip(prompts, text_features(loaded, prompts, progress=progress), strict=True))
        timings["encode_templates"] += time.perf_counter() - t0

        # 3. solve, verify; strengthen forgetting until it holds, then preservation while it holds
        t0 = time.perf_counter()
        problem = build_problem(space, the_solver, forget_names, preserve_names, candidates, templates, pool, hood,
                                target, target_norm, seed, current, rank, background)
        solution, layer, effect, current = solve_verified(space, the_solver, problem, proj, forget_names, preserve_names,
                                                          candidates, hood, templates, pool, verify, attempts)
        timings["solve"] += time.perf_counter() - t0
        # 4. adaptive preserve: the vocabulary names this update moved most join the preserve set
        last = round_ == rounds - 1
        moved = [] if last else most_moved(space, _feature_factors(layer, proj.layout), pool, exclude={*preserve_names, *alias_set}, count=k)
        if not moved:
            break
        preserve_names += moved
        added += moved

    # 5. the fewest factors that do as well as all of them (a smaller patch)
    if verify and rank is None and getattr(the_solver, "nested_ranks", False):
        t0 = time.perf_counter()
        solution, layer, effect = smallest_rank(space, proj, solution, layer, effect, forget_names, preserve_names,
                                                candidates, hood, templates, pool)
        timings["solve"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    recipe = {
        "engine": ENGINE_VERSION,
        "forget": forget_names,
        "preserve": preserve_names,
        "preserve_mode": "explicit" if explicit is not None else f"auto:{k}",
        "preserve_added": added,
        "vocabulary": {"builtin": "imagenet-1k", "model": model_names, "extra": extra},
        "solver": the_solver.name,
        "target": target,
        "target_norm": target_norm,
        "templates": list(templates),
        "weights": current.to_json(),
        "rank": rank,
        "seed": seed,
        "background": background,
        "projection": proj.target,
    }
    patch = Patch.create(
        loaded.model_id,
        base={proj.target: W},
        layers=[layer],
        layouts={proj.target: proj.layout},
        recipe=recipe,
        effect=effect_for_patch(effect, hood),
    )
    report = {
        "model": loaded.model_id,
        "recipe": recipe,
        "effect": effect,
        "aliases": hood.aliases,
        "dropped_preserve": hood.dropped,
        "neighbours": hood.neighbours,
        "attempts": attempts,
        "solver_info": _jsonable(solution.info),
        "rank": solution.rank,
        "timings": timings,
        "prompts": len(space.features),
    }
    return ForgetResult(patch, report, solution)


def build_problem(space: _Space, the_solver: Any, forget_names: Sequence[str], preserve_names: Sequence[str],
                  candidates: Sequence[str], templates: Sequence[str], pool: Sequence[str], hood: Neighbourhood,
                  target: str, target_norm: str, seed: int, weights: Weights, rank: int | None, background: float) -> Problem:
    """The solver's view: forget rows and their targets, preserve rows (plus background rows)."""
    M, bias = space.M, space.bias
    forget_prompts = [t.format(f) for t in templates for f in forget_names]
    preserve_prompts = [t.format(p) for t in templates for p in preserve_names]
    T = forget_targets(space, target, target_norm, forget_names, templates, candidates, seed)
    X_p = space.X(preserve_prompts) if preserve_prompts else np.zeros((0, M.shape[0]))
    n_preserve = len(X_p)
    if background > 0 and getattr(the_solver, "uses_background", True):
        X_p = np.concatenate([X_p, background_rows(space, pool, hood, n_preserve, background)])
    return Problem(M=M, X_f=space.X(forget_prompts), T=T - bias if bias is not None else T, X_p=X_p, Y_p=X_p @ M,
                   weights=weights, rank=rank, seed=seed, n_preserve=n_preserve or None)


def solve_verified(space: _Space, the_solver: Any, problem: Problem, proj: Any, forget_names: Sequence[str],
                   preserve_names: Sequence[str], candidates: Sequence[str], hood: Neighbourhood, templates: Sequence[str],
                   pool: Sequence[str], verify: bool, attempts: list[dict[str, Any]]) -> tuple[Solution, Any, dict[str, Any], Weights]:
    """Solve; strengthen the forget weight until forgetting verifies, then the preserve weight
    while retention is short of ``RETAIN_GOAL`` (keeping the best verified solve)."""
    best = None
    preserve_steps = 0
    first = len(attempts)
    while True:
        solution = the_solver.solve(problem)
        layer = solution.layer(proj)
        effect = measure(space, _feature_factors(layer, proj.layout), forget_names, preserve_names, candidates, hood, templates, pool)
        attempts.append({"weights": problem.weights.to_json(), "preserve_names": len(preserve_names), "forgotten": effect["all_forgotten"],
                         "retained": effect["retained"], "retained_min": effect["retained_min"]})
        if not verify:
            return solution, layer, effect, problem.weights
        if effect["all_forgotten"]:
            if best is None or effect["retained_min"] > best[2]["retained_min"]:
                best = (solution, layer, effect, problem.weights)
            if effect["retained_min"] >= RETAIN_GOAL or preserve_steps >= MAX_PRESERVE_STEPS or not preserve_names:
                return best
            preserve_steps += 1  # forgotten, but too many other candidates moved: hold them harder
            w = problem.weights
            problem = problem.with_weights(Weights(w.forget, w.preserve * PRESERVE_STEP, w.update))
            continue
        if best is not None:  # holding harder undid the forgetting: keep the best verified solve
            return best
        stronger = the_solver.strengthen(problem.weights) if len(attempts) - first <= MAX_STRENGTHEN else None
        if stronger is None:
            still = [f for f, e in effect["forget"].items() if not e["forgotten"]]
            raise ForgetpackError(
                f"could not verify forgetting of {', '.join(map(repr, still))} with solver {the_solver.name} after "
                f"{len(attempts) - first} attempt(s) (forget weight up to {problem.weights.forget:g}); "
                "try another --target, fewer templates, or forgetting its aliases too"
            )
        problem = problem.with_weights(stronger)


def smallest_rank(space: _Space, proj: Any, solution: Solution, layer: Any, effect: dict[str, Any],
                  forget_names: Sequence[str], preserve_names: Sequence[str], candidates: Sequence[str],
                  hood: Neighbourhood, templates: Sequence[str], pool: Sequence[str]) -> tuple[Solution, Any, dict[str, Any]]:
    """The fewest leading factors that do as well as all of them.

    For a solver with ``nested_ranks`` the first ``r`` factor columns are themselves the exact
    rank-``r`` optimum, so a smaller patch costs one text-space measurement per rank. A rank is
    kept when forgetting still verifies, the worst-template retention is no lower and the
    vocabulary retention at most ``RANK_SLACK`` lower than with every factor. Each rank of a
    512-wide projection is 4 KB on disk: this is what keeps a one-class patch small.

    Never fewer than one factor per forget name: on mini a rank-1 update for "one", "four" and
    "seven" passed the text-space check yet left 19% of the real "one" images recognised, while
    rank 3 took all three to 0%.
    """
    for r in range(min(len(forget_names), solution.rank), solution.rank):
        trial = Solution(solution.up[:, :r], solution.down[:r], {**solution.info, "rank_of_optimum": solution.rank})
        trial_layer = trial.layer(proj)
        e = measure(space, _feature_factors(trial_layer, proj.layout), forget_names, preserve_names, candidates, hood, templates, pool)
        if (e["all_forgotten"] and e["retained_min"] >= effect["retained_min"]
                and e["vocabulary_retained"] >= effect["vocabulary_retained"] - RANK_SLACK):
            return trial, trial_layer, e
    return solution, layer, effect


def most_moved(space: _Space, change: tuple[np.ndarray, np.ndarray], pool: Sequence[str], exclude: set[str], count: int) -> list[str]:
    """The ``count`` vocabulary names whose bare embedding the change turns most (cosine drift
    above ``MOVED_MIN``): the names an automatic preserve set should hold next."""
    names = [n for n in pool if n not in exclude]
    if not names or count <= 0:
        return []
    drift = 1.0 - np.sum(unit_rows(space.embed(names)) * unit_rows(_after(space, names, change)), axis=1)
    order = np.argsort(-drift, kind="stable")[:count]
    return [names[i] for i in order if drift[i] > MOVED_MIN]


def background_rows(space: _Space, pool: Sequence[str], hood: Neighbourhood, n_preserve: int, weight: float) -> np.ndarray:
    """Bare features of every vocabulary name (aliases excepted), scaled so that this block
    weighs ``weight`` times the preserve set in the squared objective (or as much as one
    preserve row per name when there is no preserve set). Their features are encoded anyway
    (for the neighbour search), and they pin the update down on everything text features have in
    common, not just on the neighbours."""
    aliases = set(hood.alias_names())
    names = [n for n in pool if n not in aliases]
    if not names:
        return np.zeros((0, space.M.shape[0]))
    scale = np.sqrt(weight * max(n_preserve, 1) / len(names))
    return space.X(names) * scale


# ---------------------------------------------------------------------------- targets


def forget_targets(
    space: _Space, target: str, norm: str, forget_names: Sequence[str], templates: Sequence[str],
    candidates: Sequence[str], seed: int,
) -> np.ndarray:
    """One target row per forget prompt (template-major, like the forget features)."""
    prompts = [t.format(f) for t in templates for f in forget_names]
    original = space.embed(prompts)
    norms = np.linalg.norm(original, axis=1, keepdims=True)
    if target == "antipode":
        return -original
    if target == "mirror":
        # reflect through the mean direction of the other candidates (same template): keep what
        # every class shares, negate what distinguishes this one; the norm is kept
        others = [c for c in candidates if c not in set(forget_names)]
        rows = []
        for t in templates:
            y = space.embed([t.format(f) for f in forget_names])
            mean = space.embed([t.format(c) for c in others]).mean(axis=0) if others else y.mean(axis=0)
            u = mean / max(float(np.linalg.norm(mean)), 1e-12)
            along = (y @ u)[:, None] * u[None, :]
            rows.append(2 * along - y)
        return np.concatenate(rows)
    # the paper's target: the normalised empty-string embedding, re-drawn while a forget class is nearest to it
    empty = space.embed([""])[0]
    rows = np.repeat(empty[None, :], len(prompts), axis=0)
    cand = unit_rows(space.embed([t.format(c) for t in templates for c in candidates]))
    is_forget = np.isin(np.tile(np.asarray(candidates, dtype=object), len(templates)), list(forget_names))
    rng = np.random.default_rng(seed)
    unit = unit_rows(rows)
    for _ in range(EMPTY_MAX_DRAWS):
        nearest = np.argmax(unit @ cand.T, axis=1)
        if not is_forget[nearest].any():
            break
        unit = unit_rows(rows + rng.normal(0.0, EMPTY_NOISE, size=rows.shape))
    else:
        raise ForgetpackError("the empty-string target stays nearest to a forget class after 1000 noisy draws; use --target antipode")
    return unit * norms if norm == "original" else unit


# ---------------------------------------------------------------------------- measuring


def measure(
    space: _Space, patched: np.ndarray | tuple[np.ndarray, np.ndarray], forget_names: Sequence[str], preserve_names: Sequence[str],
    candidates: Sequence[str], hood: Neighbourhood, templates: Sequence[str], vocabulary: Sequence[str] = (),
) -> dict[str, Any]:
    """The text-space effect of a patched projection: its feature-form matrix, or the low-rank
    factors ``(up, down)`` of its change (the same numbers, far cheaper on a big vocabulary).

    For each template: images are stood in for by each candidate's *original* embedding,
    classified over the candidates' *patched* embeddings. ``vocabulary_retained`` does the
    same over the whole vocabulary with bare names (their features are at hand anyway), which
    shows what happens to names that were neither preserved nor neighbours.
    """
    forget_set = set(forget_names)
    alias_set = set(hood.alias_names())
    idx = {c: i for i, c in enumerate(candidates)}
    keepers = [c for c in candidates if c not in forget_set and c not in alias_set]
    per_forget: dict[str, dict[str, Any]] = {f: {"self_similarity": [], "predicted": {}, "forgotten": True} for f in forget_names}
    retained_by_template = {}
    lost: dict[str, list[str]] = {}
    for t in templates:
        prompts = [t.format(c) for c in candidates]
        before = unit_rows(space.embed(prompts))
        after = unit_rows(_after(space, prompts, patched))
        pred = np.argmax(before @ after.T, axis=1)
        for f in forget_names:
            i = idx[f]
            e = per_forget[f]
            e["self_similarity"].append(float(before[i] @ after[i]))
            e["predicted"][t] = candidates[pred[i]]
            if pred[i] == i:
                e["forgotten"] = False
        kept = [c for c in keepers if pred[idx[c]] == idx[c]]
        retained_by_template[t] = len(kept) / len(keepers) if keepers else 1.0
        for c in keepers:
            if pred[idx[c]] != idx[c]:
                lost.setdefault(c, []).append(t)
    for e in per_forget.values():
        e["self_similarity"] = round(float(np.mean(e["self_similarity"])), 4)
    drift = 0.0
    if preserve_names:
        pp = [t.format(p) for t in templates for p in preserve_names]
        cos = np.sum(unit_rows(space.embed(pp)) * unit_rows(_after(space, pp, patched)), axis=1)
        drift = float(np.mean(1.0 - cos))
    vocabulary_retained = 1.0
    if vocabulary:
        names = [*forget_names, *vocabulary]
        pred = np.argmax(unit_rows(space.embed(names)) @ unit_rows(_after(space, names, patched)).T, axis=1)
        keep = [i for i, n in enumerate(names) if n not in forget_set and n not in alias_set]
        vocabulary_retained = float(np.mean(pred[keep] == np.asarray(keep)))
    return {
        "forget": per_forget,
        "vocabulary_retained": round(vocabulary_retained, 4),
        "all_forgotten": all(e["forgotten"] for e in per_forget.values()),
        "retained": round(float(np.mean(list(retained_by_template.values()))), 4),
        "retained_min": round(float(min(retained_by_template.values())), 4),
        "retained_by_template": {t: round(v, 4) for t, v in retained_by_template.items()},
        "lost": lost,
        "preserve_drift": round(drift, 6),
        "candidates": len(candidates),
    }


def _after(space: _Space, prompts: Sequence[str], patched: np.ndarray | tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    if isinstance(patched, tuple):
        up, down = patched
        return space.embed(prompts) + (space.X(prompts) @ up) @ down
    return space.embed(prompts, patched)


def _feature_factors(layer: Any, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """A low-rank layer's stored factors as a feature-form change ``up @ down`` (float64)."""
    up, down = layer.up.astype(np.float64), layer.down.astype(np.float64)
    return (up, down) if layout == "in_out" else (down.T, up.T)


def measure_patches(loaded: Any, patches: Sequence[Patch], report: dict[str, Any]) -> dict[str, Any]:
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
    forget_names, preserve_names, templates = recipe["forget"], recipe["preserve"], recipe["templates"]
    hood = Neighbourhood(preserve_names, {f: [tuple(x) for x in v] for f, v in report["neighbours"].items()},
                         {f: [tuple(x) for x in v] for f, v in report["aliases"].items()})
    candidates = list(dict.fromkeys([*forget_names, *preserve_names, *(n for ns in hood.neighbours.values() for n, _ in ns), *hood.alias_names()]))
    known = recipe.get("vocabulary", {})
    pool = full_vocabulary([*known.get("model", []), *known.get("extra", []), *preserve_names], exclude=forget_names)
    prompts = list(dict.fromkeys([*pool, *forget_names, *(t.format(c) for t in templates for c in candidates)]))
    space = _Space(dict(zip(prompts, text_features(loaded, prompts), strict=True)), proj.feature_form(W), projection_bias(loaded.model, proj))
    return measure(space, proj.feature_form(patched), forget_names, preserve_names, candidates, hood, templates, pool)


def effect_for_patch(effect: dict[str, Any], hood: Neighbourhood) -> dict[str, Any]:
    """The measured effect, as recorded in the patch metadata."""
    return {
        "forget": {
            f: {"self_similarity": e["self_similarity"], "outranked": e["forgotten"], "predicted": e["predicted"]}
            for f, e in effect["forget"].items()
        },
        "preserve_drift": effect["preserve_drift"],
        "retained": effect["retained"],
        "retained_min": effect["retained_min"],
        "vocabulary_retained": effect["vocabulary_retained"],
        "candidates": effect["candidates"],
        "aliases": {f: [n for n, _ in a] for f, a in hood.aliases.items()},
        "dropped_preserve": hood.dropped,
    }


def _unique(names: Iterable[str]) -> list[str]:
    """Names in first-seen order, without repeats (compared normalised)."""
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(normalize_name(n), n)
    return list(out.values())


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------- compose


def compose(loaded: Any, patches: Sequence[Patch], *, progress: bool = False, **overrides: Any) -> ForgetResult:
    """One patch solved jointly for the union of the patches' recorded requests.

    Stacking adds deltas that were each solved alone; composing solves again with every forget
    name and every preserve name at once, so requests that interact (one patch's forget name
    near another's preserve name) are handled together. A name one patch forgets and another
    preserves is forgotten.
    """
    from forgetpack.engine.projections import find_projection, projection_matrix

    if not patches:
        raise ForgetpackError("nothing to compose")
    proj = find_projection(loaded.model, "text")
    current = fingerprint(projection_matrix(loaded.model, proj))
    forget_names: list[str] = []
    preserve: list[str] = []
    templates: list[str] = []
    for p in patches:
        where = display_name(p)
        recipe = p.recipe
        if "forget" not in recipe or recipe.get("engine") is None:
            raise ForgetpackError(f"{where}: the patch records no forgetting recipe (a stacked patch? compose its components' originals)")
        if p.model != loaded.model_id:
            raise ForgetpackError(f"{where}: made for model {p.model!r}, not {loaded.model_id!r}")
        if p.base.get(proj.target) != current:
            raise ForgetpackError(f"{where}: made for a different base of {proj.target!r} than this model's")
        forget_names.extend(recipe["forget"])
        preserve.extend(recipe.get("preserve", []))
        templates.extend(recipe.get("templates", DEFAULT_TEMPLATES))
    first = patches[0].recipe
    forget_names = _unique(forget_names)
    gone = {normalize_name(n) for n in forget_names}
    preserve = _unique(n for n in preserve if normalize_name(n) not in gone)
    extra = [n for p in patches for n in p.recipe.get("vocabulary", {}).get("extra", [])]
    options: dict[str, Any] = {
        "preserve": preserve,
        "vocabulary": list(dict.fromkeys(extra)),
        "solver": first.get("solver", DEFAULT_SOLVER),
        "target": first.get("target", DEFAULT_TARGET),
        "target_norm": first.get("target_norm", "original"),
        "templates": list(dict.fromkeys(templates)),
        "seed": first.get("seed", 0),
    }
    options.update({k: v for k, v in overrides.items() if v is not None})
    result = forget(loaded, forget_names, progress=progress, **options)
    result.report["composed_from"] = [p.digest for p in patches]
    return result
