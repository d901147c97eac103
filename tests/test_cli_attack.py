"""Hostile input through the CLI and the libraries: each a one-line project error, never a crash, a hang or a lie."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from patch_factory import base_matrices, make_patch, write_base

from forgetpack.cli import main
from forgetpack.format.errors import ForgetpackError, PatchError
from forgetpack.format.fileio import RawTensor, serialize
from forgetpack.format.metadata import UNSIGNED_KEYS
from forgetpack.format.metadata import digest as content_digest
from forgetpack.format.patch import Layer, Patch, read_patch
from forgetpack.format.signing import generate_keypair

MODEL_FREE = "mini"  # every refusal below comes before a model would load


def run_cli(capsys, *args: object) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    assert code == 1, (code, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Patch]:
    tmp = tmp_path_factory.mktemp("attack")
    base = write_base(tmp / "base.safetensors")
    patch = make_patch(base, 1)
    patch.save(tmp / "good.fpatch.safetensors")
    return tmp, patch


def _with_metadata(path: Path, patch: Patch, **changes: str) -> Path:
    """``patch`` with metadata fields replaced and a valid digest over them: well formed, hostile content."""
    tensors = {k: RawTensor.from_array(v) for k, v in patch.tensors().items()}
    meta = {k: v for k, v in patch.metadata().items() if k not in UNSIGNED_KEYS}
    meta.update(changes)
    meta["digest"] = content_digest(patch.tensors(), meta)
    path.write_bytes(serialize(tensors, meta))
    return path


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def run_unblocked(fifo: Path, call):
    """Run ``call``; if it blocks on ``fifo`` (opened for reading), unblock it and fail the test."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(20)
    if thread.is_alive():
        with open(fifo, "wb"):
            pass  # the reader gets end of file
        thread.join(20)
        pytest.fail(f"blocked reading the FIFO {fifo}")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]


# --------------------------------------------------------------------------- S1: patch metadata types


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("recipe", json.dumps({"forget": 7}), "list of strings"),
    ("recipe", json.dumps({"forget": "seven"}), "list of strings"),
    ("recipe", json.dumps({"forget": ["seven", 3]}), "list of strings"),
    ("recipe", json.dumps({"forget": ["seven"], "preserve": {"a": 1}}), "list of strings"),
    ("effect", '{"retained": NaN}', "NaN"),
    ("effect", '{"retained": Infinity}', "Infinity"),
    ("recipe", '{"forget": ["x"], "w": -Infinity}', "Infinity"),
    ("effect", "[" * 200 + "]" * 200, "nested"),
    ("effect", '{"a": ' * 40 + "1" + "}" * 40, "nested"),
    ("components", json.dumps([{"recipe": {"forget": 7}}]), "list of strings"),
], ids=["number", "string", "mixed", "preserve-object", "nan", "infinity", "minus-infinity", "deep-list", "deep-object",
        "component"])  # fmt: skip
def test_read_patch_refuses_hostile_metadata_types(good, tmp_path, field, value, needle):
    _, patch = good
    path = _with_metadata(tmp_path / "bad.fpatch.safetensors", patch, **{field: value})
    with pytest.raises(PatchError) as caught:
        read_patch(path)
    message = str(caught.value)
    assert str(path) in message and needle in message and "\n" not in message


def test_inspect_of_a_number_forget_is_one_line(capsys, good, tmp_path):
    _, patch = good
    path = _with_metadata(tmp_path / "number.fpatch.safetensors", patch, recipe=json.dumps({"forget": 7}))
    assert_one_line_error(*run_cli(capsys, "inspect", path), str(path), "'forget'")


def test_patches_as_made_still_read(good, tmp_path):
    """The rule refuses nothing forgetpack writes: the factory's patches, stacks, and a full recipe."""
    tmp, patch = good
    assert read_patch(tmp / "good.fpatch.safetensors").recipe == patch.recipe
    base = base_matrices()
    full = Patch.create("m", base, [Layer.lowrank("text_projection", np.ones((24, 1)), np.ones((1, 16)))], recipe={
        "forget": ["seven"], "preserve": [], "templates": ["{}", "a {}."], "weights": {"forget": 1.0}, "rank": None,
        "vocabulary": {"model": ["a"] * 5000, "extra": []}}, effect={"forget": {"seven": {"predicted": {"{}": "one"}}},
                                                                      "audit": {"families": {"lexicon": {"bypasses": [[]]}}}})  # fmt: skip
    full.save(tmp_path / "full.fpatch.safetensors")
    assert read_patch(tmp_path / "full.fpatch.safetensors").digest == full.digest


def test_a_nan_effect_is_refused_when_made_not_written():
    with pytest.raises(PatchError, match="NaN"):
        Patch.create("m", base_matrices(), [Layer.lowrank("text_projection", np.ones((24, 1)), np.ones((1, 16)))],
                     recipe={"forget": ["x"]}, effect={"retained": float("nan")})


