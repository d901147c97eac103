"""The forgetting engine: acceptance on ViT-B-32:none, RN50:none and mini, recipes, compose, bad input."""

from __future__ import annotations

import os
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from forgetpack.engine import features
from forgetpack.engine.measure import PROBE_TEMPLATES, measure_patches
from forgetpack.engine.models import LoadedModel, load_model
from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix
from forgetpack.engine.request import Effect, ForgetRequest, Recipe
from forgetpack.engine.solve import compose, forget
from forgetpack.engine.solvers import Weights
from forgetpack.engine.torch_patch import apply_patches
from forgetpack.format.errors import ForgetpackError, PatchError
from forgetpack.format.patch import read_patch, stack

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


_models: dict[str, LoadedModel] = {}


def model(spec: str) -> LoadedModel:
    """One loaded model per spec for the whole module (patches are applied to copies of matrices)."""
    if spec not in _models:
        _models[spec] = load_model(spec)
    return _models[spec]


def classify_check(loaded: LoadedModel, result, templates, patch=None) -> tuple[dict, float]:
    """Independent of ``forgetpack.engine.measure``: apply the patch to the model itself, then classify the
    candidates' original embeddings over their patched embeddings, template by template."""
    report = result.report
    patch = patch or result.patch
    forget_names = report["recipe"]["forget"]
    aliases = {n for pairs in report["aliases"].values() for n, _ in pairs}
    candidates = list(dict.fromkeys([*forget_names, *report["recipe"]["preserve"],
                                     *(n for ns in report["neighbours"].values() for n, _ in ns), *aliases]))
    proj = find_projection(loaded.model, "text")
    base = projection_matrix(loaded.model, proj)
    bias = projection_bias(loaded.model, proj)
    try:
        apply_patches(loaded.model, [patch])  # checks the base fingerprint
        patched = projection_matrix(loaded.model, proj)
    finally:
        import torch

        with torch.no_grad():
            dict(loaded.model.named_parameters())[proj.target].copy_(torch.from_numpy(base))
    predicted, kept, total = {}, 0, 0
    for t in templates:
        X = features.text_features(loaded, [t.format(c) for c in candidates]).astype(np.float64)
        before = X @ proj.feature_form(base) + (bias if bias is not None else 0)
        after = X @ proj.feature_form(patched) + (bias if bias is not None else 0)
        before /= np.linalg.norm(before, axis=1, keepdims=True)
        after /= np.linalg.norm(after, axis=1, keepdims=True)
        pred = np.argmax(before @ after.T, axis=1)
        for i, c in enumerate(candidates):
            if c in forget_names:
                predicted[(c, t)] = candidates[pred[i]]
            elif c not in aliases:
                total += 1
                kept += int(pred[i] == i)
    return predicted, kept / total


CASES = [
    ("ViT-B-32:none", ["tabby cat"], ()),
    ("ViT-B-32:none", ["goldfish", "volcano", "pizza"], ()),
    ("RN50:none", ["tabby cat"], ()),
    ("RN50:none", ["goldfish", "volcano", "pizza"], ()),
    ("mini", ["seven"], DIGITS),
    ("mini", ["one", "four", "seven"], DIGITS),
]


@pytest.mark.parametrize("spec,names,extra", CASES, ids=[f"{s}-{len(n)}" for s, n, _ in CASES])
def test_acceptance(spec: str, names: list[str], extra) -> None:
    loaded = model(spec)
    result = forget(loaded, names, vocabulary=extra)
    templates = result.report["recipe"]["templates"]
    predicted, retained = classify_check(loaded, result, templates)
    for (name, template), now in predicted.items():
        assert now != name, f"{name!r} still recognised with template {template!r}"
    assert retained >= 0.98
    assert result.report["effect"]["all_outranked"]
    # the patch records its recipe and effect, and verifies against its base
    patch = result.patch
    assert patch.model == loaded.model_id
    assert patch.recipe["forget"] == names and patch.recipe["solver"] == "closed-form"
    assert set(patch.effect["forget"]) == set(names)
    assert all(e["outranked"] for e in patch.effect["forget"].values())
    # the typed recipe and effect read back exactly what the patch carries
    assert Recipe.from_json(patch.recipe).to_json() == patch.recipe
    assert Effect.from_json(patch.effect).to_json() == patch.effect
    assert Effect.from_json(result.report["effect"]).report() == result.report["effect"]
    proj = find_projection(loaded.model, "text")
    from forgetpack.format.patch import fingerprint

    assert patch.base[proj.target] == fingerprint(projection_matrix(loaded.model, proj))


