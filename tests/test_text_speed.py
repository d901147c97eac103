"""Speed where users wait (issue 11): dynamic-length text graphs, the runtime's text cache on
disk, and warm forgetting runs that never build the model.

A tiny random-init open_clip architecture (registered from a JSON config) stands in for
ViT-B-32: the same code paths, exported in seconds. mini covers HF text towers. Speed itself
is measured by tools/bench_runtime.py; here only equality is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import runtime
from forgetpack.format.manifest import Manifest

TINY = "Tiny-Text-Speed"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TOLERANCE = 1e-4  # normalised embeddings, ONNX vs open_clip
PROMPTS = ["", "cat", "a photo of a cat.", "a blurry photo of the small grey tabby cat on a red blanket",
           " ".join(["a long description of a kitten"] * 16)]  # 2 tokens ... past the 77-token context
REPO = Path(__file__).resolve().parents[1]


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _torch_embeddings(loaded, prompts) -> np.ndarray:
    import torch

    with torch.no_grad():
        return loaded.model.encode_text(loaded.tokenizer(list(prompts))).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import open_clip

    from forgetpack.engine.models import load_model

    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{TINY}.json").write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(folder)
    return load_model(f"{TINY}:none")


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny):
    from forgetpack.export import export_loaded

    out = tmp_path_factory.mktemp("tiny") / "export"
    export_loaded(tiny, out)
    return out


def _env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    return {**env, "FORGETPACK_CACHE": str(cache), "PYTHONPATH": str(REPO)}


# ---------------------------------------------------------------------------- dynamic text graphs


def test_open_clip_text_graph_takes_any_length_with_parity(tiny, tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path))
    manifest = Manifest.read(tiny_export)
    assert manifest.towers["text"].input_shape == ["batch", "sequence"]
    assert manifest.export_check["text"] <= TOLERANCE  # checked at export on five lengths, alone and batched
    model = runtime.load(tiny_export, threads=1)
    got = model.encode_text(PROMPTS)
    assert np.abs(got - _normalise(_torch_embeddings(tiny, PROMPTS))).max() <= TOLERANCE


def test_length_batching_gives_the_full_context_features(tiny_export, tmp_path, monkeypatch):
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path))
    backend = runtime.load(tiny_export, threads=1).backend
    prompts = [f"a photo of {'a very ' * (i % 9)}small {i}." for i in range(70)] + PROMPTS  # two batches, mixed lengths
    cut = backend._encode_text_features(prompts)
    session, spec = backend._state.sessions["text"], backend.manifest.towers["text"]
    for prompt in prompts[::7] + PROMPTS:
        (full,) = session.run([spec.features], {spec.input: backend._tokenizer([prompt])})
        assert np.abs(cut[prompt] - full[0]).max() <= 1e-5, prompt
    assert backend.encoded_prompts == len(prompts)


def test_mini_hf_text_graph_takes_any_length_with_parity(tmp_path, monkeypatch):
    from forgetpack.engine.models import load_model
    from forgetpack.export import export_loaded

    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path))
    mini = load_model("mini")
    manifest = export_loaded(mini, tmp_path / "mini", towers=("text",))
    assert manifest.towers["text"].input_shape == ["batch", "sequence"]
    assert manifest.export_check["text"] <= TOLERANCE
    got = runtime.load(tmp_path / "mini", threads=1).encode_text(PROMPTS)
    assert np.abs(got - _normalise(_torch_embeddings(mini, PROMPTS))).max() <= TOLERANCE


def test_an_export_with_a_fixed_text_axis_still_gets_the_full_context(tiny_export, tmp_path, monkeypatch):
    """Exports made before the axis was dynamic say ``[batch, 77]``: they are fed 77 tokens, as before."""
    import shutil

    monkeypatch.setenv("FORGETPACK_CACHE", "off")
    old = tmp_path / "old"
    shutil.copytree(tiny_export, old)
    manifest = Manifest.read(old)
    manifest.towers["text"].input_shape = ["batch", 77]
    manifest.seal().save(old)
    new_backend, old_backend = runtime.load(tiny_export).backend, runtime.load(old).backend
    fed = []
    run = old_backend._state.sessions["text"].run
    old_backend._state.sessions["text"].run = lambda out, feed: fed.append(feed["input_ids"].shape) or run(out, feed)
    assert np.abs(old_backend.text_features(PROMPTS) - new_backend.text_features(PROMPTS)).max() <= 1e-5
    assert fed and all(shape[1] == 77 for shape in fed)


def test_tokenizer_pads_to_any_length_up_to_the_context(tiny_export):
    from runtime.tokenizer import TextTokenizer

    tok = TextTokenizer(tiny_export, Manifest.read(tiny_export).tokenizer)
    ids = tok.token_ids(PROMPTS)
    assert [len(i) for i in ids][:2] == [2, 3] and len(ids[-1]) == 77
    full = tok(PROMPTS)
    assert np.array_equal(full, tok.pad(ids)) and full.shape == (len(PROMPTS), 77)
    short = tok.pad(ids[:3], 8)
    assert np.array_equal(short, full[:3, :8])
    with pytest.raises(ValueError):
        tok.pad(ids[:3], 4)


# ---------------------------------------------------------------------------- the text cache on disk


def test_a_second_classify_process_encodes_nothing(tiny_export, tmp_path, monkeypatch):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3)).save(image)
    cache = tmp_path / "cache"
    labels = "cat,dog,tabby cat,fire truck,a very long label with many words in it"
    command = [sys.executable, "-m", "forgetpack.cli", "classify", str(tiny_export), str(image), "--labels", labels,
               "--threads", "1", "--json"]

    def shards() -> dict[str, int]:
        return {p.name: p.stat().st_ino for p in cache.glob("runtime-text/*/*.safetensors")}

    first = subprocess.run(command, env=_env(cache), capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    written = shards()
    assert written  # the first process wrote what it encoded
    second = subprocess.run(command, env=_env(cache), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["results"] == json.loads(first.stdout)["results"]
    assert shards() == written  # same files, same inodes: nothing was encoded, so nothing was written

    monkeypatch.setenv("FORGETPACK_CACHE", str(cache))  # and a third, in this process, counts its encodings
    model = runtime.load(tiny_export, threads=1)
    model.classify([str(image)], labels.split(","))
    assert model.backend.encoded_prompts == 0


def test_text_cache_is_bounded_and_tolerates_lost_or_broken_shards(tmp_path, monkeypatch):
    from runtime.text_cache import TextFeatureCache

    rows = {f"prompt {i}": np.full(16, i, np.float32) for i in range(40)}
    cache = TextFeatureCache("sha256:" + "ab" * 32, 16, max_bytes=3300, root=tmp_path)
    for i in range(0, 40, 10):  # four shards of ten rows (~1,060 bytes each): the oldest must go
        cache.put({p: rows[p] for p in list(rows)[i : i + 10]})
        os.utime(cache.folder / cache._index[f"prompt {i}"], ns=(i * 10**9, i * 10**9))
    assert sum(p.stat().st_size for p in cache.folder.glob("*.safetensors")) <= 3300
    reader = TextFeatureCache(cache.export_id, 16, root=tmp_path)
    found = reader.get(list(rows))
    assert "prompt 0" not in found and set(found) >= {f"prompt {i}" for i in range(30, 40)}
    assert all(np.array_equal(found[p], rows[p]) for p in found)
    (cache.folder / reader._index["prompt 25"]).unlink()  # vanished and torn shards are misses, never errors
    (cache.folder / reader._index["prompt 35"]).write_bytes(b"not a safetensors file")
    assert reader.get(["prompt 25", "prompt 35"]) == {}
    assert set(TextFeatureCache(cache.export_id, 16, root=tmp_path).get(list(rows))) == {f"prompt {i}" for i in range(10, 20)}
    other = TextFeatureCache("sha256:" + "cd" * 32, 16, root=tmp_path)  # another export shares nothing
    assert other.get(list(rows)) == {}
    monkeypatch.setenv("FORGETPACK_CACHE", "off")
    assert not TextFeatureCache(cache.export_id, 16).enabled


# ---------------------------------------------------------------------------- warm forgetting


@pytest.fixture(scope="module")
def cold_run(tiny, tmp_path_factory):
    """A local checkpoint, forgotten once cold (the feature cache and the warm record filled)."""
    from safetensors.torch import save_file

    from forgetpack.engine import features
    from forgetpack.engine.solve import forget
    from forgetpack.engine.weights import run_with_model

    folder = tmp_path_factory.mktemp("warm")
    path = folder / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.model.state_dict().items()}, str(path))
    cache = folder / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGETPACK_CACHE", str(cache))
        features.clear_memory_cache()
        result = run_with_model(f"{TINY}:{path}", lambda loaded: forget(loaded, ["cat"], allow_unknown=True))
        features.clear_memory_cache()
    return f"{TINY}:{path}", cache, result.patch


def test_warm_forget_builds_no_model_and_gives_the_same_patch(cold_run, monkeypatch):
    from forgetpack.engine import features, models
    from forgetpack.engine.solve import forget
    from forgetpack.engine.weights import WeightsOnlyModel, run_with_model

    spec, cache, cold = cold_run
    monkeypatch.setenv("FORGETPACK_CACHE", str(cache))
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a warm run built the model"))
    features.clear_memory_cache()  # features come from disk, as in a new process
    seen = []
    warm = run_with_model(spec, lambda loaded: seen.append(loaded) or forget(loaded, ["cat"], allow_unknown=True))
    assert isinstance(seen[0].model, WeightsOnlyModel)
    assert replace(warm.patch, created=cold.created).to_bytes() == cold.to_bytes()  # bit-identical but the time


def test_warm_forget_falls_back_to_the_model_when_it_must_encode(cold_run, tiny, monkeypatch):
    import os as _os

    from forgetpack.engine import features, models
    from forgetpack.engine.solve import forget
    from forgetpack.engine.weights import run_with_model, weights_only

    spec, cache, _ = cold_run
    monkeypatch.setenv("FORGETPACK_CACHE", str(cache))
    built = []
    monkeypatch.setattr(models, "load_model", lambda s: built.append(s) or tiny)
    run_with_model(spec, lambda loaded: forget(loaded, ["cat"], vocabulary=("zeppelin hangar",), allow_unknown=True))
    assert built == [spec]  # a prompt the cache lacked: the model was built, once
    path = Path(spec.split(":", 1)[1])
    stat = path.stat()
    assert weights_only(spec) is not None
    try:
        _os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed: no warm run
        assert weights_only(spec) is None
    finally:
        _os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        features.clear_memory_cache()


def test_warm_forget_in_a_new_process_imports_no_torch(cold_run, tmp_path):
    from forgetpack.format.patch import read_patch

    spec, cache, cold = cold_run
    out = tmp_path / "warm.fpatch.safetensors"
    script = ("import json, sys; from forgetpack.cli.main import main; "
              f"rc = main(['forget', {spec!r}, '--forget', 'cat', '--allow-unknown', '-o', {str(out)!r}, '--json']); "
              "print(json.dumps({'rc': rc, 'torch': 'torch' in sys.modules, 'open_clip': 'open_clip' in sys.modules}), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", script], env=_env(cache), capture_output=True, text=True, timeout=120)
    status = json.loads(done.stderr.strip().splitlines()[-1])
    assert status == {"rc": 0, "torch": False, "open_clip": False}, done.stderr
    warm = read_patch(out)
    assert replace(warm, created=cold.created).digest == cold.digest  # bit-identical but the time


def test_a_pretrained_tag_runs_warm_from_the_file_open_clip_loaded(cold_run, monkeypatch):
    """``ARCH:TAG``: the cold run records the file open_clip resolved the tag to (here a tag
    registered for a local file; real tags resolve to open_clip's download cache)."""
    import open_clip

    from forgetpack.engine import features, models
    from forgetpack.engine.solve import forget
    from forgetpack.engine.weights import WeightsOnlyModel, run_with_model

    spec, cache, cold = cold_run
    monkeypatch.setenv("FORGETPACK_CACHE", str(cache))
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"local": {"file": spec.split(":", 1)[1]}})
    tagged = run_with_model(f"{TINY}:local", lambda loaded: forget(loaded, ["cat"], allow_unknown=True))  # cold: features cached already
    features.clear_memory_cache()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a warm run built the model"))
    seen = []
    warm = run_with_model(f"{TINY}:local", lambda loaded: seen.append(loaded) or forget(loaded, ["cat"], allow_unknown=True))
    assert isinstance(seen[0].model, WeightsOnlyModel) and warm.patch.model == f"{TINY}:local"
    assert replace(warm.patch, created=tagged.patch.created).to_bytes() == tagged.patch.to_bytes()
    assert np.array_equal(warm.patch.layers[0].up, cold.layers[0].up)  # same weights, same solve as the checkpoint
