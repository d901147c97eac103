"""Hardening: solve again until the bypass grid is clean; the patch records what it was audited against."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from forgetpack.cli import main
from forgetpack.engine import harden
from forgetpack.engine.bypass import Outcome
from forgetpack.engine.request import DEFAULT_HARDEN_FAMILIES, ForgetRequest, Recipe
from forgetpack.engine.variants import Variant
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.patch import read_patch

# one xdist worker runs these and mini's hardened cat test in turn: they encode the same grid prompts
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("hardened-mini")]


@pytest.fixture(scope="module")
def mini():
    from forgetpack.engine.models import load_model

    return load_model("mini")


def test_a_hardened_patch_is_clean_and_says_so(mini, tmp_path, capsys) -> None:
    """Forgetting two and nine regresses retained prompts under phrasings nobody solved on; hardening
    repairs them, and the patch records the families, the rounds and the clean result."""
    from forgetpack.engine.solve import forget

    plain = forget(mini, ForgetRequest(["two", "nine"]))
    hardened = forget(mini, ForgetRequest(["two", "nine"], harden=DEFAULT_HARDEN_FAMILIES))
    audit = hardened.report["effect"]["audit"]
    assert audit["clean"] and audit["bypasses"] == [] and audit["regressed"] == []
    assert set(audit["families"]) == set(DEFAULT_HARDEN_FAMILIES) - {"synonyms"}  # numbers: the lexicon's, not WordNet's
    assert audit["families"]["templates"]["tried"] == 2 * 85  # 80 ImageNet templates, the engine's 3 and mini's 2, per name
    assert "audit" not in plain.report["effect"] and "harden" not in plain.patch.recipe  # off: metadata unchanged
    assert len(hardened.report["attempts"]) > len(plain.report["attempts"])  # the grid found something to repair
    path = hardened.patch.save(tmp_path / "h.fpatch")
    recorded = read_patch(path)
    assert recorded.recipe["harden"] == list(DEFAULT_HARDEN_FAMILIES) and recorded.effect["audit"]["clean"]
    assert Recipe.from_json(recorded.recipe).harden == list(DEFAULT_HARDEN_FAMILIES)  # compose re-hardens
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 0
    shown = capsys.readouterr().out
    assert "hardened" in shown and "templates, surface, lexicon" in shown and "clean after" in shown


def test_harden_on_the_command_line(tmp_path, capsys) -> None:
    code = main(["forget", "mini", "--forget", "seven", "--harden", "-o", str(tmp_path / "s.fpatch"), "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["effect"]["audit"]["clean"] and report["recipe"]["harden"] == list(DEFAULT_HARDEN_FAMILIES)
    assert main(["forget", "mini", "--forget", "seven", "--harden-family", "templates", "-o", str(tmp_path / "x")]) == 1
    assert "--harden-family needs --harden" in capsys.readouterr().err
    assert main(["forget", "mini", "--forget", "seven", "--harden", "--harden-family", "nope", "-o", str(tmp_path / "x")]) == 1
    assert "unknown variant family 'nope'" in capsys.readouterr().err
    with pytest.raises(ForgetpackError, match="unknown variant family"):
        ForgetRequest(["seven"], harden=("telepathy",))
    assert main(["inspect", str(tmp_path / "s.fpatch")]) == 0
    assert "clean after" in " ".join(capsys.readouterr().out.split())
    assert main(["forget", "mini", "--forget", "seven", "-o", str(tmp_path / "plain.fpatch")]) == 0
    assert "other names for the class were not tried" in " ".join(capsys.readouterr().out.split())  # a plain patch says so


def test_the_models_own_templates_join_the_template_family() -> None:
    """A model that declares its prompt templates (mini: "a photo of the number {}.") is hardened under them too."""
    from types import SimpleNamespace

    from forgetpack.engine.variants import FamilyContext, TemplateFamily

    model = SimpleNamespace(templates=("a photo of the number {}.", "a photo of a {}."))
    kinds = {v.template: v.kind for v in TemplateFamily().variants("seven", FamilyContext(loaded=model))}
    assert kinds["a photo of the number {}."] == "model" and kinds["a photo of a {}."] == "imagenet"
    assert "a photo of the number {}." not in {v.template for v in TemplateFamily().variants("seven", FamilyContext())}


def test_harder_turns_findings_into_rows() -> None:
    """Bypass prompts become forget rows (once), regressed prompts preserve rows held harder each round."""
    from forgetpack.engine.measure import SolveContext, TextSpace
    from forgetpack.engine.preserve import Neighbourhood
    from forgetpack.engine.projections import Projection

    ctx = SolveContext(TextSpace({}, np.eye(2), None), Projection("w", "in_out", "test"), ("seven",), (), ("seven", "one"),
                       Neighbourhood([]), ("{}",), ())
    bypass = Outcome(Variant("lexicon", "seven", "sieben", "a photo of a {}."), recognised=True, reached=True)
    found = harden.Check((bypass,), (), ("a photo of a one.",), {})
    once = harden.harder(ctx, found)
    twice = harden.harder(once, found)
    assert twice.extra_forget == (("a photo of a sieben.", "a photo of a seven."),)  # with its stand-in
    assert once.emphasis["a photo of a one."] == harden.REPAIR_STEP
    assert twice.emphasis["a photo of a one."] == harden.REPAIR_STEP**2
    assert "a photo of a sieben." not in once.forget_emphasis  # a new forget row first
    assert twice.forget_emphasis["a photo of a sieben."] == harden.REPAIR_STEP  # then held harder while it stays open
    assert not found.clean and harden.Check((), (), (), {}).clean
    opened = replace(bypass, recognised=False)  # the base did not pick it, the change does: opened by the change
    assert opened.bypass and opened.opened and not bypass.opened
    assert not replace(bypass, reached=False).bypass


def test_emphasised_forget_rows_weigh_more_in_the_problem() -> None:
    """A forget prompt with a ``forget_emphasis`` factor k counts k times: its row and its target scaled by √k."""
    from forgetpack.engine.measure import SolveContext, TextSpace
    from forgetpack.engine.preserve import Neighbourhood
    from forgetpack.engine.projections import Projection
    from forgetpack.engine.request import ForgetRequest
    from forgetpack.engine.solve import build_problem
    from forgetpack.engine.solvers import get_solver

    features = {"seven": np.array([1.0, 0.0]), "sieben": np.array([0.6, 0.8]), "one": np.array([0.0, 1.0])}
    ctx = SolveContext(TextSpace(features, np.eye(2), None), Projection("w", "in_out", "test"), ("seven",), ("one",),
                       ("seven", "one"), Neighbourhood(["one"]), ("{}",), (), extra_forget=(("sieben", "seven"),))
    solver = get_solver("closed-form")
    plain = build_problem(ctx, solver, ForgetRequest(["seven"]), solver.default_weights(1))
    held = build_problem(replace(ctx, forget_emphasis={"sieben": 9.0}), solver, ForgetRequest(["seven"]), solver.default_weights(1))
    assert np.allclose(held.X_f, plain.X_f * [[1.0], [3.0]]) and np.allclose(held.T, plain.T * [[1.0], [3.0]])
    assert np.allclose(plain.T[1], -features["seven"])  # a bypass row goes opposite its stand-in, not itself


def test_a_forget_prompt_that_keeps_its_direction_counts_as_close() -> None:
    """Losing to another class in text space is not enough: "seven" moved to 0.33 cosine of its
    original is still close (images are far less crowded than texts) and the rank search counts
    it; moved past ``REACH_SIMILARITY`` it is not."""
    from forgetpack.engine.bypass import REACH_SIMILARITY
    from forgetpack.engine.measure import SolveContext, TextSpace
    from forgetpack.engine.preserve import Neighbourhood
    from forgetpack.engine.projections import Projection

    features = {"seven": np.array([0.95, 0.31, 0]), "six": np.array([0.6, 0, 0.8])}
    ctx = SolveContext(TextSpace(features, np.eye(3), None), Projection("w", "in_out", "test"), ("seven",), ("six",),
                       ("seven", "six"), Neighbourhood(["six"]), ("{}",), ())
    up = np.array([[0.0], [1.0], [0.0]])  # moves only what has the second feature: "seven"
    assert REACH_SIMILARITY == 0.2
    assert harden.close_forget_prompts(ctx, ["{}"], (up, np.array([[-3.0, 2.0, 0.0]]))) == 1  # 0.33 of its original
    assert harden.close_forget_prompts(ctx, ["{}"], (up, np.array([[-10.0, 0.5, 0.0]]))) == 0  # turned away: gone
    assert harden.close_forget_prompts(ctx, ["{}"], (up, np.zeros((1, 3)))) == 1  # unchanged


def test_drift_measures_how_far_the_retained_prompts_move() -> None:
    """Of two solves that pass the grid, the rank search keeps the one that moves retained prompts
    least: moving the forget name costs no drift, turning "six" 45 degrees costs 1 - cos 45° over
    the two retained prompts."""
    from forgetpack.engine.measure import SolveContext, TextSpace
    from forgetpack.engine.preserve import Neighbourhood
    from forgetpack.engine.projections import Projection

    features = {"seven": np.array([1.0, 0, 0]), "six": np.array([0, 1.0, 0]), "hook": np.array([0, 0, 1.0])}
    ctx = SolveContext(TextSpace(features, np.eye(3), None), Projection("w", "in_out", "test"), ("seven",), ("six", "hook"),
                       ("seven", "six", "hook"), Neighbourhood(["six", "hook"]), ("{}",), ())
    grid = harden.Grid((), ("{}",))
    assert harden.drift(ctx, grid, (np.array([[1.0], [0], [0]]), np.array([[-2.0, 0, 0]]))) == pytest.approx(0.0)
    turned = (np.array([[0], [0], [1.0]]), np.array([[0, 1.0, 0]]))  # six -> (0, 1, 1)
    assert harden.drift(ctx, grid, turned) == pytest.approx((1 - np.sqrt(0.5)) / 2)


def test_hardening_preserves_the_classes_a_model_declares() -> None:
    from forgetpack.engine.preserve import Neighbourhood

    hood = Neighbourhood(["six", "eight"], aliases={"seven": [("7", 0.9)]})
    held = harden.with_declared_classes(hood, ["seven", "7", "one", "six", "P"], ["seven"])
    assert held.preserve == ["six", "eight", "one", "P"]  # not the forget name, not its aliases, no repeats
    assert hood.preserve == ["six", "eight"]  # the neighbourhood it came from is unchanged


def test_a_hardened_search_solves_again_on_the_rank_ladder() -> None:
    """Cutting factors keeps the nested optimum of rows weighed for the full rank; a hardened search
    instead solves again at 1, 2, 4, 8... factors (``rank_ladder``) and keeps the first that does as well."""
    from forgetpack.engine import ranks

    assert ranks.rank_ladder(1, 323) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert ranks.rank_ladder(2, 9) == [2, 4, 8] and ranks.rank_ladder(3, 3) == []
    full = solve_stub(rank=20, vocabulary=0.90)
    tried = []

    def at_rank(r):
        tried.append(r)
        return [] if r == 1 else [solve_stub(rank=r, vocabulary=0.90 if r >= 4 else 0.80)]  # rank 1 cannot verify

    chosen = ranks.smallest_rank(full.context, full, accept=None, at_rank=at_rank)
    assert chosen.solution.rank == 4 and tried == [1, 2, 4]


def test_each_rank_tries_the_solve_that_drifts_least_first(monkeypatch) -> None:
    """At each rank the request is hardened from every start (before and after hardening at full
    rank); the solves come back least drift first, and a start that cannot verify is left out."""
    from types import SimpleNamespace

    from forgetpack.engine import ranks

    drifts = {"plain": 0.03, "hardened": 0.02}
    monkeypatch.setattr(harden, "run", lambda ctx, grid, solved, resolve: (ctx, solved))  # the grid is clean
    monkeypatch.setattr(harden, "drift", lambda ctx, grid, change: change)
    monkeypatch.setattr(ranks, "feature_change", lambda layer, projection: drifts[layer])
    projection = object()

    def solve_at(ctx, weights, r):
        if ctx == "broken":
            raise ForgetpackError("cannot verify at this rank")
        return SimpleNamespace(layer=ctx, context=SimpleNamespace(projection=projection), rank=r)

    at_rank = ranks.hardened_at_rank([("plain", None), ("hardened", None)], harden.Grid((), ()), solve_at)
    assert [(s.layer, s.rank) for s in at_rank(2)] == [("hardened", 2), ("plain", 2)]
    drifts["plain"] = 0.01
    assert [s.layer for s in at_rank(1)] == ["plain", "hardened"]
    only = ranks.hardened_at_rank([("plain", None), ("broken", None)], harden.Grid((), ()), solve_at)
    assert [s.layer for s in only(4)] == ["plain"]


def solve_stub(rank: int, vocabulary: float):
    """A ``Solved`` whose effect verifies with the given vocabulary retention (nothing else differs)."""
    from forgetpack.engine.measure import SolveContext, TextSpace
    from forgetpack.engine.preserve import Neighbourhood
    from forgetpack.engine.projections import Projection
    from forgetpack.engine.request import Effect, NameEffect
    from forgetpack.engine.solve import Solved
    from forgetpack.engine.solvers import Solution, Weights

    ctx = SolveContext(TextSpace({}, np.eye(4), None), Projection("w", "in_out", "test"), ("seven",), (), ("seven",),
                       Neighbourhood([]), ("{}",), ())
    effect = Effect({"seven": NameEffect(-0.5, True, {"{}": "six"})}, 1.0, 1.0, vocabulary, 0.0, 2)
    return Solved(Solution(np.zeros((4, rank)), np.zeros((rank, 4)), {}), None, effect, Weights(1.0, 1.0, 0.1), ctx)