def test_a_lost_retained_class_is_repaired_not_averaged_away() -> None:
    """Forgetting "two" and "nine" together: the first solve keeps every candidate under the five
    forgetting templates, so the aggregate rule accepted it, but loses "one" under held-out probe
    phrasings (and that patch cost 14 pt of UCI "one" images). A lost class is repaired: at the
    end no retained candidate loses its class under any template or probe. (With the antipode target,
    which moves the forget prompts farthest; the default mirror loses no class here at all.)"""
    loaded = model("mini")
    result = forget(loaded, ["two", "nine"], target="antipode")
    report = result.report
    first = report["attempts"][0]
    assert first["outranked"] and first["retained_min"] >= 0.98 and "one" in first["lost"]  # what the old rule kept
    assert report["effect"]["lost"] == {} and result.patch.effect["lost"] == {}
    verdicts = report["classes"]
    assert verdicts["two"] == verdicts["nine"] == "forgotten" and verdicts["one"] == "repaired"
    assert "lost" not in verdicts.values()
    assert all(verdicts[n] in ("kept", "repaired") for n in report["recipe"]["preserve"])
    assert result.patch.rank == 2  # a repair costs no rank
    # independently of forgetpack.engine.measure, under every template and probe
    predicted, retained = classify_check(loaded, result, [*report["recipe"]["templates"], *PROBE_TEMPLATES])
    assert retained == 1.0 and all(now != name for (name, _), now in predicted.items())


def test_patch_round_trip_and_wrong_base(tmp_path) -> None:
    vit, rn50 = model("ViT-B-32:none"), model("RN50:none")
    result = forget(vit, ["tabby cat"])
    path = result.patch.save(tmp_path / "cat.fpatch.safetensors")
    again = read_patch(path)
    assert again.digest == result.patch.digest and again.recipe == result.patch.recipe
    with pytest.raises(PatchError):
        apply_patches(rn50.model, [again])


def test_recipe_records_everything_needed_to_solve_again() -> None:
    vit = model("ViT-B-32:none")
    result = forget(vit, ["tabby cat"], templates=["{}", "a photo of a {}."], rank=2, seed=3)
    recipe = result.patch.recipe
    assert recipe["templates"] == ["{}", "a photo of a {}."] and recipe["rank"] == 2 and recipe["seed"] == 3
    assert recipe["target"] == "mirror" and recipe["preserve_mode"] == "auto:20"
    added = recipe["preserve_added"]  # the adaptive round's most-moved names join the 20 nearest
    assert len(recipe["preserve"]) == 20 + len(added) and set(added) <= set(recipe["preserve"])
    assert result.patch.rank == 2
    same = forget(vit, ["tabby cat"], templates=recipe["templates"], rank=2, seed=3)
    np.testing.assert_array_equal(same.patch.layers[0].delta(), result.patch.layers[0].delta())
    again = forget(vit, ["tabby cat"], preserve=recipe["preserve"], templates=recipe["templates"], rank=2, seed=3)
    assert again.patch.recipe["preserve"] == recipe["preserve"] and again.report["effect"]["all_outranked"]
    # the same request, as an object
    request = ForgetRequest(["tabby cat"], templates=recipe["templates"], rank=2, seed=3)
    np.testing.assert_array_equal(forget(vit, request).patch.layers[0].delta(), result.patch.layers[0].delta())


