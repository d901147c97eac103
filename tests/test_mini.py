"""The embedded ``mini`` model: it loads strictly and offline, works through open_clip's own
code paths, reaches its accuracy bars on the held-out sets, and drives the eval harness end to end."""

from __future__ import annotations

import csv
import json
import logging
import subprocess
import sys

import numpy as np
import pytest

from forgetpack import mini
from forgetpack.cli import main
from forgetpack.evaluation import harness as ev
from forgetpack.evaluation import image_cache
from forgetpack.evaluation.datasets import load_dataset
from forgetpack.format.errors import ForgetpackError

pytestmark = pytest.mark.slow

# The shipped model's floors (docs/mini.md gives the measured figures; QuickDraw's issue target of 65%
# is not reached: 50.2% over the declared set).
BARS = {"mnist": 0.97, "digits": 0.95, "letters": 0.95, "fashion": 0.85, "quickdraw": 0.48}
GROUP_CLASS_BAR = 0.30  # every class of the six target groups: recognised often enough that forgetting it shows
# ... but for these, which mini confuses with their own neighbours (docs/mini.md names why)
BELOW_GROUP_BAR = {"raccoon", "bear", "car", "van", "bus", "cello", "cup"}


@pytest.fixture(scope="module")
def loaded():
    model, preprocess, tokenizer = mini.load_mini()
    return ev._Loaded(model, preprocess, tokenizer, "mini")


@pytest.fixture(scope="module")
def base_report(loaded):
    return ev.evaluate(loaded, datasets=list(BARS))


def test_import_is_light():
    code = "import sys, forgetpack.mini; assert 'torch' not in sys.modules and 'open_clip' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_architecture_is_a_registered_open_clip_model(loaded):
    import open_clip

    mini.register()
    mini.register()  # idempotent
    assert mini.MINI_ARCH in open_clip.list_models()
    model = loaded.model
    assert not model.training
    embed_dim = mini.config()["model_cfg"]["embed_dim"]
    assert tuple(model.text.proj.weight.shape) == (embed_dim, 384)
    assert type(model.visual).__name__ == "ModifiedResNet" and model.visual.attnpool.c_proj.out_features == embed_dim
    assert model.visual.preprocess_cfg["mean"] == tuple(mini.config()["preprocess_cfg"]["mean"])
    tokens = open_clip.get_tokenizer(mini.MINI_ARCH)(["a photo of the number seven."])
    assert tokens.shape[0] == 1


def test_weights_hold_exactly_the_trained_part(loaded):
    from safetensors import safe_open

    with safe_open(str(mini.WEIGHTS_PATH), "pt") as f:
        keys = set(f.keys())
    assert keys == set(mini.trainable_state(loaded.model))
    assert not any(k.startswith(mini.FROZEN_PREFIX) for k in keys)
    assert mini.WEIGHTS_PATH.stat().st_size < 25e6  # 22 MB: the attention pool's 1024-wide projections


def test_strict_loading_refuses_a_partial_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    state = load_file(str(mini.WEIGHTS_PATH))
    state.pop("visual.attnpool.c_proj.weight")
    partial = tmp_path / "mini.safetensors"
    save_file(state, str(partial))
    monkeypatch.setattr(mini, "WEIGHTS_PATH", partial)
    with pytest.raises(ForgetpackError, match="missing .*visual.attnpool.c_proj.weight"):
        mini.load_mini()


def test_minilm_keeps_its_neighbourhoods(loaded):
    """The frozen text side still puts "seven" next to "7" and "eight", far from a letter."""
    import torch

    with torch.no_grad():
        f = loaded.model.encode_text(loaded.tokenizer(["seven", "7", "eight", "the letter K"]), normalize=True)
    sim = (f @ f.T).numpy()
    assert sim[0, 1] > sim[0, 3] and sim[0, 2] > sim[0, 3]


@pytest.mark.parametrize("name", list(BARS))
def test_heldout_accuracy_bars(base_report, name):
    assert base_report.base[name].acc1 >= BARS[name]


