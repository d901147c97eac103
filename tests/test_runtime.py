"""The runtime on ``mini``: parity with torch on the held-out sets, hot-swap, int8, preprocessing and
tokenization equal to open_clip's, the torch-free path, third-party backends and bad input.

``mini`` is exported once per run (into the run's temp dir, where test_classify_cli.py and others
find it too); ViT-B-32 is covered in test_export.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from patch_factory import forget_patch
from PIL import Image

import runtime
from forgetpack.format.errors import ForgetpackError, PatchError, SignatureError
from forgetpack.format.patch import Layer, Patch

TOLERANCE = 1e-4
SETS = ("mnist", "digits", "letters")
REPO = Path(__file__).resolve().parents[1]


def cached_export(tmp_path_factory, name: str, spec: str = "mini", **kwargs) -> Path:
    """Export once per test run (shared by the test modules, and by pytest-xdist's workers, through the
    run's temp dir: tests/run_shared.py)."""
    from run_shared import build_once

    from forgetpack.export import export

    return build_once(tmp_path_factory, f"exports/{name}", lambda out: (out / "manifest.json").is_file(),
                      lambda out: export(spec, out, force=True, **kwargs))


@pytest.fixture(scope="module")
def mini_loaded():
    from forgetpack.engine.models import load_model

    return load_model("mini")


@pytest.fixture(scope="module")
def torch_model(mini_loaded):
    return runtime.load(mini_loaded, backend="torch")


@pytest.fixture(scope="module")
def heldout():
    from forgetpack.evaluation.datasets import DEFAULT_TEMPLATES, load_dataset

    return {name: (load_dataset(name), list(DEFAULT_TEMPLATES[name])) for name in SETS}


def accuracy(model: runtime.Model, data, templates) -> tuple[np.ndarray, float]:
    pred = (model.encode_image(data.images) @ model.classifier(data.classnames, templates)).argmax(1)
    return pred, float(np.mean(pred == np.asarray(data.labels)))


# ---------------------------------------------------------------------------- parity


@pytest.mark.slow
def test_mini_parity_on_heldout_sets(onnx_model, torch_model, heldout):
    for name, (data, templates) in heldout.items():
        a, b = onnx_model.encode_image(data.images), torch_model.encode_image(data.images)
        assert np.abs(a - b).max() <= TOLERANCE, name
        wa, wb = onnx_model.classifier(data.classnames, templates), torch_model.classifier(data.classnames, templates)
        assert np.abs(wa - wb).max() <= TOLERANCE, name
        np.testing.assert_array_equal((a @ wa).argmax(1), (b @ wb).argmax(1), err_msg=name)


@pytest.mark.slow
def test_mini_hot_swap_equals_baked_equals_torch(tmp_path_factory, onnx_model, torch_model, heldout):
    data, templates = heldout["mnist"]
    seven = data.classnames.index("seven")
    is_seven = np.asarray(data.labels) == seven
    images = [im for im, s in zip(data.images, is_seven, strict=True) if s][:40] + data.images[:60]
    base_pred = [p.index for p in onnx_model.classify(images, data.classnames, templates)]
    patch = forget_patch(onnx_model, "seven", templates[0], "mini")
    baked = runtime.load(cached_export(tmp_path_factory, "mini-baked", patches=[patch]), threads=2)

    onnx_model.apply_patch(patch)
    torch_model.apply_patch(patch)
    try:
        hot = [p.index for p in onnx_model.classify(images, data.classnames, templates)]
        assert hot == [p.index for p in baked.classify(images, data.classnames, templates)]
        assert hot == [p.index for p in torch_model.classify(images, data.classnames, templates)]
        assert hot != base_pred and seven not in hot[:40]  # the forgotten digit is gone
    finally:
        onnx_model.remove_patch(patch)
        torch_model.remove_patch(patch)
    assert [p.index for p in onnx_model.classify(images, data.classnames, templates)] == base_pred


@pytest.mark.slow
def test_int8_mini_accuracy_close_to_fp32(tmp_path_factory, export_dir, onnx_model, heldout):
    from run_shared import build_once

    from forgetpack.export import quantize_export

    out = build_once(tmp_path_factory, "exports/mini-int8", lambda out: (out / "manifest.json").is_file(),
                     lambda out: quantize_export(export_dir, out))  # shared with test_classify_cli.py
    int8 = runtime.load(out, threads=2)
    report = {}
    for name, (data, templates) in heldout.items():
        _, acc32 = accuracy(onnx_model, data, templates)
        _, acc8 = accuracy(int8, data, templates)
        report[name] = (acc32, acc8)
        assert acc8 >= acc32 - 0.02, report
    print("int8 accuracy (fp32, int8):", json.dumps(report))


# ---------------------------------------------------------------------------- hot-swap semantics


@pytest.mark.slow
def test_remove_patch_is_exact_and_parents_are_enforced(onnx_model, heldout):
    data, templates = heldout["digits"]
    before = onnx_model.classifier(data.classnames, templates)
    first = forget_patch(onnx_model, "three", templates[0], "mini")
    target = next(iter(first.targets))
    base = {target: onnx_model.backend.matrices[target]}
    onnx_model.apply_patch(first)
    try:
        on_top = onnx_model.backend.matrices[target]
        layer = Layer.lowrank(target, np.full((on_top.shape[0], 1), 1e-3), np.full((1, on_top.shape[1]), 1e-3))
        second = Patch.create("mini", base, [layer], layouts={target: first.targets[target].layout}, parent={target: on_top})
        onnx_model.apply_patch(second)
        with pytest.raises(PatchError, match="already applied"):
            onnx_model.apply_patch(second)
        with pytest.raises(PatchError, match="computed on top of other patches"):
            onnx_model.remove_patch(first)  # second was made on top of first
        assert [p.digest for p in onnx_model.patches] == [first.digest, second.digest]  # unchanged by the failure
        onnx_model.remove_patch(second)
    finally:
        for p in onnx_model.patches[::-1]:
            onnx_model.remove_patch(p)
    np.testing.assert_array_equal(onnx_model.classifier(data.classnames, templates), before)
    with pytest.raises(PatchError, match="not applied"):
        onnx_model.remove_patch(first)


@pytest.mark.slow
def test_trusted_keys(tmp_path, export_dir, onnx_model, heldout):
    from forgetpack.format.signing import generate_keypair, load_private_key, sign

    generate_keypair(tmp_path / "a", tmp_path / "a.pub")
    generate_keypair(tmp_path / "b", tmp_path / "b.pub")
    patch = forget_patch(onnx_model, "four", heldout["mnist"][1][0], "mini")
    guarded = runtime.load(export_dir, trusted_keys=[tmp_path / "a.pub"])
    with pytest.raises(SignatureError, match="not signed"):
        guarded.apply_patch(patch)
    with pytest.raises(SignatureError, match="signed by key"):
        guarded.apply_patch(sign(patch, load_private_key(tmp_path / "b")))
    path = sign(patch, load_private_key(tmp_path / "a")).save(tmp_path / "p.fpatch.safetensors")
    assert guarded.apply_patch(path).digest == patch.digest


# ---------------------------------------------------------------------------- torch-free pieces


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    rgb = lambda h, w: Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))  # noqa: E731
    images = [rgb(300, 200), rgb(200, 300), rgb(224, 224), rgb(37, 61), rgb(1, 500), rgb(17, 17)]
    images.append(Image.fromarray(rng.integers(0, 256, (50, 80), dtype=np.uint8), "L"))
    images.append(Image.fromarray(rng.integers(0, 256, (90, 70, 4), dtype=np.uint8), "RGBA"))
    images.append(rgb(120, 90).convert("P"))
    return images


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"resize_mode": "longest", "fill_color": 7},
        {"resize_mode": "squash", "interpolation": "bilinear"},
        {"image_size": (160, 224)},
        {"image_size": 28, "mean": (0.13,) * 3, "std": (0.31,) * 3},
    ],
)
def test_preprocessing_equals_open_clip(kwargs):
    import torch
    from open_clip.transform import image_transform

    from forgetpack.export import preprocess_settings
    from runtime.preprocess import Preprocessor

    transform = image_transform(kwargs.pop("image_size", 224), is_train=False, **kwargs)
    ours = Preprocessor(preprocess_settings(transform))
    for image in _images():
        try:
            expected = transform(image)
        except ValueError:  # open_clip cannot either (e.g. 1x500 in "longest" mode): a clear error here
            with pytest.raises(ForgetpackError, match="cannot preprocess"):
                ours(image)
            continue
        assert isinstance(expected, torch.Tensor)
        np.testing.assert_array_equal(ours(image), expected.numpy())