def test_empty_target_redraws_away_from_forget_classes() -> None:
    vit = model("ViT-B-32:none")
    # forget the name nearest to the empty string: the paper's re-draw rule must kick in
    from forgetpack.engine.vocabulary import vocabulary

    names = vocabulary()
    proj = find_projection(vit.model, "text")
    M = proj.feature_form(projection_matrix(vit.model, proj))
    emb = features.text_features(vit, ["", *names]).astype(np.float64) @ M
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    nearest = names[int(np.argmax(emb[1:] @ emb[0]))]
    a = forget(vit, [nearest], target="empty", templates=["{}"], verify=False)
    b = forget(vit, [nearest], target="empty", templates=["{}"], verify=False)
    np.testing.assert_array_equal(a.patch.layers[0].up, b.patch.layers[0].up)  # seeded draws
    assert a.report["effect"]["forget"][nearest]["predicted"]["{}"] != nearest


def test_unit_norm_target_is_reached_by_shrinking() -> None:
    """Why the default target carries the original norm: the paper's unit target (embedding norms
    are ~20 here) is mostly reached by shrinking, which keeps the direction, so the class survives."""
    vit = model("ViT-B-32:none")
    unit = forget(vit, ["tabby cat"], target="empty", target_norm="unit", verify=False)
    scaled = forget(vit, ["tabby cat"], target="empty", target_norm="original", verify=False)
    assert not unit.report["effect"]["all_outranked"]
    assert scaled.report["effect"]["all_outranked"]
    assert unit.report["effect"]["forget"]["tabby cat"]["self_similarity"] > scaled.report["effect"]["forget"]["tabby cat"]["self_similarity"]


def test_verification_strengthens_then_fails_clearly() -> None:
    vit = model("ViT-B-32:none")
    weak = forget(vit, ["tabby cat"], weights=Weights(0.002, 1.0, 1e-3))
    assert len(weak.report["attempts"]) > 1 and not weak.report["attempts"][0]["outranked"]
    assert weak.report["effect"]["all_outranked"]
    assert weak.patch.recipe["weights"]["forget"] > 0.002
    with pytest.raises(ForgetpackError, match="could not verify forgetting of 'tabby cat'"):
        forget(vit, ["tabby cat"], weights=Weights(1e-9, 1e6, 1e3))


def test_aliases_are_reported_and_not_preserved() -> None:
    from forgetpack import mini

    m, p, t = mini.create_untrained()
    loaded = LoadedModel(m.eval(), p, t, "mini-untrained", mini.MINI_ARCH)  # MiniLM knows "7" is "seven"
    result = forget(loaded, ["seven"], vocabulary=["7", "eight", "Seven."], templates=["{}"], verify=False)
    aliases = [n for n, _ in result.report["aliases"]["seven"]]
    assert "7" in aliases and "eight" not in aliases
    assert "7" not in result.patch.recipe["preserve"] and "eight" in result.patch.recipe["preserve"]
    assert "Seven." not in result.patch.recipe["preserve"]  # the same name, normalised
    explicit = forget(loaded, ["seven"], preserve=["7", "eight"], templates=["{}"], verify=False,
                      allow_unknown=True)  # no declared classes: "seven" is not among the built-in names
    assert explicit.patch.recipe["preserve"] == ["eight"] and explicit.report["dropped_preserve"] == ["7"]


def test_compose_solves_the_union_and_compares_with_stacking() -> None:
    vit = model("ViT-B-32:none")
    a = forget(vit, ["goldfish"], templates=["{}", "a photo of a {}."])
    b = forget(vit, ["volcano"], templates=["{}", "a photo of a {}."])
    composed = compose(vit, [a.patch, b.patch])
    recipe = composed.patch.recipe
    assert recipe["forget"] == ["goldfish", "volcano"]
    assert set(recipe["preserve"]) == (set(a.patch.recipe["preserve"]) | set(b.patch.recipe["preserve"])) - {"goldfish", "volcano"}
    assert composed.report["effect"]["all_outranked"]
    predicted, retained = classify_check(vit, composed, recipe["templates"])
    assert retained >= 0.98 and all(now != name for (name, _), now in predicted.items())
    # the stacked patch, measured on the same candidates (tools/bench_solvers.py reports both)
    predicted, retained = classify_check(vit, composed, recipe["templates"], patch=stack([a.patch, b.patch]))
    assert 0.0 <= retained <= 1.0 and len(predicted) == 2 * len(recipe["templates"])
    effect = measure_patches(vit, [composed.patch], composed.report)
    assert effect.all_outranked and effect.retained == composed.report["effect"]["retained"]
    with pytest.raises(ForgetpackError, match="made for model"):
        compose(model("RN50:none"), [a.patch])
    # the one fit rule: a patch for another base of the same model id does not fit
    other = replace(a.patch, base={target: "sha256:" + "0" * 64 for target in a.patch.base})
    with pytest.raises(PatchError, match="made for a different base"):
        compose(vit, [other])
    with pytest.raises(ForgetpackError, match="records no forgetting recipe"):
        compose(vit, [stack([a.patch, b.patch])])


