"""ONNX export of ViT-B-32 (random init): manifest, parity with torch, baked vs hot-swapped patches, int8.

ViT-B-32 is exported once per module (about 40 s on 2 cores) and shared by every test here;
the smaller ``mini`` model is covered in test_runtime.py. Full held-out parity numbers come
from ``tools/gpu_parity.py --provider cpu``; here a fixed subset of each set keeps the
suite fast.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from patch_factory import forget_patch

import runtime
from forgetpack.format.errors import ForgetpackError, PatchError
from forgetpack.format.patch import Layer, Patch

pytestmark = pytest.mark.slow

SPEC = "ViT-B-32:none"
PER_SET = 10  # held-out images per evaluation set in the tests
TOLERANCE = 1e-4  # max abs difference of normalised embeddings, ONNX vs torch


def predictions(model: runtime.Model, images, classnames, templates) -> np.ndarray:
    return np.array([p.index for p in model.classify(images, classnames, templates)])


@pytest.fixture(scope="module")
def loaded():
    from forgetpack.engine.models import load_model

    return load_model(SPEC)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, loaded):
    from forgetpack.export import export_loaded

    out = tmp_path_factory.mktemp("vit") / "export"
    export_loaded(loaded, out)
    return out


@pytest.fixture(scope="module")
def torch_model(loaded):
    return runtime.load(loaded, backend="torch")


@pytest.fixture(scope="module")
def heldout():
    from forgetpack.evaluation.datasets import DEFAULT_TEMPLATES, load_dataset

    sets = {}
    for name in ("mnist", "digits", "letters"):
        data = load_dataset(name)
        step = max(len(data.images) // PER_SET, 1)
        sets[name] = (data.images[::step][:PER_SET], data.classnames, list(DEFAULT_TEMPLATES[name]))
    return sets


def test_manifest_maps_every_projection_to_its_initializer(export_dir, loaded):
    import onnx
    from onnx import numpy_helper

    from forgetpack.engine.torch_patch import read_matrices
    from forgetpack.format.patch import fingerprint

    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["model_id"] == SPEC and manifest["opset"] == 18 and manifest["precision"] == "fp32"
    assert set(manifest["projections"]) == {"text_projection", "visual.proj"}
    matrices = read_matrices(loaded.model, manifest["projections"])
    for target, proj in manifest["projections"].items():
        assert proj["initializer"] == target  # the dynamo exporter keeps parameter names
        assert proj["base"] == proj["current"] == fingerprint(matrices[target])
        graph = onnx.load(str(export_dir / manifest["towers"][proj["tower"]]["file"]))
        (init,) = [i for i in graph.graph.initializer if i.name == proj["initializer"]]
        assert fingerprint(numpy_helper.to_array(init)) == proj["current"]
        assert [o.name for o in graph.graph.output] == ["embeddings", "features"]
        assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert manifest["tokenizer"]["kind"] == "clip_bpe" and manifest["tokenizer"]["context_length"] == 77
    assert manifest["preprocess"]["size"] == [224, 224] and manifest["preprocess"]["interpolation"] == "bicubic"
    assert max(manifest["export_check"].values()) <= TOLERANCE


def test_parity_with_torch_on_heldout_sets(onnx_model, torch_model, heldout):
    for name, (images, classnames, templates) in heldout.items():
        a, b = onnx_model.encode_image(images), torch_model.encode_image(images)
        assert np.abs(a - b).max() <= TOLERANCE, name
        wa, wb = onnx_model.classifier(classnames, templates), torch_model.classifier(classnames, templates)
        assert np.abs(wa - wb).max() <= TOLERANCE, name
        np.testing.assert_array_equal((a @ wa).argmax(1), (b @ wb).argmax(1), err_msg=name)


def test_batch_axis_is_dynamic(onnx_model, heldout):
    images = heldout["mnist"][0][:5]
    together = onnx_model.encode_image(images)
    alone = np.concatenate([onnx_model.encode_image([im]) for im in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_hot_swapped_patch_equals_baked_equals_torch(tmp_path_factory, loaded, onnx_model, torch_model, heldout):
    """The same patch three ways: hot-swapped into onnxruntime, baked in at export, applied in torch.

    The patch changes only the text projection, so the baked export here is text-only (the
    image graph would be identical to the module's export); test_runtime.py repeats this
    with full exports of mini.
    """
    from forgetpack.export import export_loaded

    images, classnames, templates = heldout["mnist"]
    patch = forget_patch(onnx_model, "seven", templates[0], SPEC)
    baked_dir = tmp_path_factory.mktemp("vit-baked") / "export"
    export_loaded(loaded, baked_dir, [patch], towers=("text",))  # before torch_model patches the shared model
    baked = runtime.load(baked_dir, threads=2)
    assert baked.baked == (patch.digest,) and baked.patches == ()

    image_onnx, image_torch = onnx_model.encode_image(images), torch_model.encode_image(images)
    base_weights = onnx_model.classifier(classnames, templates)
    onnx_model.apply_patch(patch)
    torch_model.apply_patch(patch)
    try:
        w_hot = onnx_model.classifier(classnames, templates)
        w_baked = baked.classifier(classnames, templates)
        w_torch = torch_model.classifier(classnames, templates)
        np.testing.assert_allclose(w_hot, w_baked, atol=1e-6)
        assert np.abs(w_hot - w_torch).max() <= TOLERANCE
        hot = (image_onnx @ w_hot).argmax(1)
        np.testing.assert_array_equal(hot, (image_onnx @ w_baked).argmax(1))
        np.testing.assert_array_equal(hot, (image_torch @ w_torch).argmax(1))
        np.testing.assert_array_equal(hot, predictions(onnx_model, images, classnames, templates))  # end to end
        seven = classnames.index("seven")
        assert w_hot[:, seven] @ base_weights[:, seven] < -0.9  # the patch really moved "seven"
        with pytest.raises(PatchError, match="already applied"):  # baked in counts as applied
            baked.apply_patch(patch)
        with pytest.raises(PatchError, match="baked into the export"):
            baked.remove_patch(patch)
    finally:
        onnx_model.remove_patch(patch)
        torch_model.remove_patch(patch)
    assert onnx_model.patches == ()
    np.testing.assert_array_equal(onnx_model.classifier(classnames, templates), base_weights)  # exact revert


def test_int8_export_stays_close_to_fp32(tmp_path_factory, export_dir, onnx_model, heldout):
    from forgetpack.export import quantize_export

    out = tmp_path_factory.mktemp("vit-int8") / "export"
    manifest = quantize_export(export_dir, out)
    assert manifest.precision == "int8"
    assert (out / "image.onnx").stat().st_size < 0.4 * (export_dir / "image.onnx").stat().st_size
    int8 = runtime.load(out, threads=2)
    images, classnames, templates = heldout["letters"]
    cos_image = (int8.encode_image(images) * onnx_model.encode_image(images)).sum(1)
    cos_text = (int8.classifier(classnames, templates) * onnx_model.classifier(classnames, templates)).sum(0)
    assert cos_image.min() > 0.95 and cos_text.min() > 0.95, (cos_image.min(), cos_text.min())
    # The projection is kept in float32 under its name, so patches still hot-swap on int8.
    patch = forget_patch(onnx_model, "A", templates[0], SPEC)
    int8.apply_patch(patch)
    assert int8.backend.matrices["text_projection"].dtype == np.float32
    int8.remove_patch(patch)


def test_export_refuses_bad_requests(tmp_path, loaded):
    from forgetpack.export import export_loaded

    other = Patch.create(SPEC, {"text_projection": np.ones((512, 512), np.float32)},
                         [Layer.lowrank("text_projection", np.ones((512, 1)), np.ones((1, 512)))])
    with pytest.raises(PatchError, match="different base"):
        export_loaded(loaded, tmp_path / "a", [other])
    stray = Patch.create(SPEC, {"logit_scale": np.ones((1, 1), np.float32)},
                         [Layer.lowrank("logit_scale", np.ones((1, 1)), np.ones((1, 1)))])
    with pytest.raises(PatchError, match="which this export of ViT-B-32:none cannot patch"):  # not a projection
        export_loaded(loaded, tmp_path / "b", [stray])
    with pytest.raises(ForgetpackError, match="unknown quantization"):
        export_loaded(loaded, tmp_path / "c", quantize="int4")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(ForgetpackError, match="exists: pass --force to replace it"):
        export_loaded(loaded, tmp_path / "d")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary directory left behind


def test_projection_missing_from_graph_is_a_clear_error():
    """If an exporter renamed or folded the projection, export fails naming the target."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from forgetpack.engine.projections import Projection
    from forgetpack.export.graph import projection_node

    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "onnx::MatMul_7")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["embeddings"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", 3])], [w],
    )
    proto = helper.make_model(graph)
    with pytest.raises(ForgetpackError, match="'text_projection' of the text tower cannot be found"):
        projection_node(proto, "text", Projection("text_projection", "in_out", "openai-text"))
    shared = onnx.ModelProto()
    shared.CopyFrom(proto)
    shared.graph.node.append(helper.make_node("MatMul", ["x", "onnx::MatMul_7"], ["other"]))
    with pytest.raises(ForgetpackError, match="in 2 nodes"):
        projection_node(shared, "text", Projection("onnx::MatMul_7", "in_out", "openai-text"))