# --------------------------------------------------------------------------- S4: templates


HOSTILE_TEMPLATES = ["{:>99999999999999}{}", "{}{:>99999999999999}", "{!r}", "{0}", "{x}", "{{}}{}", "{:}", "a {} {{",
                     "{}}", "{", "no placeholder", "{}{}", "{0[0]}", "{.__class__}"]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_check_templates_inspects_never_formats(template):
    from forgetpack.format.names import check_templates

    with pytest.raises(ForgetpackError, match="exactly once"):
        check_templates([template])


def test_check_templates_keeps_plain_ones():
    from forgetpack.engine.variants import imagenet_templates
    from forgetpack.format.names import CLASSIFY_TEMPLATES, FORGET_TEMPLATES, check_templates

    plain = [*imagenet_templates(), *FORGET_TEMPLATES, *CLASSIFY_TEMPLATES, "{} 100%", "a {}: [x]"]
    assert check_templates(plain) == list(dict.fromkeys(plain))


def test_forget_refuses_a_format_spec_template(capsys, tmp_path):
    code, err = run_cli(capsys, "forget", MODEL_FREE, "--forget", "seven", "--template", "{:>99999999999999}{}",
                        "-o", tmp_path / "p.fpatch.safetensors")
    assert_one_line_error(code, err, "{:>99999999999999}{}")


def test_runtime_classifier_refuses_a_format_spec_template():
    import runtime

    model = runtime.Model(SimpleNamespace(baked=()))
    with pytest.raises(ForgetpackError, match="exactly once"):
        model.classifier(["cat"], ["{:>99999999999999}{}"])


# --------------------------------------------------------------------------- L1: FIFOs named as such


def test_sign_key_fifo(capsys, good, tmp_path):
    tmp, _ = good
    fifo = _fifo(tmp_path / "key.fifo")
    code, err = run_unblocked(fifo, lambda: run_cli(capsys, "sign", tmp / "good.fpatch.safetensors", "--key", fifo,
                                                    "-o", tmp_path / "signed.fpatch.safetensors"))
    assert_one_line_error(code, err, str(fifo), "FIFO")


def test_verify_key_fifo(capsys, good, tmp_path):
    tmp, _ = good
    fifo = _fifo(tmp_path / "key.pub.fifo")
    code, err = run_unblocked(fifo, lambda: run_cli(capsys, "verify", tmp / "good.fpatch.safetensors", "--key", fifo))
    assert_one_line_error(code, err, str(fifo), "FIFO")


def test_audit_variants_fifo(capsys, good, tmp_path):
    tmp, _ = good
    fifo = _fifo(tmp_path / "variants.fifo")
    code, err = run_unblocked(fifo, lambda: run_cli(capsys, "audit", MODEL_FREE, "--patch", tmp / "good.fpatch.safetensors",
                                                    "--forget", "class1", "--variants", fifo))
    assert_one_line_error(code, err, str(fifo), "FIFO")


def test_keys_still_load(tmp_path):
    from forgetpack.format.signing import load_private_key, load_public_key

    generate_keypair(tmp_path / "k", tmp_path / "k.pub")
    load_private_key(tmp_path / "k")
    load_public_key(tmp_path / "k.pub")


# --------------------------------------------------------------------------- L2/L3: export opsets


@pytest.mark.parametrize("opset", ["99", "1", "17", "26"])
def test_export_refuses_unsupported_opsets(capsys, tmp_path, opset):
    code, err = run_cli(capsys, "export", MODEL_FREE, "-o", tmp_path / "export", "--opset", opset)
    assert_one_line_error(code, err, f"opset {opset}", "18 to 20")
    assert not (tmp_path / "export").exists()


def test_export_library_refuses_unsupported_opsets(tmp_path):
    from forgetpack.export import SUPPORTED_OPSETS, check_opset, export_loaded

    assert list(SUPPORTED_OPSETS) == [18, 19, 20]
    assert [check_opset(o) for o in SUPPORTED_OPSETS] == [18, 19, 20]
    with pytest.raises(ForgetpackError, match="opset True"):
        check_opset(True)
    with pytest.raises(ForgetpackError, match="opset 1 "):
        export_loaded(SimpleNamespace(), tmp_path / "e", opset=1)  # before the model is touched