@pytest.mark.parametrize("kwargs,message", [
    ({"forget": []}, "no forget names"),
    ({"forget": ["  "]}, "empty forget name"),
    ({"forget": ["cat", "Cat"]}, "duplicate forget name"),
    ({"forget": ["cat"], "preserve": ["dog", "cat"]}, "both a forget name and a preserve name"),
    ({"forget": ["cat"], "preserve": ["dog", "dog"]}, "duplicate preserve name"),
    ({"forget": ["cat"], "rank": 0}, "rank must be a positive integer"),
    ({"forget": ["cat"], "auto_preserve": -1}, "must be ≥ 0"),
    ({"forget": ["cat"], "templates": ["a photo"]}, "must contain"),
    ({"forget": ["cat"], "target": "moon"}, "unknown target"),
    ({"forget": ["cat"], "target_norm": "huge"}, "unknown target norm"),
    ({"forget": ["cat"], "solver": "magic"}, "unknown solver 'magic' .installed: closed-form, nullspace, paper"),
    ({"forget": ["cat"], "preserve": ["dog"], "auto_preserve": 3}, "either an explicit preserve list"),
])  # fmt: skip
def test_bad_requests_fail_before_any_model_work(kwargs, message) -> None:
    with pytest.raises(ForgetpackError, match=message):
        ForgetRequest(**kwargs)


def test_request_defaults_and_normalisation() -> None:
    from forgetpack.format.names import FORGET_TEMPLATES

    request = ForgetRequest([" tabby  cat "], preserve=["dog"], templates=["{}", "{}", "a {}."])
    assert request.forget == ("tabby cat",) and request.preserve == ("dog",) and request.templates == ("{}", "a {}.")
    assert request.preserve_mode == "explicit" and not request.adaptive
    auto = ForgetRequest(["cat"])
    assert auto.templates == FORGET_TEMPLATES and auto.preserve_mode == "auto:20" and auto.adaptive
    assert replace(auto, auto_preserve=0).preserve_mode == "auto:0"
    with pytest.raises(ForgetpackError, match="rank must be"):
        replace(auto, rank=-1)  # replace checks again
    with pytest.raises(TypeError):
        forget(model("ViT-B-32:none"), auto, rank=2)  # options belong in the request


def test_measure_is_consistent_with_the_independent_check() -> None:
    vit = model("ViT-B-32:none")
    result = forget(vit, ["tabby cat"])
    _, retained = classify_check(vit, result, result.report["recipe"]["templates"])
    assert retained == pytest.approx(result.report["effect"]["retained"], abs=1e-3)


def test_default_one_class_patch_on_a_512_projection_is_under_16kb(tmp_path) -> None:
    """The patch-format issue's size bar, met by the default solver itself: the closed form
    keeps only the leading factors that verify as well as all of them."""
    vit = model("ViT-B-32:none")
    result = forget(vit, ["tabby cat"])
    path = result.patch.save(tmp_path / "cat.fpatch.safetensors")
    assert path.stat().st_size < 16 * 1024, path.stat().st_size
    full = forget(vit, ["tabby cat"], rank=5)  # an explicit rank is honoured, not shrunk
    assert result.patch.layers[0].rank < full.patch.layers[0].rank == 5
    assert result.report["effect"]["all_outranked"] and result.report["effect"]["retained_min"] >= full.report["effect"]["retained_min"]
    assert (path.stat().st_mode & 0o777) == 0o666 & ~_umask()  # mkstemp's 0600 is not kept


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