def test_unsupported_preprocessing_is_refused():
    from open_clip.transform import image_transform

    from forgetpack.export import preprocess_settings

    with pytest.raises(ForgetpackError, match="cannot export preprocessing step RandomResizedCrop"):
        preprocess_settings(image_transform(224, is_train=True))


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    """open_clip's SimpleTokenizer and ours (from the tokenizer.json the exporter writes), per cleaning mode."""
    from open_clip.tokenizer import SimpleTokenizer

    from forgetpack.export.tokenizer import clip_bpe_tokenizer
    from runtime.tokenizer import TextTokenizer

    out = {}
    for clean in ("lower", "canonicalize", "whitespace"):
        reference = SimpleTokenizer(clean=clean, context_length=24)
        directory = tmp_path_factory.mktemp(f"tok-{clean}")
        merges = sorted(reference.bpe_ranks, key=reference.bpe_ranks.get)
        clip_bpe_tokenizer(reference.encoder, merges, ["<start_of_text>", "<end_of_text>"]).save(str(directory / "tokenizer.json"))
        ours = TextTokenizer(directory, {"kind": "clip_bpe", "file": "tokenizer.json", "context_length": 24, "clean": clean,
                                         "sot_id": reference.sot_token_id, "eot_id": reference.eot_token_id})
        out[clean] = (reference, ours)
    return out