def test_export_refuses_a_graph_written_at_another_opset(tmp_path, monkeypatch):
    """Where the exporter cannot convert it falls back to its own opset (mini's image tower asked for 17
    came out at 18 while the manifest said 17): each graph's real opset is checked, nothing is published."""
    from forgetpack.engine.models import load_model
    from forgetpack.export import export_loaded, graph, traced

    real = graph._to_onnx

    def falls_back(*args, **kwargs):
        proto = real(*args, **kwargs)
        for entry in proto.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = 18
        return proto

    monkeypatch.setattr(graph, "_to_onnx", falls_back)
    monkeypatch.setattr(traced, "_TRACES", traced.Recent(traced.MAX_ENTRIES))  # a fresh trace, not one an earlier test kept
    with pytest.raises(ForgetpackError, match="wrote the image graph at opset 18, not the 19 asked for"):
        export_loaded(load_model("mini"), tmp_path / "e", towers=("image",), opset=19)
    assert not (tmp_path / "e").exists()


# --------------------------------------------------------------------------- L4: forget options


def test_forget_says_when_the_rank_is_smaller_than_asked(capsys, tmp_path):
    from forgetpack.cli.commands.forget import _print_result

    output = tmp_path / "p.fpatch.safetensors"
    output.write_bytes(b"x")
    report = {"recipe": {"rank": 100000, "solver": "closed-form"}, "rank": 5}
    _print_result(SimpleNamespace(report=report, patch=SimpleNamespace(digest="sha256:0")), output, as_json=True)
    err = capsys.readouterr().err
    assert "--rank 100000" in err and "rank 5" in err


def test_forget_says_nothing_when_the_rank_is_as_asked(capsys, tmp_path):
    from forgetpack.cli.commands.forget import _print_result

    output = tmp_path / "p.fpatch.safetensors"
    output.write_bytes(b"x")
    for recipe_rank in (None, 5):
        _print_result(SimpleNamespace(report={"recipe": {"rank": recipe_rank, "solver": "s"}, "rank": 5},
                                      patch=SimpleNamespace(digest="sha256:0")), output, as_json=True)
        assert "rank" not in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["folder", "fifo"])
def test_forget_preserve_file_names_a_folder_or_fifo(capsys, tmp_path, kind):
    where = tmp_path / "names"
    where.mkdir() if kind == "folder" else _fifo(where)
    code, err = run_cli(capsys, "forget", MODEL_FREE, "--forget", "seven", "--preserve-file", where,
                        "-o", tmp_path / "p.fpatch.safetensors")
    line = assert_one_line_error(code, err, str(where), "directory" if kind == "folder" else "FIFO")
    assert "does not exist" not in line


# --------------------------------------------------------------------------- runtime patch arguments, layouts


@pytest.mark.parametrize("call", [
    lambda m: m.remove_patch(123), lambda m: m.remove_patch(None), lambda m: m.apply_patch(None),
    lambda m: m.apply_patch(123), lambda m: m.set_patches(None), lambda m: m.set_patches([None]),
    lambda m: m.patch_state([b"x"]),
])  # fmt: skip
def test_runtime_patch_arguments_of_the_wrong_type(call):
    import runtime

    model = runtime.Model(SimpleNamespace(baked=()))
    with pytest.raises(PatchError, match="is not a"):
        call(model)


def _flipped(tmp_path: Path) -> tuple[Path, Path]:
    base = write_base(tmp_path / "base.safetensors")
    rows, cols = base["text_projection"].shape
    flipped = Patch.create("test-model", base, [Layer.lowrank("text_projection", np.ones((rows, 1)), np.ones((1, cols)))],
                           layouts={"text_projection": "out_in"}, recipe={"forget": ["x"]})
    return tmp_path / "base.safetensors", flipped.save(tmp_path / "flipped.fpatch.safetensors")


def test_apply_refuses_a_layout_flipped_patch(capsys, tmp_path):
    base, patch = _flipped(tmp_path)
    code, err = run_cli(capsys, "apply", base, patch, "-o", tmp_path / "out.safetensors")
    assert_one_line_error(code, err, "out_in", "in_out")
    assert not (tmp_path / "out.safetensors").exists()


def test_verify_base_refuses_a_layout_flipped_patch(capsys, tmp_path):
    base, patch = _flipped(tmp_path)
    assert_one_line_error(*run_cli(capsys, "verify", patch, "--base", base), "out_in", "in_out")


def test_layout_rule_is_one_function():
    from forgetpack.format.fit import TargetInfo, check_fit, expected_layout

    assert [expected_layout(n) for n in ("text_projection", "visual.proj", "text.proj.weight", "other")] == [
        "in_out", "in_out", "out_in", None]
    assert expected_layout("text_projection", "out_in") == "out_in"  # what the model says wins
    patch = make_patch(base_matrices(), 3)
    info = {"text_projection": TargetInfo((24, 16), patch.base["text_projection"], "out_in")}
    with pytest.raises(PatchError, match="stored in_out"):
        check_fit(patch, info)
    check_fit(patch, {"text_projection": TargetInfo((24, 16), patch.base["text_projection"])})
