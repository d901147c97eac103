"""Pre-projection text features: context cutting changes nothing, the cache works, never pickle."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from forgetpack.engine import features
from forgetpack.engine.models import LoadedModel, load_model
from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix

PROMPTS = ["tabby cat", "a photo of a golden retriever.", "", "a photo of the number seven.", "7", "tabby cat",
           "an image of a very long and winding name, with commas; and more words than usual"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "cache"))
    features.clear_memory_cache()
    yield tmp_path / "cache"
    features.clear_memory_cache()


@pytest.fixture(scope="module")
def vit():
    return load_model("ViT-B-32:none")


@pytest.fixture(scope="module")
def hf():
    """An open_clip model with an HF text tower (MiniLM, mean pooler, linear text.proj)."""
    from forgetpack import mini

    model, preprocess, tokenizer = mini.create_untrained()
    return LoadedModel(model.eval(), preprocess, tokenizer, "mini-untrained", mini.MINI_ARCH)


def _projected(loaded, feats: np.ndarray) -> np.ndarray:
    proj = find_projection(loaded.model, "text")
    y = feats.astype(np.float64) @ proj.feature_form(projection_matrix(loaded.model, proj))
    bias = projection_bias(loaded.model, proj)
    return y + bias if bias is not None else y


@pytest.mark.parametrize("which", ["vit", "hf"])
def test_context_cutting_gives_the_full_context_features(which, request) -> None:
    loaded = request.getfixturevalue(which)
    cut = features.encode(loaded, PROMPTS, batch_size=3)  # several batches of different lengths
    full = features.encode(loaded, PROMPTS, cut=False)
    np.testing.assert_allclose(cut, full, rtol=1e-5, atol=2e-5)
    # and they are what the model's own encode_text projects
    with torch.no_grad():
        reference = loaded.model.encode_text(loaded.tokenizer(PROMPTS)).numpy()
    np.testing.assert_allclose(_projected(loaded, cut), reference, rtol=1e-4, atol=1e-4)
    assert cut.dtype == np.float32 and cut.shape == (len(PROMPTS), features.text_width(loaded.model))


def test_cache_in_memory_and_on_disk(vit, cache, monkeypatch) -> None:
    calls = []
    real_encode = features.encode

    def counting(loaded, prompts, **kw):
        calls.append(list(prompts))
        return real_encode(loaded, prompts, **kw)

    monkeypatch.setattr(features, "encode", counting)
    first = features.text_features(vit, PROMPTS)
    assert calls == [list(dict.fromkeys(PROMPTS))]  # duplicates encoded once
    np.testing.assert_array_equal(first[0], first[5])

    again = features.text_features(vit, PROMPTS[::-1])
    assert len(calls) == 1
    np.testing.assert_array_equal(again, first[::-1])

    features.clear_memory_cache()  # a new process: only the disk cache is left
    warm = features.text_features(vit, PROMPTS)
    assert len(calls) == 1
    np.testing.assert_array_equal(warm, first)

    more = features.text_features(vit, ["goldfish", "tabby cat"])
    assert calls[-1] == ["goldfish"]
    np.testing.assert_array_equal(more[1], first[0])

    shards = list(cache.rglob("*"))
    files = [p for p in shards if p.is_file()]
    assert files and all(p.suffix == ".safetensors" for p in files)
    for p in files:  # safetensors, never pickle
        assert not p.read_bytes().startswith(b"\x80")


def test_corrupt_cache_shards_are_only_misses(vit, cache) -> None:
    first = features.text_features(vit, ["goldfish"])
    for shard in cache.rglob("*.safetensors"):
        shard.write_bytes(b"garbage")
    features.clear_memory_cache()
    np.testing.assert_allclose(features.text_features(vit, ["goldfish"]), first, atol=1e-6)


def test_cache_compaction_keeps_everything(vit, cache, monkeypatch) -> None:
    monkeypatch.setattr(features, "MAX_SHARDS", 3)
    names = ["a", "b", "c", "d", "e"]
    rows = [features.text_features(vit, [n])[0] for n in names]
    assert len(list(cache.rglob("*.safetensors"))) <= 3
    features.clear_memory_cache()
    np.testing.assert_array_equal(features.text_features(vit, names), np.stack(rows))


def test_cache_off_reads_and_writes_nothing(vit, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FORGETPACK_CACHE", "off")
    features.clear_memory_cache()
    try:
        first = features.text_features(vit, ["goldfish", "tabby cat"])
        features.clear_memory_cache()
        np.testing.assert_array_equal(features.text_features(vit, ["goldfish", "tabby cat"]), first)
    finally:
        features.clear_memory_cache()
    assert list(tmp_path.iterdir()) == []  # no folder named 'off', no ~/.cache


def test_unwritable_cache_is_a_logged_warning(vit, cache, caplog) -> None:
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the cache folder should be")
    with caplog.at_level("WARNING", logger="forgetpack.engine.features"):
        rows = features.text_features(vit, ["goldfish"])
    assert rows.shape == (1, 512)
    assert any("feature cache not written" in r.getMessage() for r in caplog.records)


def test_progress_is_a_callback(vit) -> None:
    calls = []
    features.encode(vit, PROMPTS, batch_size=3, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]


def test_fingerprint_covers_the_tower_but_not_its_projection(vit) -> None:
    loaded = load_model("ViT-B-32:none")  # a private copy to modify
    fp = features.text_fingerprint(loaded.model, loaded.tokenizer)
    assert fp == features.text_fingerprint(vit.model, vit.tokenizer)
    with torch.no_grad():
        loaded.model.text_projection.add_(1.0)
        loaded.model.visual.proj.add_(1.0)
    assert features.text_fingerprint(loaded.model, loaded.tokenizer) == fp  # features stay valid for patched models
    with torch.no_grad():
        loaded.model.ln_final.weight[0] += 1.0
    assert features.text_fingerprint(loaded.model, loaded.tokenizer) != fp


def test_empty_request(vit) -> None:
    assert features.text_features(vit, []).shape == (0, 512)


def test_cache_root_follows_xdg_cache_home(monkeypatch, tmp_path) -> None:
    """Without FORGETPACK_CACHE the cache lives under $XDG_CACHE_HOME (issue 23, item 11), else ~/.cache."""
    from forgetpack.format.cache import cache_dir, cache_root

    monkeypatch.delenv("FORGETPACK_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "forgetpack"
    assert cache_dir("features") == tmp_path / "xdg" / "forgetpack" / "features"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "forgetpack"
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"


def test_shards_another_process_wrote_meanwhile_are_read(tmp_path, monkeypatch):
    """A process looks at the cache folder again when prompts are missing, so processes sharing
    a cache (a service and a CLI, parallel test workers) use what the others wrote since it first
    looked; before, the folder was read once per process."""
    from types import SimpleNamespace

    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path))
    features.clear_memory_cache()

    class Weightless:  # a warm run's model: knows its fingerprint, cannot encode
        text_fingerprint = "sha256:" + "ab" * 32
        can_encode = False

    loaded = SimpleNamespace(model=Weightless(), tokenizer=None)
    with pytest.raises(features.FeaturesNotCached):
        features.text_features(loaded, ["a photo of a cat."])
    folder = features._shard_dir(Weightless.text_fingerprint)
    folder.mkdir(parents=True, exist_ok=True)
    features._write_shard(folder / "from-another-process.safetensors", ["a photo of a cat."],
                          np.full((1, 4), 0.5, np.float32), Weightless.text_fingerprint)
    out = features.text_features(loaded, ["a photo of a cat."])
    assert out.shape == (1, 4) and float(out[0, 0]) == 0.5
    features.clear_memory_cache()
