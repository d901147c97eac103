"""The evaluation harness: metric arithmetic, the report, caching, and the CLI's bad-input paths."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from forgetpack.cli import main
from forgetpack.evaluation import harness as ev
from forgetpack.evaluation.datasets import DIGIT_NAMES, LabeledImages
from forgetpack.format.errors import ForgetpackError

# ----------------------------------------------------------------------------- arithmetic


def _result(name, classnames, labels, predictions):
    return ev.DatasetResult(name, list(classnames), np.asarray(labels), np.asarray(predictions))


def test_metrics_on_a_hand_made_confusion():
    # 3 classes; class 0: 4 images, 3 right; class 1: 2 images, 0 right; class 2: 4 images, 4 right.
    labels = [0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    preds = [0, 0, 0, 2, 0, 2, 2, 2, 2, 2]
    r = _result("toy", ["a", "b", "c"], labels, preds)
    assert r.confusion.tolist() == [[3, 0, 1], [1, 0, 1], [0, 0, 4]]
    assert r.acc1 == pytest.approx(0.7)
    assert r.per_class.tolist() == pytest.approx([0.75, 0.0, 1.0])
    assert r.mean_per_class_recall == pytest.approx((0.75 + 0 + 1) / 3)
    assert r.accuracy_over([1]) == 0.0
    assert r.accuracy_over([0, 2]) == pytest.approx(7 / 8)
    assert math.isnan(_result("toy", ["a", "b"], [0, 0], [0, 1]).per_class[1])  # no images of "b"
    metrics = r.metrics()
    assert metrics["acc1"] == pytest.approx(0.7) and metrics["per_class_recall"]["b"] == 0.0


def test_forgetting_score_is_the_papers_formula():
    s, terms, note = ev.forgetting_score(
        forget_acc=(0.9, 0.09),  # ratio 0.1
        retain_acc=(0.8, 0.76),  # drop 0.05
        others={"x": (0.5, 0.55), "y": (1.0, 0.9), "z": (0.6, 0.3)},  # 0 (gain clipped), 0.1, 0.5
    )
    assert terms == pytest.approx({"forget": 0.1, "retain": 0.05, "other:x": 0.0, "other:y": 0.1, "other:z": 0.5})
    assert s == pytest.approx((0.1 + 0.05 + 0.0 + 0.1 + 0.5) / 5)
    assert note == ""

    s, terms, note = ev.forgetting_score((0.5, 0.0), (1.0, 0.98), {"letters": (0.9, 0.9)})
    assert s == pytest.approx((0.0 + 0.02 + 0.0) / 3)
    assert "averaged over 3 terms" in note

    s, terms, note = ev.forgetting_score((0.0, 0.0), (1.0, 1.0), {})
    assert "forget" not in terms and "left out" in note and s == 0.0


def test_scores_split_forget_and_other_datasets():
    digits = list(DIGIT_NAMES)
    labels = np.repeat(np.arange(10), 10)
    base = {"mnist": _result("mnist", digits, labels, labels), "letters": _result("letters", list("AB"), [0, 1], [0, 1])}
    forgotten = labels.copy()
    forgotten[labels == 7] = 1  # every seven now reads as one
    forgotten[:5] = 9  # and five zeros are lost as collateral
    patched = {"mnist": _result("mnist", digits, labels, forgotten), "letters": _result("letters", list("AB"), [0, 1], [0, 0])}
    scores = ev._scores(base, patched, ["seven"])
    assert list(scores) == ["mnist"]
    s = scores["mnist"]
    assert s.forget_acc == (1.0, 0.0)
    assert s.retain_acc == pytest.approx((1.0, 85 / 90))
    assert s.others == {"letters": (1.0, 0.5)}
    assert s.score == pytest.approx((0.0 + 5 / 90 + 0.5) / 3)
    report = ev.EvalReport("toy", ["p.fpatch"], ["seven"], base, patched, scores)
    assert report.score == pytest.approx(s.score)
    data = report.to_json()
    json.dumps(data)  # plain JSON, no NaN objects
    entry = data["results"][0]
    assert {"dataset", "model", "task", "metrics"} <= set(entry)
    assert {"acc1", "mean_per_class_recall"} <= set(entry["metrics"])
    assert [r["variant"] for r in data["results"]] == ["base", "base", "patched", "patched"]
    assert data["forgetting"]["mnist"]["forget_acc"] == {"base": 1.0, "patched": 0.0}


def test_input_checks():
    data = {"mnist": LabeledImages("mnist", [], np.zeros(0, np.int64), list(DIGIT_NAMES))}
    assert ev.check_forget(["seven", " seven", "three"], data) == ["seven", "three"]
    with pytest.raises(ForgetpackError, match="class 'dog' is not in any evaluated dataset"):
        ev.check_forget(["dog"], data)
    with pytest.raises(ForgetpackError, match="must contain"):
        ev.check_templates(["a photo of a number"])
    assert ev.check_templates(["a {} here"]) == ["a {} here"]


# ----------------------------------------------------------------------------- the CLI's bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
        (["--dataset", "mnist", "--forget", "seventeen"], "class 'seventeen' is not in any evaluated dataset"),
        (["--dataset", "imagefolder:/nonexistent/folder"], "image folder not found"),
        (["--dataset", "mnist", "--template", "no placeholder"], "must contain '{}'"),
        (["--dataset", "mnist", "--forget", "seven", "--patch", "/nonexistent/p.fpatch"], "p.fpatch"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, args, message):
    assert main(["eval", "mini", *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_empty_image_folder(tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    assert main(["eval", "mini", "--dataset", f"imagefolder:{tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "has no readable images" in err and "Traceback" not in err
