"""``forgetpack export`` and ``forgetpack classify`` through the CLI, including every bad input.

The mini export is shared with test_runtime.py through pytest's session temp dir, and is
made here through the CLI itself when this module runs first.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from run_shared import build_once

from forgetpack.cli import main
from forgetpack.format.manifest import content_hash
from forgetpack.format.patch import Layer, Patch

pytestmark = pytest.mark.slow

TEMPLATE = "a photo of the number {}."
DIGITS = "zero,one,two,three,four,five,six,seven,eight,nine"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The run's mini export (tests/run_shared.py), made by the command when this module is first to need it."""

    def build(out):
        assert main(["export", "mini", "-o", str(out), "--force"]) == 0

    return build_once(tmp_path_factory, "exports/mini", lambda out: (out / "manifest.json").is_file(), build)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two held-out MNIST digits as PNG files, plus their true names."""
    from forgetpack.evaluation.datasets import load_dataset

    data = load_dataset("mnist")
    root = tmp_path_factory.mktemp("images")
    paths, names = [], []
    for want in ("seven", "two"):
        i = next(i for i, label in enumerate(data.labels) if data.classnames[label] == want)
        paths.append(root / f"{want}.png")
        data.images[i].save(paths[-1])
        names.append(want)
    return paths, names


def run_json(capsys, args: list[str]) -> dict:
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_export_cli_writes_a_complete_directory(export_dir):
    manifest = json.loads((export_dir / "manifest.json").read_text())
    assert manifest["model_id"] == "mini"
    assert {p.name for p in export_dir.iterdir()} == {"manifest.json", "image.onnx", "text.onnx", "tokenizer.json"}
    assert set(manifest["projections"]) == {"text.proj.weight", "visual.attnpool.c_proj.weight"}


def test_classify_table_and_json(capsys, export_dir, images):
    paths, _ = images
    assert main(["classify", str(export_dir), *map(str, paths), "--labels", DIGITS, "--template", TEMPLATE]) == 0
    table = capsys.readouterr().out
    assert "mini via onnx" in table and "seven.png" in table
    onnx = run_json(capsys, ["classify", str(export_dir), *map(str, paths), "--labels", DIGITS, "--template", TEMPLATE, "--json"])
    assert onnx["backend"] == "onnx" and onnx["model"] == "mini" and len(onnx["results"]) == 2
    for r in onnx["results"]:
        probs = [t["prob"] for t in r["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert r["top"][0]["label"] == r["label"] and r["top"][0]["prob"] == r["score"]
    reference = run_json(capsys, ["classify", "mini", *map(str, paths), "--labels", DIGITS, "--template", TEMPLATE,
                                  "--backend", "torch", "--json"])
    assert reference["backend"] == "torch"
    assert [r["label"] for r in reference["results"]] == [r["label"] for r in onnx["results"]]
    for a, b in zip(onnx["results"], reference["results"], strict=True):
        assert abs(a["score"] - b["score"]) < 1e-3


def _antipode_patch(export_dir: Path, label: str) -> Patch:
    import runtime

    backend = runtime.load(export_dir).backend
    target = "text.proj.weight"
    w = backend.matrices[target]
    x = backend.text_features([TEMPLATE.replace("{}", label)])[0].astype(np.float64)
    y = x @ w.T.astype(np.float64)
    return Patch.create("mini", {target: w}, [Layer.lowrank(target, (-2.0 * y)[:, None], (x / (x @ x))[None, :])],
                        layouts={target: "out_in"}, recipe={"forget": [label]})


def test_hot_patch_baked_int8_export_and_torch_agree(capsys, tmp_path_factory, tmp_path, export_dir, images):
    """One CLI export covers --patch and --quantize: the same patch hot-swapped into an int8 copy of
    the plain export must classify like the int8 export with it baked in; fp32 hot equals torch."""
    from forgetpack.export import quantize_export

    paths, _ = images
    patch = _antipode_patch(export_dir, "seven").save(tmp_path / "seven.fpatch.safetensors")
    common = [*map(str, paths), "--labels", DIGITS, "--template", TEMPLATE, "--json"]
    hot = run_json(capsys, ["classify", str(export_dir), *common, "--patch", str(patch)])
    assert len(hot["patches"]) == 1 and "seven" not in [r["label"] for r in hot["results"]]
    torch = run_json(capsys, ["classify", "mini", *common, "--backend", "torch", "--patch", str(patch)])
    assert [r["label"] for r in hot["results"]] == [r["label"] for r in torch["results"]]

    int8_dir = build_once(tmp_path_factory, "exports/mini-int8", lambda out: (out / "manifest.json").is_file(),
                          lambda out: quantize_export(export_dir, out))  # shared with test_runtime.py
    baked_dir = tmp_path / "baked"
    assert main(["export", "mini", "--patch", str(patch), "-o", str(baked_dir), "--quantize", "int8", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["precision"] == "int8" and [p["digest"] for p in manifest["patches"]] == hot["patches"]
    baked = run_json(capsys, ["classify", str(baked_dir), *common])
    hot8 = run_json(capsys, ["classify", str(int8_dir), *common, "--patch", str(patch)])
    assert baked["baked"] == hot["patches"] and baked["patches"] == []
    assert [r["label"] for r in hot8["results"]] == [r["label"] for r in baked["results"]]
    for a, b in zip(hot8["results"], baked["results"], strict=True):
        assert abs(a["score"] - b["score"]) < 1e-4


def _error(capsys, args: list[str]) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code != 0, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_and_nonzero_exit(capsys, tmp_path, export_dir, images):
    paths, _ = images
    image = str(paths[0])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    mismatch = tmp_path / "mismatch"
    shutil.copytree(export_dir, mismatch, copy_function=lambda s, d: Path(d).symlink_to(s) if s.endswith(".onnx") else shutil.copy(s, d))
    manifest = json.loads((mismatch / "manifest.json").read_text())
    manifest["projections"]["visual.attnpool.c_proj.weight"].update(current="sha256:" + "0" * 64, base="sha256:" + "0" * 64)
    manifest["export_id"] = content_hash(manifest)  # a consistent manifest that does not fit its graphs
    (mismatch / "manifest.json").write_text(json.dumps(manifest))
    edited = tmp_path / "edited"
    shutil.copytree(mismatch, edited, symlinks=True)
    manifest["model_id"] = "ViT-B-32:openai"  # an edit without a new export id
    (edited / "manifest.json").write_text(json.dumps(manifest))
    other = Patch.create("mini", {"text.proj.weight": np.ones((256, 384), np.float32)},
                         [Layer.lowrank("text.proj.weight", np.ones((256, 1)), np.ones((1, 384)))],
                         layouts={"text.proj.weight": "out_in"}).save(tmp_path / "other.fpatch.safetensors")
    cases = {
        "not a forgetpack export": ["classify", str(tmp_path / "empty"), image, "--labels", "a,b"],
        "does not match the manifest": ["classify", str(mismatch), image, "--labels", "a,b"],
        "modified after export": ["classify", str(edited), image, "--labels", "a,b"],
        "cannot decode image": ["classify", str(export_dir), str(tmp_path / "broken.png"), "--labels", "a,b"],
        "image not found": ["classify", str(export_dir), str(tmp_path / "nope.png"), "--labels", "a,b"],
        "--labels is empty": ["classify", str(export_dir), image, "--labels", " , "],
        "duplicate label": ["classify", str(export_dir), image, "--labels", "a,a"],
        "made for a different base": ["classify", str(export_dir), image, "--labels", "a,b", "--patch", str(other)],
        "CUDAExecutionProvider is not available": ["classify", str(export_dir), image, "--labels", "a,b", "--provider", "cuda"],
        "unknown runtime backend 'nope'": ["classify", str(export_dir), image, "--labels", "a,b", "--backend", "nope"],
        "exactly once": ["classify", str(export_dir), image, "--labels", "a,b", "--template", "a photo"],
        "patch not found": ["classify", str(export_dir), image, "--labels", "a,b", "--patch", str(tmp_path / "x.fpatch.safetensors")],
        "exists: pass --force to replace it": ["export", "mini", "-o", str(export_dir)],
        "unknown model spec": ["export", "nonsense", "-o", str(tmp_path / "out")],
        "not an export directory": ["classify", "/no/such/dir", image, "--labels", "a", "--backend", "onnx"],
    }
    for message, args in cases.items():
        err = _error(capsys, args)
        assert message in err, (message, err)
    assert not (tmp_path / "out").exists()
