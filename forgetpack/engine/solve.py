"""The forgetting engine: names in, a verified patch out, with no images at all.

``forget`` follows the paper (Kravets & Namboodiri, TMLR 2025): take the text tower's
pre-projection features of the forget names and of names to preserve, choose where each forget
prompt should land (``forgetpack.engine.targets``), and change only the text projection so that
it sends the forget prompts there while the preserve prompts stay put. Around that core it adds
what a tool needs:

- several templates at once (a patch must hold for the phrasings users classify with);
- an automatic preserve set and alias detection (``forgetpack.engine.preserve``);
- verification in text space (``forgetpack.engine.measure``): the patched zero-shot classifier
  over every candidate class must outrank each forget name for its own original embedding, for
  every template. If it does not, the forget weight is strengthened and the problem solved
  again; if that cannot fix it, ``forget`` fails with one clear line;
- verification per retained class: a candidate that loses its class under any template (or
  held-out probe phrasing) is repaired, not averaged away: its prompts join the preserve rows
  with more weight, a bounded number of times, keeping the solve that loses fewest classes;
- the recipe (everything needed to solve again, which ``compose`` uses) and the measured
  effect are recorded in the patch (``forgetpack.engine.request``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from forgetpack.engine import harden, ranks
from forgetpack.engine.known import check_known
from forgetpack.engine.measure import (
    SolveContext,
    TextSpace,
    candidates_of,
    feature_change,
    measure,
    most_moved,
    probe_templates,
)
from forgetpack.engine.preserve import Neighbourhood, find_neighbourhood
from forgetpack.engine.request import Effect, ForgetRequest, Recipe, check_composable
from forgetpack.engine.solvers import Problem, Solution, Solver, Weights, get_solver
from forgetpack.engine.targets import forget_targets
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import check_fit, targets_of
from forgetpack.format.patch import Layer, Patch, display_name

MAX_STRENGTHEN = 6  # re-solves with a stronger forget weight before giving up
MAX_PRESERVE_STEPS = 3  # re-solves with a stronger preserve weight while retention is short of RETAIN_GOAL
PRESERVE_STEP = 4.0
MAX_REPAIRS = 2  # re-solves per verified solve that hold the classes the last one lost harder
REPAIR_STEP = 16.0  # each repair multiplies a lost class's preserve rows' weight by this
MAX_EMPHASIS = REPAIR_STEP**MAX_REPAIRS
ADAPTIVE_ROUNDS = 1  # automatic preserve sets: re-solve once with the most-moved vocabulary names added
RETAIN_GOAL = 0.98

Progress = Callable[[int, int], None]  # (prompts encoded, prompts to encode), called while encoding


@dataclass
class ForgetResult:
    """The patch and a report of how it was made and what it does (JSON; recipe and effect are
    also stored in the patch)."""

    patch: Patch
    report: dict[str, Any]
    solution: Solution | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Solved:
    """One verified (or, without verification, merely measured) solve, and the context it was solved in."""

    solution: Solution
    layer: Layer
    effect: Effect
    weights: Weights
    context: SolveContext = field(repr=False)


# ---------------------------------------------------------------------------- forget


def forget(loaded: Any, request: ForgetRequest | Sequence[str], *, progress: Progress | None = None,
           **options: Any) -> ForgetResult:
    """Make ``loaded`` forget what ``request`` asks; returns the patch and a report.

    ``forget(loaded, ["seven"], solver="paper")`` is shorthand for
    ``forget(loaded, ForgetRequest(["seven"], solver="paper"))``. The candidates are the built-in
    vocabulary, the model's own class names (``LoadedModel.vocabulary``) and the request's.
    ``progress`` is called as prompts are encoded (the library itself prints nothing). A forget
    name the model does not know is a ``ForgetpackError`` unless ``request.allow_unknown``
    (``forgetpack.engine.known``); the report's ``recognition`` says what was checked and found.
    """
    from forgetpack.engine import vocabulary as vocab
    from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix

    if not isinstance(request, ForgetRequest):
        request = ForgetRequest(request, **options)
    elif options:
        raise TypeError(f"options {sorted(options)} belong in the ForgetRequest")
    started = time.perf_counter()
    solver = get_solver(request.solver)
    model_names = [n for n in loaded.vocabulary if n not in request.vocabulary]
    proj = find_projection(loaded.model, "text")
    W = projection_matrix(loaded.model, proj)
    space = TextSpace({}, proj.feature_form(W), projection_bias(loaded.model, proj))
    pool = tuple(vocab.vocabulary([*model_names, *request.vocabulary, *(request.preserve or [])], exclude=request.forget))

    # 0. names the model does not know are refused (or, allowed, reported) before anything is solved
    t0 = time.perf_counter()
    recognition = check_known(loaded, request.forget, extra=request.vocabulary, allow_unknown=request.allow_unknown,
                              features=lambda names: _features(loaded, space, names, progress))
    # 1. bare-name features of the vocabulary, forget and preserve names: neighbours and aliases
    _encode(loaded, space, [*request.forget, *pool, ""], progress)
    timings = {"encode_vocabulary": time.perf_counter() - t0, "encode_templates": 0.0, "solve": 0.0}
    hood = _neighbourhood(space, request, pool)
    if request.harden:
        hood = harden.with_declared_classes(hood, loaded.vocabulary, request.forget)
    ctx = SolveContext(space, proj, request.forget, tuple(hood.preserve), candidates_of(request.forget, hood.preserve, hood),
                       hood, request.templates, pool, probe_templates(request.templates))
    # 2.-4. encode every template of every candidate, solve, verify (and the adaptive round)
    ctx, solved, attempts = _solve_rounds(loaded, ctx, solver, request, progress, timings)
    added = [n for n in ctx.preserve if n not in hood.preserve]  # by the adaptive round
    grid = harden.grid_for(ctx, request.harden, loaded) if request.harden else None
    at_rank = None  # a hardened request solves again at smaller ranks (ranks.hardened_at_rank)
    if grid:  # solve again while the bypass grid finds something (forgetpack.engine.harden)
        timings["encode_templates"] += _encode(loaded, ctx.space, grid.prompts(ctx), progress)
        t0 = time.perf_counter()
        plain = (ctx, solved.weights)
        ctx, solved = harden.run(ctx, grid, solved, lambda c: solve_verified(c, solver, request, solved.weights, attempts))
        at_rank = ranks.hardened_at_rank((plain, (ctx, solved.weights)), grid,
                                         lambda c, w, r: solve_verified(c, solver, replace(request, rank=r), w, []))
        timings["solve"] += time.perf_counter() - t0

    # 5. the fewest factors that do as well as all of them (a smaller patch)
    if request.verify and request.rank is None and solver.nested_ranks:
        t0 = time.perf_counter()
        rounds = solved.effect.audit.get("rounds", 0) if grid else 0
        solved = ranks.smallest_rank(ctx, solved, harden.no_worse(ctx, grid, solved) if grid else None, at_rank)
        if grid:
            solved = harden.with_audit(solved, harden.check(ctx, grid, feature_change(solved.layer, ctx.projection)), rounds)
        timings["solve"] += time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started

    recipe = Recipe(
        forget=list(request.forget), preserve=list(ctx.preserve), preserve_mode=request.preserve_mode, preserve_added=added,
        model_vocabulary=model_names, extra_vocabulary=list(request.vocabulary), solver=solver.name,
        target=request.target, target_norm=request.target_norm, templates=list(request.templates),
        weights=solved.weights, rank=request.rank, seed=request.seed, background=request.background,
        projection=proj.target, harden=list(request.harden),
    )  # fmt: skip
    patch = Patch.create(loaded.model_id, base={proj.target: W}, layers=[solved.layer], layouts={proj.target: proj.layout},
                         recipe=recipe.to_json(), effect=solved.effect.to_json())
    report = {
        "model": loaded.model_id,
        "recipe": recipe.to_json(),
        "effect": solved.effect.report(),
        "classes": class_verdicts(ctx, solved.effect, attempts),
        "aliases": hood.aliases,
        "dropped_preserve": hood.dropped,
        "neighbours": hood.neighbours,
        "attempts": attempts,
        "solver_info": _jsonable(solved.solution.info),
        "rank": solved.solution.rank,
        "timings": timings,
        "prompts": len(space.features),
        "recognition": recognition.to_json(),
    }
    return ForgetResult(patch, report, solved.solution)


def _solve_rounds(loaded: Any, ctx: SolveContext, solver: Solver, request: ForgetRequest, progress: Progress | None,
                  timings: dict[str, float]) -> tuple[SolveContext, Solved, list[dict[str, Any]]]:
    """Encode every template of every candidate, then solve and verify. For an automatic
    preserve set, once more with the vocabulary names that update moved most added to it.
    Returns the last context and solve and every attempt."""
    attempts: list[dict[str, Any]] = []
    weights = request.weights or solver.default_weights(len(ctx.forget))
    rounds = 1 + (ADAPTIVE_ROUNDS if request.adaptive else 0)
    for round_ in range(rounds):
        timings["encode_templates"] += _encode(loaded, ctx.space, ctx.checked_prompts(), progress)
        t0 = time.perf_counter()
        solved = solve_verified(ctx, solver, request, weights, attempts)
        ctx, weights = solved.context, solved.weights
        timings["solve"] += time.perf_counter() - t0
        if round_ == rounds - 1:
            break
        exclude = {*ctx.preserve, *ctx.neighbourhood.alias_names()}
        moved = most_moved(ctx.space, feature_change(solved.layer, ctx.projection), ctx.pool, exclude=exclude,
                           count=request.auto_k)
        if not moved:
            break
        preserve = [*ctx.preserve, *moved]
        ctx = replace(ctx, preserve=tuple(preserve), candidates=candidates_of(ctx.forget, preserve, ctx.neighbourhood))
    return ctx, solved, attempts


def _encode(loaded: Any, space: TextSpace, prompts: list[str], progress: Progress | None) -> float:
    """Add the features of the prompts ``space`` lacks; returns the seconds it took."""
    from forgetpack.engine.features import text_features

    t0 = time.perf_counter()
    todo = list(dict.fromkeys(p for p in prompts if p not in space.features))
    if todo:
        space.features.update(zip(todo, text_features(loaded, todo, progress=progress), strict=True))
    return time.perf_counter() - t0


def _features(loaded: Any, space: TextSpace, names: Sequence[str], progress: Progress | None) -> np.ndarray:
    """Bare features of ``names``, encoded into ``space`` where it lacks them (forget encodes them anyway)."""
    _encode(loaded, space, list(names), progress)
    return space.features_of(names)


def _neighbourhood(space: TextSpace, request: ForgetRequest, pool: Sequence[str]) -> Neighbourhood:
    """Neighbours, aliases and preserve set of the forget names, from their bare-name features."""
    center = space.features_of(pool).mean(axis=0)
    k = request.auto_k
    return find_neighbourhood(
        request.forget, space.features_of(request.forget), pool, space.features_of(pool), center,
        k=k, explicit=request.preserve, n_neighbours=max(request.neighbours, k if request.preserve is None else 0),
    )  # fmt: skip


def build_problem(ctx: SolveContext, solver: Solver, request: ForgetRequest, weights: Weights) -> Problem:
    """The solver's view: forget rows and their targets, preserve rows (plus background rows).

    A preserve prompt with an ``emphasis`` factor ``k`` (a repaired class) counts ``k`` times:
    its row is scaled by ``√k``, exact for a squared objective. Emphasised prompts under probe
    templates join the preserve rows. Forget rows with a ``forget_emphasis`` factor (hardening's
    bypasses that a round left open) are scaled the same way, row and target alike."""
    M, bias = ctx.space.M, ctx.space.bias
    preserve_prompts = list(dict.fromkeys([*ctx.prompts(ctx.preserve), *ctx.emphasis]))
    forget_prompts = [*ctx.prompts(ctx.forget), *(p for p, _ in ctx.extra_forget)]
    T = forget_targets(ctx, request.target, request.target_norm, request.seed)
    if ctx.extra_forget:  # hardening's bypass prompts go opposite their stand-in, whatever the target (harden.harder)
        T = np.concatenate([T, -ctx.space.embed([s for _, s in ctx.extra_forget])])
    T = T - bias if bias is not None else T
    X_f = ctx.space.features_of(forget_prompts)
    if ctx.forget_emphasis:
        scale = np.sqrt([ctx.forget_emphasis.get(p, 1.0) for p in forget_prompts])[:, None]
        X_f, T = X_f * scale, T * scale
    X_p = ctx.space.features_of(preserve_prompts) if preserve_prompts else np.zeros((0, M.shape[0]))
    if ctx.emphasis:
        X_p *= np.sqrt([ctx.emphasis.get(p, 1.0) for p in preserve_prompts])[:, None]
    n_preserve = len(X_p)
    if request.background > 0 and solver.uses_background:
        X_p = np.concatenate([X_p, background_rows(ctx, n_preserve, request.background)])
    return Problem(M=M, X_f=X_f, T=T, X_p=X_p, Y_p=X_p @ M, weights=weights, rank=request.rank, seed=request.seed,
                   n_preserve=n_preserve or None)


def background_rows(ctx: SolveContext, n_preserve: int, weight: float) -> np.ndarray:
    """Bare features of every vocabulary name (aliases excepted), scaled so that this block
    weighs ``weight`` times the preserve set in the squared objective (or as much as one
    preserve row per name when there is no preserve set). Their features are encoded anyway
    (for the neighbour search), and they pin the update down on everything text features have in
    common, not just on the neighbours."""
    aliases = set(ctx.neighbourhood.alias_names())
    names = [n for n in ctx.pool if n not in aliases]
    if not names:
        return np.zeros((0, ctx.space.M.shape[0]))
    scale = np.sqrt(weight * max(n_preserve, 1) / len(names))
    return ctx.space.features_of(names) * scale


def solve_verified(ctx: SolveContext, solver: Solver, request: ForgetRequest, weights: Weights,
                   attempts: list[dict[str, Any]]) -> Solved:
    """Solve; strengthen the forget weight until forgetting verifies, then repair the retained
    classes the solve lost (``repaired``) and strengthen the preserve weight while retention is
    short of ``RETAIN_GOAL``, keeping the best verified solve (``better``). Each attempt is
    appended to ``attempts``; the result carries the context it was solved in."""
    best: Solved | None = None
    preserve_steps = repairs = 0
    first = len(attempts)
    problem = build_problem(ctx, solver, request, weights)
    while True:
        solution = solver.solve(problem)
        layer = solution.layer(ctx.projection)
        effect = measure(ctx, feature_change(layer, ctx.projection))
        attempts.append({"weights": problem.weights.to_json(), "preserve_names": len(ctx.preserve),
                         "outranked": effect.all_outranked, "retained": effect.retained,
                         "retained_min": effect.retained_min, "lost": sorted(effect.lost)})  # fmt: skip
        solved = Solved(solution, layer, effect, problem.weights, ctx)
        if not request.verify:
            return solved
        if effect.all_outranked:
            if best is None or better(effect, best.effect):
                best = solved
            if effect.lost and repairs < MAX_REPAIRS:
                repairs += 1  # a class is lost: hold it (not the average) harder
                ctx = repaired(ctx, effect)
                problem = build_problem(ctx, solver, request, problem.weights)
                continue
            if effect.retained_min >= RETAIN_GOAL or preserve_steps >= MAX_PRESERVE_STEPS or not ctx.preserve:
                return best
            preserve_steps += 1  # forgotten, but too many other candidates moved: hold them harder
            w = problem.weights
            problem = problem.with_weights(Weights(w.forget, w.preserve * PRESERVE_STEP, w.update))
            continue
        if best is not None:  # holding harder undid the forgetting: keep the best verified solve
            return best
        stronger = solver.strengthen(problem.weights) if len(attempts) - first <= MAX_STRENGTHEN else None
        if stronger is None:
            still = [f for f, e in effect.forget.items() if not e.outranked]
            raise ForgetpackError(
                f"could not verify forgetting of {', '.join(map(repr, still))} with solver {solver.name} after "
                f"{len(attempts) - first} attempt(s) (forget weight up to {problem.weights.forget:g}); "
                "try another --target, fewer templates, or forgetting its aliases too"
            )
        problem = problem.with_weights(stronger)


def better(effect: Effect, than: Effect) -> bool:
    """Fewer lost classes first (one collapsed class is worse than a lower average), then retention."""
    return (len(effect.lost), -effect.retained_min) < (len(than.lost), -than.retained_min)


def repaired(ctx: SolveContext, effect: Effect) -> SolveContext:
    """The context for a repair: the prompts of every lost class under every template and probe
    join the preserve rows (a neighbour may not be preserved at all) and weigh ``REPAIR_STEP``
    times more (up to ``MAX_EMPHASIS``). The preserve list the recipe records stays the request's. Measured on mini, forgetting "two" and "nine" (UCI "one" images -14 pt
    unrepaired): "one" held 4× harder under the five templates alone, -10 pt; under the probes
    too, -8 pt; 16× under both, -4 pt."""
    emphasis = dict(ctx.emphasis)
    for name in effect.lost:
        for t in (*ctx.templates, *ctx.probes):
            prompt = t.format(name)
            emphasis[prompt] = min(emphasis.get(prompt, 1.0) * REPAIR_STEP, MAX_EMPHASIS)
    return replace(ctx, emphasis=emphasis)


def class_verdicts(ctx: SolveContext, effect: Effect, attempts: list[dict[str, Any]]) -> dict[str, str]:
    """Each candidate's fate: forgotten (or still recognised), alias, kept, repaired (an earlier
    solve lost it) or lost."""
    aliases = set(ctx.neighbourhood.alias_names())
    ever_lost = {c for a in attempts for c in a.get("lost", ())}
    verdicts = {}
    for c in ctx.candidates:
        if c in effect.forget:
            verdicts[c] = "forgotten" if effect.forget[c].outranked else "recognised"
        elif c in aliases:
            verdicts[c] = "alias"
        else:
            verdicts[c] = "lost" if c in effect.lost else "repaired" if c in ever_lost else "kept"
    return verdicts


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ---------------------------------------------------------------------------- compose


def compose(loaded: Any, patches: Sequence[Patch], *, progress: Progress | None = None, **overrides: Any) -> ForgetResult:
    """One patch solved jointly for the union of the patches' recorded requests.

    Stacking adds deltas that were each solved alone; composing solves again with every forget
    name and every preserve name at once, so requests that interact (one patch's forget name
    near another's preserve name) are handled together. A name one patch forgets and another
    preserves is forgotten. ``overrides`` (``solver=``, ``rank=``, ...; None is ignored) replace
    what the recipes say (``allow_unknown=True`` lets names the model does not know through, as
    ``forget``'s). Every patch must fit this model (``forgetpack.format.fit``).
    """
    from forgetpack.engine.projections import find_projection, projection_matrix

    recipes = check_composable(patches)
    proj = find_projection(loaded.model, "text")
    targets = targets_of({proj.target: projection_matrix(loaded.model, proj)}, layouts={proj.target: proj.layout})
    for p in patches:
        if p.model != loaded.model_id:
            raise ForgetpackError(f"{display_name(p)}: made for model {p.model!r}, not {loaded.model_id!r}")
        check_fit(p, targets, model=loaded.model_id)
    request = ForgetRequest.from_recipes(recipes, **overrides)
    result = forget(loaded, request, progress=progress)
    result.report["composed_from"] = [p.digest for p in patches]
    return result
