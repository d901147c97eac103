"""The evaluation harness: metric arithmetic, the report, CLIP_benchmark results, and the CLI's bad-input paths."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from forgetpack.cli import main
from forgetpack.cli.render import library_warnings
from forgetpack.evaluation import clip_benchmark
from forgetpack.evaluation import metrics as ev
from forgetpack.evaluation.datasets import DIGIT_NAMES, LabeledImages, load_dataset
from forgetpack.evaluation.harness import EvalReport, check_forget
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_templates

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


DIGESTS = ["sha256:" + "ab" * 32, "sha256:" + "cd" * 32]


def _toy_results() -> tuple[dict, dict]:
    """Base and patched results on mnist (sevens forgotten, five zeros lost) and a two-letter set."""
    digits = list(DIGIT_NAMES)
    labels = np.repeat(np.arange(10), 10)
    base = {"mnist": _result("mnist", digits, labels, labels), "letters": _result("letters", list("AB"), [0, 1], [0, 1])}
    forgotten = labels.copy()
    forgotten[labels == 7] = 1  # every seven now reads as one
    forgotten[:5] = 9  # and five zeros are lost as collateral
    patched = {"mnist": _result("mnist", digits, labels, forgotten), "letters": _result("letters", list("AB"), [0, 1], [0, 0])}
    return base, patched


def test_scores_split_forget_and_other_datasets():
    base, patched = _toy_results()
    scores = ev.forget_scores(base, patched, ["seven"])
    assert list(scores) == ["mnist"]
    s = scores["mnist"]
    assert s.forget_acc == (1.0, 0.0)
    assert s.retain_acc == pytest.approx((1.0, 85 / 90))
    assert s.others == {"letters": (1.0, 0.5)}
    assert s.score == pytest.approx((0.0 + 5 / 90 + 0.5) / 3)
    report = EvalReport("toy", ["p.fpatch"], ["seven"], base, patched, scores)
    assert report.score == pytest.approx(s.score)
    data = report.to_json()
    json.dumps(data)  # plain JSON, no NaN objects
    entry = data["results"][0]
    assert {"dataset", "model", "task", "metrics"} <= set(entry)
    assert {"acc1", "mean_per_class_recall"} <= set(entry["metrics"])
    assert [r["variant"] for r in data["results"]] == ["base", "base", "patched", "patched"]
    assert data["forgetting"]["mnist"]["forget_acc"] == {"base": 1.0, "patched": 0.0}


def test_worst_retained_class_is_in_the_json_and_the_table():
    """One collapsing class must show next to the aggregate, on every dataset (forgotten classes are not retained)."""
    from rich.console import Console

    from forgetpack.cli.report import render_table

    base, patched = _toy_results()
    report = EvalReport("toy", ["p.fpatch"], ["seven"], base, patched, ev.forget_scores(base, patched, ["seven"]))
    worst = json.loads(json.dumps(report.to_json()))["worst_retained_class"]
    assert worst["mnist"] == {"class": "zero", "base": 1.0, "patched": 0.5, "drop_pt": 50.0}  # not "seven" (-100 pt)
    assert worst["letters"] == {"class": "B", "base": 1.0, "patched": 0.0, "drop_pt": 100.0}  # no forgotten class here
    console = Console(record=True, width=200, markup=False, emoji=False, highlight=False)
    render_table(report, console=console)
    rows = [line for line in console.export_text().splitlines() if "worst retained class" in line]
    assert len(rows) == 2
    cells = [[c.strip() for c in row.split("│")[1:-1]] for row in rows]
    assert cells == [["", "worst retained class (zero)", "100.0", "50.0", "-50.0"],
                     ["", "worst retained class (B)", "100.0", "0.0", "-100.0"]]
    assert EvalReport("toy", [], [], base, None, {}).to_json()["worst_retained_class"] == {}  # nothing to compare


def test_nearest_retained_classes_are_shown_beside_the_forgotten_one():
    """On a set too large for every per-class row, the table still shows the forgotten class and the
    retained classes nearest it in text space (the neighbours a user expects to survive), marked "(near)"."""
    from rich.console import Console

    from forgetpack.cli.report import render_table

    names = [f"class{i}" for i in range(30)]
    angles = np.linspace(0, np.pi, 30)  # class i's text embedding sits next to classes i-1 and i+1
    text = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    assert ev.nearest_classes(text, [10], k=4) == [9, 11, 8, 12]
    assert ev.nearest_classes(text, [10, 11], k=2) == [9, 8, 12, 13]  # k for each forgotten class, none forgotten
    labels = np.repeat(np.arange(30), 4)
    base = {"big": ev.DatasetResult("big", names, labels, labels.copy(), [], text)}
    after = labels.copy()
    after[labels == 10] = 0
    patched = {"big": ev.DatasetResult("big", names, labels, after, [], text)}
    from forgetpack.evaluation.harness import _neighbours

    report = EvalReport("toy", ["p"], ["class10"], base, patched, ev.forget_scores(base, patched, ["class10"]),
                        neighbours=_neighbours(base, ["class10"]))
    assert report.neighbours == {"big": ["class9", "class11", "class8", "class12", "class7", "class13"]}
    assert report.to_json()["nearest_retained_classes"] == report.neighbours
    console = Console(record=True, width=200, markup=False, emoji=False, highlight=False)
    render_table(report, console=console)
    text_out = console.export_text()
    assert "class10 (forgotten)" in text_out and "class11 (near)" in text_out and "class20" not in text_out


def test_input_checks():
    data = {"mnist": LabeledImages("mnist", [], np.zeros(0, np.int64), list(DIGIT_NAMES))}
    assert check_forget(["seven", " seven", "three"], data) == ["seven", "three"]
    with pytest.raises(ForgetpackError, match="class 'dog' is not in any evaluated dataset"):
        check_forget(["dog"], data)
    with pytest.raises(ForgetpackError, match="must contain"):
        check_templates(["a photo of a number"])
    assert check_templates(["a {} here"]) == ["a {} here"]


# ----------------------------------------------------------------------------- CLIP_benchmark results


def test_clip_benchmark_files_and_its_own_build(tmp_path):
    """Our result files are what ``clip_benchmark build`` reads: one row per dataset and variant."""
    base, patched = _toy_results()
    report = EvalReport("toy", ["p.fpatch"], ["seven"], base, patched, ev.forget_scores(base, patched, ["seven"]),
                        patch_digests=DIGESTS)  # fmt: skip
    folder = tmp_path / "cb"
    paths = clip_benchmark.write_results(report, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths) and len(paths) == 4
    patched_name = f"patched:{'ab' * 6}+{'cd' * 6}"
    entry = json.loads((folder / f"mnist_patched-{'ab' * 6}+{'cd' * 6}_toy_en_zeroshot_classification.json").read_text())
    assert entry == {
        "dataset": "mnist",
        "model": "toy",
        "pretrained": patched_name,
        "task": "zeroshot_classification",
        "metrics": {"acc1": 0.85, "acc5": None, "mean_per_class_recall": 0.85},  # no ranking kept: acc5 unmeasured
        "language": "en",
        "forgetpack_patches": DIGESTS,
    }

    out = tmp_path / "benchmark.csv"
    subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(folder), "--output", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    with out.open(newline="") as handle:
        rows = {(r["dataset"], r["pretrained"]): r for r in csv.DictReader(handle)}
    assert set(rows) == {(d, p) for d in ("mnist", "letters") for p in ("base", patched_name)}
    expected = {("mnist", "base"): 1.0, ("mnist", patched_name): 0.85, ("letters", "base"): 1.0,
                ("letters", patched_name): 0.5}  # fmt: skip
    assert {k: float(r["acc1"]) for k, r in rows.items()} == expected
    assert rows[("mnist", patched_name)]["model_fullname"] == f"toy {patched_name}"


def test_clip_benchmark_without_patches_writes_base_only(tmp_path):
    base, _ = _toy_results()
    report = EvalReport("toy", [], [], base, None, {})
    names = [p.name for p in clip_benchmark.write_results(report, tmp_path / "cb")]
    assert names == ["mnist_base_toy_en_zeroshot_classification.json", "letters_base_toy_en_zeroshot_classification.json"]


def test_acc5_is_clip_benchmarks_top5_accuracy():
    """acc5 from the kept ranking is CLIP_benchmark's top-5 accuracy (its ``accuracy(logits, target,
    topk=(1, 5))``, whose last line this numpy no longer runs); below five classes it is null, where
    CLIP_benchmark writes NaN."""
    torch = pytest.importorskip("torch")
    from forgetpack.evaluation.harness import classify

    rng = np.random.default_rng(3)
    images, texts = rng.standard_normal((300, 16)), rng.standard_normal((12, 16))
    labels = rng.integers(0, 12, 300)
    ranked = ev.rank_classes(images, texts)
    result = ev.DatasetResult("toy", [f"c{i}" for i in range(12)], labels, ranked[:, 0], ranked=ranked)
    pred = torch.from_numpy(images @ texts.T).topk(5, 1, True, True)[1].t()  # CLIP_benchmark's accuracy()
    correct = pred.eq(torch.from_numpy(labels).view(1, -1).expand_as(pred))
    acc1, acc5 = (float(correct[:k].reshape(-1).float().sum()) / len(labels) for k in (1, 5))
    assert 0 < acc1 < acc5 < 1
    assert (result.acc1, result.acc5) == pytest.approx((acc1, acc5), abs=1e-12)
    assert list(result.clip_benchmark_metrics()) == ["acc1", "acc5", "mean_per_class_recall"]
    assert list(result.metrics())[:3] == ["acc1", "acc5", "mean_per_class_recall"]
    small = ev.DatasetResult("ab", ["a", "b", "c", "d"], labels % 4, labels % 4, ranked=ev.rank_classes(images, texts[:4]))
    assert math.isnan(small.acc5) and small.clip_benchmark_metrics()["acc5"] is None
    texts[7] = texts[3]  # two classes with one prompt: tied everywhere, and the lower index is the prediction
    assert np.array_equal(ev.rank_classes(images, texts)[:, 0], np.argmax(images @ texts.T, axis=1))
    assert np.array_equal(classify(images, texts), np.argmax(images @ texts.T, axis=1))
    assert np.array_equal(ev.rank_classes(images, texts), np.argsort(-(images @ texts.T), axis=1, kind="stable")[:, :5])


def test_cli_clip_benchmark_files_have_acc5_and_build_reads_them(tmp_path, capsys):
    folder = tmp_path / "abc"
    for i, name in enumerate(("zero", "one", "two")):
        for j in range(3):
            (folder / name).mkdir(parents=True, exist_ok=True)
            Image.new("L", (28, 28), 40 * i + 10 * j).save(folder / name / f"{j}.png")
    cb = tmp_path / "cb"
    assert main(["eval", "mini", "--dataset", "mnist", "--dataset", f"imagefolder:{folder}", "--clip-benchmark", str(cb)]) == 0
    capsys.readouterr()
    mnist = json.loads((cb / "mnist_base_mini_en_zeroshot_classification.json").read_text())["metrics"]
    assert list(mnist) == ["acc1", "acc5", "mean_per_class_recall"]  # CLIP_benchmark's keys, in its order
    assert 0.9 < mnist["acc1"] <= mnist["acc5"] <= 1.0
    (small,) = [json.loads(p.read_text())["metrics"] for p in cb.iterdir() if not p.name.startswith("mnist")]
    assert list(small) == ["acc1", "acc5", "mean_per_class_recall"] and small["acc5"] is None  # 3 classes
    out = tmp_path / "benchmark.csv"
    subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(cb), "--output", str(out)],
                   check=True, capture_output=True)  # fmt: skip
    with out.open(newline="") as handle:
        rows = {r["dataset"]: r for r in csv.DictReader(handle)}
    assert float(rows["mnist"]["acc5"]) == mnist["acc5"] and len(rows) == 2
    assert [r["acc5"] for name, r in rows.items() if name != "mnist"] == [""]


# ----------------------------------------------------------------------------- warnings


def test_loader_warnings_reach_stderr_through_logging(tmp_path, capsys):
    (tmp_path / "cats").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "cats" / "a.png")
    (tmp_path / "cats" / "broken.png").write_bytes(b"not a png")
    with library_warnings():
        data = load_dataset(f"imagefolder:{tmp_path}")
    assert len(data.skipped) == 1
    assert capsys.readouterr().err.startswith(f"warning: skipped unreadable image {tmp_path / 'cats' / 'broken.png'}")
    load_dataset(f"imagefolder:{tmp_path}")  # the handler is gone after the command
    assert "warning:" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- the CLI's bad input


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
        (["--dataset", "mnist", "--forget", "seventeen"], "class 'seventeen' is not in any evaluated dataset"),
        (["--dataset", "imagefolder:/nonexistent/folder"], "image folder not found"),
        (["--dataset", "mnist", "--template", "no placeholder"], "must contain '{}'"),
        (["--dataset", "mnist", "--forget", "seven", "--patch", "/nonexistent/p.fpatch"], "p.fpatch"),
        (["--dataset", "cifar10", "-o", "/nonexistent/dir/r.json"], "output directory /nonexistent/dir does not exist"),
        (["--dataset", "cifar10", "--clip-benchmark", "/nonexistent/dir/cb"], "parent directory /nonexistent/dir"),
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
