"""The embedded ``mini`` model: it loads strictly and offline, works through open_clip's own
code paths, reaches its accuracy bars on the held-out sets, and drives the eval harness end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from forgetpack import mini
from forgetpack.cli import main
from forgetpack.evaluation import harness as ev
from forgetpack.format.errors import ForgetpackError

pytestmark = pytest.mark.slow

BARS = {"mnist": 0.97, "digits": 0.95, "letters": 0.95}


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
    assert model.visual.proj.shape[1] == embed_dim
    assert model.visual.preprocess_cfg["mean"] == tuple(mini.config()["preprocess_cfg"]["mean"])
    tokens = open_clip.get_tokenizer(mini.MINI_ARCH)(["a photo of the number seven."])
    assert tokens.shape[0] == 1


def test_weights_hold_exactly_the_trained_part(loaded):
    from safetensors import safe_open

    with safe_open(str(mini.WEIGHTS_PATH), "pt") as f:
        keys = set(f.keys())
    assert keys == set(mini.trainable_state(loaded.model))
    assert not any(k.startswith(mini.FROZEN_PREFIX) for k in keys)
    assert mini.WEIGHTS_PATH.stat().st_size < 10e6


def test_strict_loading_refuses_a_partial_file(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    state = load_file(str(mini.WEIGHTS_PATH))
    state.pop("visual.proj")
    partial = tmp_path / "mini.safetensors"
    save_file(state, str(partial))
    monkeypatch.setattr(mini, "WEIGHTS_PATH", partial)
    with pytest.raises(ForgetpackError, match="missing .*visual.proj"):
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


def test_image_embeddings_are_cached(loaded, tmp_path, monkeypatch):
    from forgetpack.evaluation.datasets import load_dataset

    monkeypatch.setenv(ev.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(ev, "_MEMORY_CACHE", {})
    data = load_dataset("digits")
    first = ev.encode_images(loaded, data)
    files = list((tmp_path / "image-embeddings").glob("*.npy"))
    assert len(files) == 1
    monkeypatch.setattr(ev, "_MEMORY_CACHE", {})
    calls = []
    monkeypatch.setattr(loaded.model, "encode_image", lambda *a, **k: calls.append(1))
    assert np.array_equal(ev.encode_images(loaded, data), first)  # from disk, no encoding
    assert not calls


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

    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code = main(["eval", "mini", "--patch", str(path), "--forget", "seven", "--dataset", "mnist",
                 "--dataset", "letters", "--json", str(out_json), "--plot", str(out_png)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "seven (forgotten)" in printed and "S[mnist]" in printed
    data = json.loads(out_json.read_text())
    assert data["forgetting"]["mnist"]["forget_acc"]["patched"] < 0.05
    assert {r["dataset"] for r in data["results"]} == {"mnist", "letters"}
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("forget", [["seven"], ["one", "four", "seven"]])
def test_forget_then_eval_on_real_images(forget, tmp_path, capsys):
    """The README's first command, through the CLI: the engine's default patch (no images)
    takes the forgotten digits to ≤ 1% on both real digit sets while the other digits and the
    letters stay within 1 pt of the base (the evaluation issue's acceptance bounds)."""
    patch, report = tmp_path / "p.fpatch.safetensors", tmp_path / "r.json"
    names = [arg for name in forget for arg in ("--forget", name)]
    assert main(["forget", "mini", *names, "-o", str(patch)]) == 0
    assert main(["eval", "mini", "--patch", str(patch), *names, "--dataset", "mnist", "--dataset", "digits",
                 "--dataset", "letters", "--json", str(report)]) == 0  # fmt: skip
    capsys.readouterr()
    data = json.loads(report.read_text())["forgetting"]
    for name in ("mnist", "digits"):
        forget_acc, retain_acc = data[name]["forget_acc"], data[name]["retain_acc"]
        assert forget_acc["base"] > 0.95 and forget_acc["patched"] <= 0.01, (name, forget_acc)
        assert retain_acc["patched"] >= retain_acc["base"] - 0.01, (name, retain_acc)
        letters = data[name]["other_datasets"]["letters"]
        assert letters["patched"] >= letters["base"] - 0.01, (name, letters)