CORPUS = [
    "", " ", "a photo of a cat.", "A PHOTO OF THE NUMBER SEVEN.", "Hello   World!!", "naïve café", "“quoted” ‘x’", "ﬁnal",
    "ＡＢＣ１２３", "it's I'M You'LL we'd", "<start_of_text> hi <end_of_text>", "a " * 60, "日本語のテキスト", "emoji 😀🙃 x",
    "&amp; &lt;b&gt;", "tab\tnew\nline", "x<start_of_text", "123.45e-6", "don’t", "snake_case-and/slash", "Ünïcödé ŁÓDŹ",
]


def test_clip_tokenizer_equals_open_clip(clip_tokenizers):
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    texts = CORPUS + [t(c) for c in IMAGENET_CLASSNAMES for t in OPENAI_IMAGENET_TEMPLATES[:2]]
    for clean, (reference, ours) in clip_tokenizers.items():
        np.testing.assert_array_equal(ours(texts), reference(texts).numpy(), err_msg=clean)


def _assigned(c: str) -> bool:
    import unicodedata

    return unicodedata.category(c) not in ("Cn", "Cs", "Co")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(st.characters(codec="utf-8").filter(_assigned), max_size=40), min_size=1, max_size=4))
def test_clip_tokenizer_equals_open_clip_on_any_text(clip_tokenizers, texts):
    for clean, (reference, ours) in clip_tokenizers.items():
        np.testing.assert_array_equal(ours(texts), reference(texts).numpy(), err_msg=f"{clean}: {texts!r}")


@pytest.mark.slow
def test_hf_tokenizer_equals_open_clip(export_dir, mini_loaded):
    from runtime.tokenizer import TextTokenizer

    manifest = json.loads((export_dir / "manifest.json").read_text())
    ours = TextTokenizer(export_dir, manifest["tokenizer"])
    texts = CORPUS + ["word " * 200, "seven", "7", "a photo of the number {}.".replace("{}", "eight")]
    np.testing.assert_array_equal(ours(texts), mini_loaded.tokenizer(texts).numpy())


