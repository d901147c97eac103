"""The same request on the same base gives the same patch, byte for byte; and a patch whose recipe is
already applied or baked in is refused by recipe, not only by digest (issue 23).

A *regenerated duplicate* is the same request solved again into a file with another digest: what
every second ``forget`` run gave while the creation time was part of the digest, and what a run
with ``SOURCE_DATE_EPOCH`` or another forgetpack version still gives. Applying one on top of the
first moved the forgotten embedding a second time.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
from patch_factory import make_patch, write_base
from test_reliability import MatrixBackend

import runtime
from forgetpack.cli import main
from forgetpack.format.checkpoint import apply_to_file
from forgetpack.format.errors import PatchError
from forgetpack.format.patch import Patch, read_patch


def regenerated(patch: Patch) -> Patch:
    """``patch`` solved again: the same recipe on the same base, another creation time, another digest."""
    again = dataclasses.replace(patch, created="2020-01-01T00:00:00+00:00", source=None)
    assert again.digest != patch.digest and again.recipe_key == patch.recipe_key is not None
    return again


def test_creating_a_patch_twice_gives_the_same_bytes(tmp_path: Path, monkeypatch) -> None:
    base = write_base(tmp_path / "base.safetensors")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = make_patch(base, 1).save(tmp_path / "first.fpatch").read_bytes()
    time.sleep(1.05)  # a creation time in whole seconds would differ now
    assert make_patch(base, 1).save(tmp_path / "second.fpatch").read_bytes() == first
    assert read_patch(tmp_path / "first.fpatch").created == ""  # no time unless asked
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1000000000")
    dated = make_patch(base, 1)
    assert dated.created == "2001-09-09T01:46:40+00:00" and dated.to_bytes() == make_patch(base, 1).to_bytes()
    assert dated.recipe_key == read_patch(tmp_path / "first.fpatch").recipe_key  # same request
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(PatchError, match="SOURCE_DATE_EPOCH"):
        make_patch(base, 1)


def test_a_regenerated_duplicate_is_refused_on_a_checkpoint(tmp_path: Path, capsys) -> None:
    base = write_base(tmp_path / "base.safetensors")
    first, other = make_patch(base, 1), make_patch(base, 2)
    regenerated(first).save(tmp_path / "again.fpatch")
    apply_to_file(tmp_path / "base.safetensors", [first], tmp_path / "once.safetensors")
    with pytest.raises(PatchError, match=r"same recipe \(forget class1\) is already applied"):
        apply_to_file(tmp_path / "once.safetensors", [read_patch(tmp_path / "again.fpatch")], tmp_path / "twice.safetensors")
    assert main(["apply", str(tmp_path / "once.safetensors"), str(tmp_path / "again.fpatch"), "-o", str(tmp_path / "twice.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "again.fpatch" in err and "forget class1" in err
    assert not (tmp_path / "twice.safetensors").exists()
    with pytest.raises(PatchError, match="forget class1"):  # both in one run
        apply_to_file(tmp_path / "base.safetensors", [first, regenerated(first)], tmp_path / "twice.safetensors")
    apply_to_file(tmp_path / "once.safetensors", [other], tmp_path / "both.safetensors")  # another request still applies


def test_a_regenerated_duplicate_is_refused_by_a_runtime_model() -> None:
    model = runtime.Model(MatrixBackend())
    first = make_patch(model.backend._base, 1)
    model.apply_patch(first)
    with pytest.raises(PatchError, match=r"same recipe \(forget class1\)"):
        model.apply_patch(regenerated(first))
    assert model.patches == (first,)


def test_a_regenerated_duplicate_is_refused_on_a_torch_model_patched_in_memory(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from test_torch_patch import Tiny

    from forgetpack.engine.torch_patch import apply_patches, read_matrices

    base = write_base(tmp_path / "base.safetensors")
    model = Tiny(base)
    first = make_patch(base, 1)
    apply_patches(model, [first])
    patched = read_matrices(model, ["text_projection"])["text_projection"]
    with pytest.raises(PatchError, match=r"same recipe \(forget class1\)"):
        apply_patches(model, [regenerated(first)])
    assert (read_matrices(model, ["text_projection"])["text_projection"] == patched).all()
    with pytest.raises(PatchError, match="is already applied"):  # the very same patch, by digest
        apply_patches(model, [first])
    apply_patches(model, [make_patch(base, 2)])  # made for the base, which the model remembers


# ---------------------------------------------------------------------------- mini: the engine, an export


@pytest.fixture(scope="module")
def seven():
    """mini, and "seven" forgotten twice by the library, a second apart."""
    import forgetpack

    loaded = forgetpack.load_model("mini")
    first = forgetpack.forget(loaded, forgetpack.ForgetRequest(forget=["seven"])).patch
    time.sleep(1.05)
    second = forgetpack.forget(forgetpack.load_model("mini"), forgetpack.ForgetRequest(forget=["seven"])).patch
    return loaded, first, second


@pytest.mark.slow
def test_forget_twice_gives_byte_identical_patches(seven, tmp_path: Path) -> None:
    _, first, second = seven
    assert first.save(tmp_path / "a.fpatch").read_bytes() == second.save(tmp_path / "b.fpatch").read_bytes()
    assert first.digest == second.digest


@pytest.mark.slow
def test_a_regenerated_duplicate_is_refused_on_an_export_that_has_it_baked_in(seven, tmp_path: Path) -> None:
    from forgetpack.export import export_loaded

    loaded, first, _ = seven
    export_loaded(loaded, tmp_path / "export", [first], towers=("text",))  # the patch changes the text projection
    model = runtime.load(tmp_path / "export", threads=1)
    before = model.encode_text(["seven"])
    again = regenerated(first)
    for attempt in (lambda: model.apply_patch(again), lambda: model.patch_state([again])):
        with pytest.raises(PatchError, match=r"same recipe \(forget seven\)"):
            attempt()
    assert model.patches == () and (model.encode_text(["seven"]) == before).all()
    with pytest.raises(PatchError, match=r"same recipe \(forget seven\)"):  # nor baked in twice
        export_loaded(loaded, tmp_path / "twice", [first, again], towers=("text",))
