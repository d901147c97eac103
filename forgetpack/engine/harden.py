"""Hardening: solve again until the bypass grid is clean, or a budget is spent.

A patch solved for "seven" under five templates may still let "sieben", "SEVEN" or "a sculpture
of a seven." through, and it may disturb a retained class under a phrasing nobody verified. So
after a verified solve the engine looks at the change through the audit's text-side families
(``forgetpack.engine.variants``): every variant becomes a forget row (each is, by construction,
a way to name the class; deciding from text which ones the model "recognises" missed most of
those that work on images), a variant that still reaches the class after a solve is held harder
(also one the base model did not recognise, which the solve itself opened: ``bypass``), and
every retained class that no longer keeps its own stand-in under the grid's templates is held
harder; then it solves again, until nothing is left or ``MAX_ROUNDS``. What the final patch was
audited against, and the result, go into its metadata.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from forgetpack.engine.bypass import Outcome, outcomes, prompts_needed, still_close, summarise
from forgetpack.engine.measure import Change, SolveContext, cosine_drift, feature_change, per_template
from forgetpack.engine.preserve import Neighbourhood, unit_rows
from forgetpack.engine.variants import FamilyContext, Variant, generate

MAX_ROUNDS = 4
REPAIR_STEP = 4.0  # each round multiplies a regressed prompt's preserve weight by this
CLOSE_SLACK = 0.05  # share of the forget prompts a smaller rank may leave close to their originals beyond the full solve


@dataclass(frozen=True)
class Grid:
    """The variants a request is hardened against, and the templates retained classes are checked in."""

    variants: tuple[Variant, ...]
    templates: tuple[str, ...]

    def prompts(self, ctx: SolveContext) -> list[str]:
        """Every prompt hardening will embed (encode them before the first check)."""
        retained = retained_of(ctx)
        return list(dict.fromkeys([*prompts_needed(self.variants, retained),
                                   *(t.format(c) for t in self.templates for c in ctx.candidates)]))


@dataclass(frozen=True)
class Check:
    """One look at a change through the grid."""

    bypasses: tuple[Outcome, ...]  # reaching the forget name after the change (``bypass.Outcome.bypass``)
    pending: tuple[Outcome, ...]  # variants not yet among the forget rows (all of them, the first time)
    regressed: tuple[str, ...]  # prompts of retained classes that lost their own stand-in
    summary: dict[str, dict[str, int | float]]

    @property
    def clean(self) -> bool:
        return not self.bypasses and not self.pending and not self.regressed


def grid_for(ctx: SolveContext, families: Sequence[str], loaded: Any = None) -> Grid:
    """The grid of a request: its variants from ``families`` (those that need the model get ``loaded``)."""
    variants = generate(ctx.forget, families, FamilyContext(loaded=loaded, candidates=ctx.candidates))
    templates = tuple(dict.fromkeys(v.template for v in variants if v.family == "templates")) or ctx.templates
    return Grid(tuple(variants), templates)


def with_declared_classes(hood: Neighbourhood, declared: Sequence[str], forget: Sequence[str]) -> Neighbourhood:
    """The preserve set of a hardened request also holds every class the model declares
    (``LoadedModel.vocabulary``, less the forget names and their aliases).

    Hardening solves for hundreds of variant rows, so its patches reach further than a plain one,
    into classes that are not near the forget names: on mini, hardening "one" cost the letter P 9
    points of its images until mini's own 20 classes were preserved (then 0). A model that
    declares its classes is used to tell exactly those apart."""
    gone = {*forget, *hood.alias_names()}
    preserve = list(dict.fromkeys([*hood.preserve, *(n for n in declared if n not in gone)]))
    return replace(hood, preserve=preserve)


def retained_of(ctx: SolveContext) -> list[str]:
    """The classes a bypass competes with: the candidates less the forget names and their aliases."""
    gone = {*ctx.forget, *ctx.neighbourhood.alias_names()}
    return [c for c in ctx.candidates if c not in gone]


def check(ctx: SolveContext, grid: Grid, change: Change) -> Check:
    results = outcomes(ctx.space, change, grid.variants, retained_of(ctx))
    done = {p for p, _ in ctx.extra_forget}
    return Check(tuple(r for r in results if r.bypass), tuple(r for r in results if r.variant.prompt not in done),
                 tuple(regressed(ctx, grid.templates, change)), summarise(results))


def regressed(ctx: SolveContext, templates: Sequence[str], change: Change) -> list[str]:
    """Prompts of retained classes whose original embedding now picks another candidate."""
    keep = set(retained_of(ctx))
    out = []
    for _, prompts, _, pred in per_template(ctx.space, templates, ctx.candidates, change):
        out += [prompts[i] for i, c in enumerate(ctx.candidates) if c in keep and pred[i] != i]
    return out


def run(ctx: SolveContext, grid: Grid, solved: Any, resolve: Callable[[SolveContext], Any]) -> tuple[SolveContext, Any]:
    """Solve again (``resolve``) while the grid finds bypasses or regressions, at most ``MAX_ROUNDS``
    times; the solve returned carries the last look through the grid in its effect (``audit``)."""
    result = check(ctx, grid, feature_change(solved.layer, ctx.projection))
    rounds = 0
    while not result.clean and rounds < MAX_ROUNDS:
        rounds += 1
        solved = resolve(harder(ctx, result))
        ctx = solved.context
        result = check(ctx, grid, feature_change(solved.layer, ctx.projection))
    return ctx, with_audit(solved, result, rounds)


def with_audit(solved: Any, result: Check, rounds: int) -> Any:
    audit = {"families": result.summary, "rounds": rounds, "clean": result.clean,
             "bypasses": [o.variant.prompt for o in result.bypasses], "regressed": list(result.regressed)}
    return replace(solved, effect=replace(solved.effect, audit=audit))


def drift(ctx: SolveContext, grid: Grid, change: Change) -> float:
    """How far a change moves the retained classes' prompts under the grid's templates: the mean of
    ``1 - cos(before, after)``. Of two solves that both pass the grid, the one that moves them
    less cost fewer images of retained classes on mini (``ranks.hardened_at_rank``)."""
    keep = set(retained_of(ctx))
    prompts = [t.format(c) for t in grid.templates for c in ctx.candidates if c in keep]
    return float(np.mean(cosine_drift(ctx.space, prompts, change))) if prompts else 0.0


def no_worse(ctx: SolveContext, grid: Grid, solved: Any) -> Callable[[Any], bool]:
    """A test that a smaller solve finds no more in the grid than ``solved`` and leaves no more of
    the forget prompts close to their originals (``bypass.still_close``), for the rank search:
    on mini, truncating hardened two-name patches to two factors passed the grid yet left "one"
    at up to 32% of its images; with the closeness count every forget name was at most 1%.

    A smaller rank may leave ``CLOSE_SLACK`` of the forget prompts more close than the full
    solve: a solve at rank 1 moves a little less than one at rank 323, and without the slack a
    hardened "tabby cat" on ViT-B-32 stayed at rank 16 (67 KB) for one or two prompts of its
    85 templates; on mini the slack changed no image result."""
    found = len(solved.effect.audit.get("bypasses", [])) + len(solved.effect.audit.get("regressed", []))
    close = close_forget_prompts(ctx, grid.templates, feature_change(solved.layer, ctx.projection))
    close += int(CLOSE_SLACK * len(grid.templates) * len(ctx.forget))

    def accept(trial: Any) -> bool:
        change = feature_change(trial.layer, ctx.projection)
        if close_forget_prompts(ctx, grid.templates, change) > close:  # the cheap test first: a few hundred prompts
            return False
        audit = trial.effect.audit  # a trial hardened at its rank was checked through the grid last thing
        if audit:  # (bypasses and regressions depend on the change and the candidates only, as here)
            return len(audit.get("bypasses", [])) + len(audit.get("regressed", [])) <= found
        result = check(ctx, grid, change)
        return len(result.bypasses) + len(result.regressed) <= found

    return accept


def close_forget_prompts(ctx: SolveContext, templates: Sequence[str], change: Change) -> int:
    """How many forget names, each under each of ``templates``, keep their original direction after ``change``."""
    prompts = [t.format(f) for t in templates for f in ctx.forget]
    before = ctx.space.block(prompts).unit
    return int(still_close(before, unit_rows(ctx.space.embed_changed(prompts, change))).sum())


def harder(ctx: SolveContext, result: Check) -> SolveContext:
    """The context for the next solve: bypass prompts join the forget rows, regressed prompts the
    preserve rows; a bypass that is a forget row already, and a regressed prompt, weigh
    ``REPAIR_STEP`` times more each round (one forget row among hundreds of variants is easily
    outweighed: on mini "cinque" stayed a way back to the fives until it was held harder).

    A bypass row's target is the antipode of its stand-in (the forget name in the variant's
    template: where the class's images are), not of the variant itself: sent to its own
    antipode, "a photo of a uno." still found 7% of mini's ones after a "one + four" patch (89%
    before the rank search cut it to 3 factors); sent opposite "a photo of a one.", 0%. Over
    the 58 requests of ``tools/sweep_forgetting.py``, variants within bounds went from 48 to 58."""
    found = (*result.bypasses, *result.pending)
    done = {p for p, _ in ctx.extra_forget}
    forget_rows = dict.fromkeys([*ctx.extra_forget, *((o.variant.prompt, o.variant.stand_in) for o in found)])
    emphasis = {**ctx.emphasis, **{p: ctx.emphasis.get(p, 1.0) * REPAIR_STEP for p in result.regressed}}
    stronger = {o.variant.prompt for o in result.bypasses if o.variant.prompt in done}
    forget_emphasis = {**ctx.forget_emphasis, **{p: ctx.forget_emphasis.get(p, 1.0) * REPAIR_STEP for p in stronger}}
    return replace(ctx, extra_forget=tuple(forget_rows), emphasis=emphasis, forget_emphasis=forget_emphasis)