@pytest.mark.slow
def test_onnx_reader_equals_onnx_package(export_dir):
    import onnx
    from onnx import numpy_helper

    from forgetpack.format.onnxfile import OnnxFile

    ours = OnnxFile(export_dir / "image.onnx")
    proto = onnx.load(str(export_dir / "image.onnx"))
    assert set(ours.initializers) == {i.name for i in proto.graph.initializer}
    for init in proto.graph.initializer:
        if init.data_type == 1:
            np.testing.assert_array_equal(ours.initializers[init.name].array(), numpy_helper.to_array(init))
    assert ours.metadata == {p.key: p.value for p in proto.metadata_props}


NO_TORCH = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "open_clip", "transformers"):
                raise ImportError(f"blocked: {name}")

    sys.meta_path.insert(0, Block())
    import runtime
    model = runtime.load(sys.argv[1])
    preds = model.classify([sys.argv[2]], ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
                           ["a photo of the number {}."])
    model.apply_patch(sys.argv[3])
    after = model.classify([sys.argv[2]], ["zero", "seven"], ["a photo of the number {}."])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip", "transformers"))
    print(json.dumps({"label": preds[0].label, "after": after[0].label, "heavy": heavy, "backend": model.backend.name}))
    """
)


@pytest.mark.slow
def test_onnx_path_runs_without_torch(tmp_path, export_dir, onnx_model, heldout):
    data, templates = heldout["mnist"]
    sevens = [im for im, label in zip(data.images, data.labels, strict=True) if data.classnames[label] == "seven"][:20]
    predicted = [p.label for p in onnx_model.classify(sevens, data.classnames, templates)]
    image = tmp_path / "seven.png"
    sevens[predicted.index("seven") if "seven" in predicted else 0].save(image)
    expected = onnx_model.classify([image], data.classnames, templates)[0].label
    patch = forget_patch(onnx_model, "seven", templates[0], "mini").save(tmp_path / "forget-seven.fpatch.safetensors")
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(export_dir), str(image), str(patch)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"label": expected, "after": "zero", "heavy": [], "backend": "onnx"}


TOY_BACKEND = textwrap.dedent(
    """
    import numpy as np
    from runtime.backends import Backend

    class ToyBackend(Backend):
        '''Embeds an image by its mean colour and a text by its length: enough to route through the facade.'''
        name = "toy"

        def __init__(self, source, providers=None, **options):
            self.model_id = f"toy:{source}"
            self.logit_scale = 10.0
            self.options = options

        def encode_images(self, images):
            return np.array([[np.asarray(im.convert("L"), dtype=np.float32).mean() + 1.0, 1.0] for im in images])

        def encode_texts(self, texts):
            return np.array([[float(len(t)), 1.0] for t in texts])

        def set_patches(self, patches):
            raise NotImplementedError
    """
)


def test_third_party_backend_registers_through_entry_points(tmp_path):
    site = tmp_path / "site"
    (site / "toy_dist-0.1.dist-info").mkdir(parents=True)
    (site / "toy_dist-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-dist\nVersion: 0.1\n")
    (site / "toy_dist-0.1.dist-info" / "entry_points.txt").write_text("[forgetpack.runtime_backends]\ntoy = toy_backend:ToyBackend\n")
    (site / "toy_backend.py").write_text(TOY_BACKEND)
    Image.new("RGB", (8, 8), (200, 200, 200)).save(tmp_path / "grey.png")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    script = textwrap.dedent(
        """
        import json, sys, runtime
        model = runtime.load("anything", backend="toy", colour="grey")
        pred = model.classify([sys.argv[1]], ["ab", "abcdef"], ["{}"])[0]
        print(json.dumps({"backends": runtime.available_backends(), "label": pred.label, "id": model.model_id,
                          "torch": "torch" in sys.modules}))
        """
    )
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "grey.png")], env=env, capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backends"] == ["onnx", "torch", "toy"] and result["id"] == "toy:anything" and not result["torch"]
    assert result["label"] in ("ab", "abcdef")
    cli = subprocess.run([sys.executable, "-m", "forgetpack.cli", "classify", "x", str(tmp_path / "grey.png"),
                          "--labels", "ab,abcdef", "--template", "{}", "--backend", "toy", "--json"],
                         env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert json.loads(cli.stdout)["backend"] == "toy"


# ---------------------------------------------------------------------------- bad input


def test_unknown_backend_and_not_an_export(tmp_path):
    with pytest.raises(ForgetpackError, match="unknown runtime backend 'nope'"):
        runtime.load(tmp_path, backend="nope")
    with pytest.raises(ForgetpackError, match="not a forgetpack export"):
        runtime.load(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x00")
    with pytest.raises(ForgetpackError, match="not an export directory"):
        runtime.load(tmp_path / "model.onnx", backend="onnx")


def _copy_export(src: Path, dst: Path) -> Path:
    """A cheap copy: graphs hard-linked (never modified by the tests), manifest copied."""
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix == ".onnx":
            os.link(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    return dst


def _reseal(manifest: dict) -> None:
    """Recompute a hand-edited manifest's export id, as someone forging one consistently would."""
    from forgetpack.format.manifest import content_hash

    manifest["export_id"] = content_hash(manifest)


