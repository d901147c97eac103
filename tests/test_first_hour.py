"""Issue 23, "the first hour of a new user": mistyped and unknown forget names are refused with
their nearest known names; ``eval`` takes the forget names the patches record; a patch for
another model, or a stacked patch given to ``compose``, is refused early in one line naming the
file and the model the patch was made for."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from patch_factory import base_matrices, make_patch
from serve_helpers import forget_patches

from forgetpack.cli import main
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.patch import Layer, Patch, read_patch, stack

MINI_WEIGHTS = Path(__file__).resolve().parents[1] / "forgetpack" / "mini" / "mini.safetensors"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def mini():
    from forgetpack.engine.models import load_model

    return load_model("mini")


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    """A patch made for a ViT-B-32 (its text projection is ``text_projection``, not mini's)."""
    rng = np.random.default_rng(0)
    base = {"text_projection": rng.standard_normal((512, 512)).astype(np.float32)}
    layer = Layer.lowrank("text_projection", rng.standard_normal((512, 1)) * 0.01, rng.standard_normal((1, 512)))
    patch = Patch.create("ViT-B-32:none", base, [layer], recipe={"forget": ["tabby cat"], "engine": 1})
    return patch.save(tmp_path / "vit-cat.fpatch.safetensors")


# ---------------------------------------------------------------------------- 1. unknown names


def test_a_mistyped_name_is_refused_with_its_nearest_known_names(tmp_path, capsys) -> None:
    out_path = tmp_path / "p.fpatch.safetensors"
    code, out, err = run(["forget", "mini", "--forget", "sevn", "-o", out_path], capsys)
    line = one_line(err)
    assert code == 1 and not out_path.exists()
    assert "'sevn' is not a class mini recognises" in line and "did you mean 'seven'?" in line
    assert "--allow-unknown" in line and "declared classes" in line  # says what was checked, and the way out


def test_a_name_the_model_never_saw_is_refused(tmp_path, capsys) -> None:
    out_path = tmp_path / "p.fpatch.safetensors"
    code, out, err = run(["forget", "mini", "--forget", "Obama", "-o", out_path], capsys)
    assert code == 1 and "'Obama' is not a class mini recognises" in one_line(err) and not out_path.exists()


def test_allow_unknown_forgets_it_anyway_and_says_so(tmp_path, capsys) -> None:
    out_path = tmp_path / "sevn.fpatch.safetensors"
    code, out, err = run(["forget", "mini", "--forget", "sevn", "--allow-unknown", "-o", out_path], capsys)
    assert code == 0, err
    assert read_patch(out_path).recipe["forget"] == ["sevn"]
    assert "forgotten (text)" in out  # the column says what it measures
    assert "'sevn' is not a class mini recognises" in err and "--allow-unknown" in err  # a warning, not an error

    composed = tmp_path / "composed.fpatch.safetensors"  # compose solves the recorded request again: the same rule
    code, out, err = run(["compose", "mini", out_path, "-o", composed], capsys)
    assert code == 1 and "--allow-unknown" in one_line(err) and not composed.exists()


def test_known_names_and_their_aliases_pass(mini) -> None:
    from forgetpack.engine.known import check_known

    verdict = check_known(mini, ["seven", "cat", "7", "Seven."])
    assert verdict.ok and [(name, known) for name, known, _ in verdict.aliases] == [("7", "seven")]
    assert "mini's" in verdict.checked and "declared classes" in verdict.checked


def test_the_library_refuses_before_any_solve(mini, monkeypatch) -> None:
    from forgetpack.engine import solve
    from forgetpack.engine.request import ForgetRequest

    monkeypatch.setattr(solve, "solve_verified", lambda *a, **k: pytest.fail("solved an unknown name"))
    with pytest.raises(ForgetpackError, match=r"'sevn' is not a class mini recognises.*did you mean 'seven'"):
        solve.forget(mini, ForgetRequest(["seven", "sevn"]))
    with pytest.raises(ForgetpackError, match="'Obama' is not a class mini recognises"):
        solve.forget(mini, ["Obama"])


def test_without_declared_classes_the_builtin_vocabulary_is_checked() -> None:
    from forgetpack.engine.known import check_known
    from forgetpack.engine.models import load_model

    vit = load_model("ViT-B-32:none")
    assert check_known(vit, ["tabby cat", "Tabby Cat"]).ok  # an ImageNet name, however spelled
    with pytest.raises(ForgetpackError, match=r"'tabby kat' is not a class ViT-B-32:none recognises.*did you mean "
                                              r"'tabby cat'.*checked the built-in vocabulary's 998 ImageNet names"):
        check_known(vit, ["tabby kat"])
    allowed = check_known(vit, ["tabby kat"], allow_unknown=True)
    assert [u.name for u in allowed.unknown] == ["tabby kat"] and len(allowed.unknown[0].nearest) == 3
    assert check_known(vit, ["tabby kat"], extra=["tabby kat"]).ok  # a name the request declares is known


# ---------------------------------------------------------------------------- 2. eval's default forget names


def test_eval_takes_the_forget_names_the_patches_record(tmp_path_factory, capsys) -> None:
    seven = forget_patches(tmp_path_factory, ("seven",))["seven"]
    code, out, err = run(["eval", "mini", "--patch", seven, "--dataset", "digits", "--json"], capsys)
    assert code == 0, err
    assert "forgetting (from the patches): seven" in err
    report = json.loads(out)
    assert report["forget"] == ["seven"] and report["forget_from"] == "patches"
    assert report["worst_retained_class"]["digits"]["class"] != "seven"  # the forgotten class is not "retained"


def test_recorded_forget_names_of_plain_and_stacked_patches() -> None:
    from forgetpack.evaluation.harness import recorded_forget

    base = base_matrices()
    a, b = make_patch(base, 1), make_patch(base, 2)
    assert recorded_forget([a]) == ["class1"]
    assert recorded_forget([stack([a, b]), a]) == ["class1", "class2"]


# ---------------------------------------------------------------------------- 3. early, clear refusals


def test_eval_of_a_patch_for_another_model_names_the_file_and_its_model(foreign, capsys, monkeypatch) -> None:
    from forgetpack.evaluation import harness

    monkeypatch.setattr(harness, "encode_images", lambda *a, **k: pytest.fail("images encoded before the fit check"))
    code, out, err = run(["eval", "mini", "--patch", foreign, "--dataset", "digits"], capsys)
    line = one_line(err)
    assert code == 1 and str(foreign) in line and "'ViT-B-32:none'" in line
    assert "text.proj.weight" in line  # what mini's patches target


def test_apply_and_verify_of_a_patch_for_another_model(foreign, tmp_path, capsys) -> None:
    out_path = tmp_path / "patched.safetensors"
    code, out, err = run(["apply", MINI_WEIGHTS, foreign, "-o", out_path], capsys)
    line = one_line(err)
    assert code == 1 and str(foreign) in line and "'ViT-B-32:none'" in line and not out_path.exists()
    code, out, err = run(["verify", foreign, "--base", MINI_WEIGHTS], capsys)
    line = one_line(err)
    assert code == 1 and str(foreign) in line and "'ViT-B-32:none'" in line
    assert "patchable matrices: text.proj.weight" in line  # not "none": this checkpoint takes mini's patches


def test_compose_refuses_a_stacked_patch_before_any_model_loads(tmp_path, capsys, monkeypatch) -> None:
    from forgetpack.engine import models, weights

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    monkeypatch.setattr(weights, "weights_only", lambda *a, **k: pytest.fail("a model was read"))
    base = base_matrices()
    stacked = stack([make_patch(base, 1), make_patch(base, 2)]).save(tmp_path / "stacked.fpatch.safetensors")
    out_path = tmp_path / "c.fpatch.safetensors"
    code, out, err = run(["compose", "mini", stacked, "-o", out_path], capsys)
    line = one_line(err)
    assert code == 1 and str(stacked) in line and "'test-model'" in line and "stack of 2 patches" in line
    assert not out_path.exists()


@pytest.mark.parametrize("spec", ["mini", "ViT-B-32:none"])
def test_projection_names_cover_the_engines_rules(spec) -> None:
    """``fit.PROJECTION_NAMES`` (how a checkpoint lists its patchable matrices) keeps up with the registry."""
    from forgetpack.engine.models import load_model
    from forgetpack.engine.projections import find_projection
    from forgetpack.format.fit import PROJECTION_NAMES, expected_layout

    model = load_model(spec).model
    for side in ("text", "image"):
        projection = find_projection(model, side)
        assert projection.target in PROJECTION_NAMES
        assert expected_layout(projection.target) == projection.layout  # a bare checkpoint's layout rule