def test_every_class_of_the_neighbour_groups_is_recognised(base_report):
    """Forgetting a class can only be seen if the base model finds it: each class of the six groups
    the forgetting targets name is recognised on at least 30% of its held-out drawings, but for the
    seven named ones (a new one below the bar fails, and so does one of them rising above it)."""
    from forgetpack.evaluation import everyday

    result = base_report.base["quickdraw"]
    recall = dict(zip(result.classnames, result.per_class, strict=True))
    low = {c: round(float(recall[c]), 2) for g in everyday.TARGET_GROUPS for c in everyday.QUICKDRAW_GROUPS[g]
           if recall[c] < GROUP_CLASS_BAR}
    assert set(low) == BELOW_GROUP_BAR, low


def test_forgetting_cat_keeps_its_neighbours(tmp_path, capsys):
    """The everyday acceptance, with the defaults: forget "cat" from its name alone; on held-out QuickDraw
    drawings cats are found at most once, and tiger, lion and dog each lose at most two drawings' worth.
    (With the antipode target, the default before, tiger lost 5 of its 10 drawings; docs/engine.md,
    "Targets".)"""
    patch = tmp_path / "cat.fpatch.safetensors"
    assert main(["forget", "mini", "--forget", "cat", "-o", str(patch)]) == 0
    capsys.readouterr()
    assert main(["eval", "mini", "--patch", str(patch), "--forget", "cat", "--dataset", "quickdraw", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    recall = {r["variant"]: r["metrics"]["per_class_recall"] for r in data["results"]}
    per_class = 25  # held-out drawings a class
    assert recall["base"]["cat"] * per_class >= 10 and recall["patched"]["cat"] * per_class <= 1
    for neighbour in ("tiger", "lion", "dog"):
        lost = (recall["base"][neighbour] - recall["patched"][neighbour]) * per_class
        assert lost <= 2 + 1e-9, (neighbour, recall["base"][neighbour], recall["patched"][neighbour])
    assert {"tiger", "lion", "dog"} & set(data["nearest_retained_classes"]["quickdraw"])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh disk cache folder and an empty in-process cache."""
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(image_cache, "_MEMORY_CACHE", {})
    return tmp_path / "cache" / image_cache.CACHE_KIND


def _count_encodings(loaded, monkeypatch) -> list[int]:
    """Record each call of the vision tower (still encoding for real)."""
    calls: list[int] = []
    encode = loaded.model.encode_image

    def counted(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "encode_image", counted)
    return calls


def test_image_embeddings_are_cached(loaded, cache, monkeypatch):
    data = load_dataset("digits")
    first = image_cache.encode_images(loaded, data)
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(image_cache, "_MEMORY_CACHE", {})
    calls = _count_encodings(loaded, monkeypatch)
    assert np.array_equal(image_cache.encode_images(loaded, data), first)  # from disk, no encoding
    assert not calls

    files[0].write_bytes(b"damaged")  # a damaged entry is a miss: recomputed and rewritten
    monkeypatch.setattr(image_cache, "_MEMORY_CACHE", {})
    assert np.array_equal(image_cache.encode_images(loaded, data), first)
    assert calls and files[0].stat().st_size > 1000


def test_image_cache_off_writes_nothing(loaded, cache, monkeypatch):
    monkeypatch.setenv("FORGETPACK_CACHE", "off")
    image_cache.encode_images(loaded, load_dataset("digits"))
    assert not cache.parent.exists()


def test_image_cache_write_failure_is_logged(loaded, cache, monkeypatch, caplog):
    cache.parent.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger=image_cache.__name__):
        features = image_cache.encode_images(loaded, load_dataset("digits"))
    assert features.shape[0] == 500
    assert any("cannot write the image-embedding cache" in r.getMessage() for r in caplog.records)


def _antipode_patch(loaded, classname: str, template: str):
    """A hand-made rank-one patch on ``text.proj`` that flips one prompt's embedding.

    Not a good forgetting method (the real solvers live in the engine): it only exercises
    the harness's patched path with a patch of the real format.
    """
    import torch

    from forgetpack.format.patch import Layer, Patch

    text = loaded.model.text
    tokens = loaded.tokenizer([template.format(classname)])
    mask = (tokens != text.config.pad_token_id).long()
    with torch.no_grad():
        pooled = text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)[0].double().numpy()
    weight = text.proj.weight.detach().double().numpy()  # [out, in]: y = W x
    base = {"text.proj.weight": text.proj.weight.detach().numpy().copy()}
    # delta = -2 (W x) x^T / (x^T x): rank one, stored as its two factors
    layer = Layer.lowrank("text.proj.weight", -2.0 * (weight @ pooled)[:, None], (pooled / (pooled @ pooled))[None, :])
    return Patch.create("mini", base, [layer], layouts={"text.proj.weight": "out_in"})


def test_patched_path_end_to_end(loaded, tmp_path, capsys):
    patch = _antipode_patch(loaded, "seven", "a photo of the number {}.")
    path = patch.save(tmp_path / "seven.fpatch")
    before = loaded.model.text.proj.weight.detach().clone()
    report = ev.evaluate(loaded, [path], ["seven"], ["mnist", "letters"])
    assert np.array_equal(loaded.model.text.proj.weight.detach().numpy(), before.numpy()), "caller's model untouched"
    score = report.scores["mnist"]
    assert score.forget_acc[0] > 0.9 and score.forget_acc[1] < 0.05
    assert report.patched["letters"].acc1 > 0.5
    assert not np.isnan(report.score) and "averaged over 3 terms" in score.note

    out_json, out_png, out_cb = tmp_path / "r.json", tmp_path / "r.png", tmp_path / "cb"
    code = main(["eval", "mini", "--patch", str(path), "--forget", "seven", "--dataset", "mnist", "--dataset", "letters",
                 "-o", str(out_json), "--plot", str(out_png), "--clip-benchmark", str(out_cb)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "seven (forgotten)" in printed and "S[mnist]" in printed
    data = json.loads(out_json.read_text())
    assert data["forgetting"]["mnist"]["forget_acc"]["patched"] < 0.05
    assert {r["dataset"] for r in data["results"]} == {"mnist", "letters"}
    assert data["patch_digests"] == [patch.digest]
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # clip_benchmark's own build aggregates our result files into its CSV.
    out_csv = tmp_path / "benchmark.csv"
    subprocess.run([sys.executable, "-m", "clip_benchmark.cli", "build", str(out_cb), "--output", str(out_csv)],
                   check=True, capture_output=True)  # fmt: skip
    with out_csv.open(newline="") as handle:
        rows = {(r["dataset"], r["pretrained"].split(":")[0]): float(r["acc1"]) for r in csv.DictReader(handle)}
    assert set(rows) == {(d, v) for d in ("mnist", "letters") for v in ("base", "patched")}
    for dataset, variant in rows:
        result = (report.base if variant == "base" else report.patched)[dataset]
        assert rows[(dataset, variant)] == pytest.approx(result.acc1)


@pytest.mark.parametrize("forget", [["seven"], ["one", "four", "seven"]])
def test_forget_then_eval_on_real_images(forget, tmp_path, capsys):
    """The README's first command, through the CLI: the engine's default patch (no images)
    takes the forgotten digits to ≤ 1% on both real digit sets while the other digits and the
    letters stay within 1 pt of the base (the evaluation issue's acceptance bounds)."""
    patch = tmp_path / "p.fpatch.safetensors"
    names = [arg for name in forget for arg in ("--forget", name)]
    assert main(["forget", "mini", *names, "-o", str(patch)]) == 0
    capsys.readouterr()
    assert main(["eval", "mini", "--patch", str(patch), *names, "--dataset", "mnist", "--dataset", "digits",
                 "--dataset", "letters", "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)["forgetting"]  # --json: the report alone on stdout, no table
    for name in ("mnist", "digits"):
        forget_acc, retain_acc = data[name]["forget_acc"], data[name]["retain_acc"]
        assert forget_acc["base"] > 0.95 and forget_acc["patched"] <= 0.01, (name, forget_acc)
        assert retain_acc["patched"] >= retain_acc["base"] - 0.01, (name, retain_acc)
        letters = data[name]["other_datasets"]["letters"]
        assert letters["patched"] >= letters["base"] - 0.01, (name, letters)