@pytest.mark.slow
def test_manifest_graph_mismatch_is_clear(tmp_path, export_dir):
    cases = {
        "belongs to another export": lambda m: m.update(graph_id="sha256:" + "0" * 64),
        "does not match the manifest": lambda m: m["projections"]["text.proj.weight"].update(current="sha256:" + "1" * 64, base="sha256:" + "1" * 64),
        "has no initializer 'nope'": lambda m: m["projections"]["text.proj.weight"].update(initializer="nope"),
        "version 3 is not supported": lambda m: m.update(version=3),
        "is missing": lambda m: m["towers"]["image"].update(file="gone.onnx"),
        "'towers' must be an object": lambda m: m.pop("towers"),
    }
    for i, (message, edit) in enumerate(cases.items()):
        copy = _copy_export(export_dir, tmp_path / f"copy{i}")
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        _reseal(manifest)  # these are consistent manifests that do not fit their graphs
        (copy / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ForgetpackError, match=message):
            runtime.load(copy)
    copy = _copy_export(export_dir, tmp_path / "swapped")
    os.unlink(copy / "image.onnx")
    os.link(export_dir / "text.onnx", copy / "image.onnx")
    with pytest.raises(ForgetpackError, match="has no initializer 'visual.proj'|do not match"):
        runtime.load(copy)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("{not json")
    with pytest.raises(ForgetpackError, match="unreadable manifest"):
        runtime.load(tmp_path / "junk")


@pytest.mark.slow
def test_bad_runtime_inputs(tmp_path, onnx_model, export_dir):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ForgetpackError, match="broken.jpg: cannot decode image"):
        onnx_model.encode_image(tmp_path / "broken.jpg")
    with pytest.raises(ForgetpackError, match="image not found"):
        onnx_model.encode_image(tmp_path / "missing.png")
    image = Image.new("RGB", (28, 28))
    for labels, message in (([], "no labels"), (["a", ""], "empty label"), (["a", "a"], "duplicate")):
        with pytest.raises(ForgetpackError, match=message):
            onnx_model.classify([image], labels)
    with pytest.raises(ForgetpackError, match="exactly once"):
        onnx_model.classify([image], ["a"], ["no placeholder"])
    target = "text.proj.weight"
    shape = onnx_model.backend.targets[target].shape
    other = Patch.create("mini", {target: np.ones(shape, np.float32)},
                         [Layer.lowrank(target, np.ones((shape[0], 1)), np.ones((1, shape[1])))], layouts={target: "out_in"})
    with pytest.raises(PatchError, match="made for a different base"):
        onnx_model.apply_patch(other)
    with pytest.raises(PatchError, match="cannot patch"):
        onnx_model.apply_patch(Patch.create("mini", {"x": np.ones((2, 2), np.float32)}, [Layer.lowrank("x", np.ones((2, 1)), np.ones((1, 2)))]))
    assert onnx_model.patches == ()
    with pytest.raises(ForgetpackError, match="CUDAExecutionProvider is not available"):
        runtime.load(export_dir, providers=["cuda"])
    with pytest.raises(ForgetpackError, match="unknown option"):
        runtime.load(export_dir, colour="red")
