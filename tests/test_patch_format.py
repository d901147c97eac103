"""The patch file: round trip, spec conformance, stacking, determinism, exact revert."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from patch_factory import base_matrices, make_patch, write_base
from safetensors import safe_open
from safetensors.numpy import load_file, save

from forgetpack.format.checkpoint import Checkpoint, apply_to_file, revert_file
from forgetpack.format.errors import PatchError
from forgetpack.format.fileio import RawTensor, save_safetensors, serialize
from forgetpack.format.patch import Layer, Patch, fingerprint, read_patch, stack


def test_round_trip(tmp_path: Path) -> None:
    base = base_matrices()
    patch = make_patch(base, seed=1, targets=("text_projection", "visual.proj"))
    path = patch.save(tmp_path / "p.fpatch.safetensors")
    back = read_patch(path)
    assert back.digest == patch.digest
    assert back.model == patch.model and back.recipe == patch.recipe and back.effect == patch.effect
    assert back.base == patch.base and back.result == patch.result
    for a, b in zip(patch.layers, back.layers, strict=True):
        assert a.target == b.target
        np.testing.assert_array_equal(a.up, b.up)
        np.testing.assert_array_equal(a.down, b.down)
    assert back.to_bytes() == path.read_bytes()  # reading and re-writing is the identity


def test_digest_is_hashed_once_per_instance(monkeypatch) -> None:
    import dataclasses

    from forgetpack.format import patch as patch_module

    patch = make_patch(base_matrices(), seed=1)
    calls = []
    real = patch_module.content_digest
    monkeypatch.setattr(patch_module, "content_digest", lambda *a: calls.append(1) or real(*a))
    first = patch.digest
    assert patch.digest == first and len(calls) == 1  # services key caches by it: no re-hashing
    changed = dataclasses.replace(patch, recipe={"forget": ["other"]})
    assert changed.digest != first and len(calls) == 2  # a new instance has its own digest


def test_readable_by_plain_safetensors(tmp_path: Path) -> None:
    base = base_matrices()
    patch = make_patch(base, seed=1)
    path = patch.save(tmp_path / "p.fpatch.safetensors")
    tensors = load_file(path)
    assert set(tensors) == {"layers.0.text_projection.up", "layers.0.text_projection.down"}
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["format"] == "forgetpack.patch" and meta["format_version"] == "1"
    assert json.loads(meta["targets"])["text_projection"] == {"shape": [24, 16], "layout": "in_out"}
    assert json.loads(meta["base"])["text_projection"] == fingerprint(base["text_projection"])
    # The delta is up @ down in the target's own layout.
    delta = tensors["layers.0.text_projection.up"].astype(np.float64) @ tensors["layers.0.text_projection.down"]
    np.testing.assert_allclose(patch.delta("text_projection"), delta, rtol=1e-12)


def test_canonical_writer_matches_safetensors() -> None:
    """Our writer emits what safetensors emits (single metadata key: no hash-order issue)."""
    arrays = {"b": np.ones((2, 3), np.float32), "a": np.arange(4, dtype=np.int64), "c": np.zeros(3, np.float16)}
    ours = serialize({k: RawTensor.from_array(v) for k, v in arrays.items()}, {"format": "pt"})
    assert ours == save(arrays, metadata={"format": "pt"})


def test_one_class_patch_size(tmp_path: Path) -> None:
    """A rank-1 patch for a 512x512 projection, with a realistic recipe, is far below 16 KB."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((512, 512)).astype(np.float32)
    layer = Layer.lowrank("text_projection", rng.standard_normal((512, 1)), rng.standard_normal((1, 512)))
    recipe = {"forget": ["golden retriever"], "preserve": [f"imagenet class {i}" for i in range(50)], "solver": "closed-form"}
    path = Patch.create("ViT-B-32:openai", {"text_projection": w}, [layer], recipe=recipe).save(tmp_path / "p.fpatch.safetensors")
    assert path.stat().st_size < 16 * 1024


def test_apply_is_deterministic(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    patches = [make_patch(base, 1), make_patch(base, 2, targets=("visual.proj", "text_projection"))]
    apply_to_file(tmp_path / "base.safetensors", patches, tmp_path / "a.safetensors")
    apply_to_file(tmp_path / "base.safetensors", patches, tmp_path / "b.safetensors")
    assert hashlib.sha256((tmp_path / "a.safetensors").read_bytes()).digest() == hashlib.sha256((tmp_path / "b.safetensors").read_bytes()).digest()
    out = load_file(tmp_path / "a.safetensors")
    src = load_file(tmp_path / "base.safetensors")
    for untouched in ("logit_scale", "positional_embedding", "token_ids"):
        assert out[untouched].dtype == src[untouched].dtype
        np.testing.assert_array_equal(out[untouched], src[untouched])
    assert not np.array_equal(out["text_projection"], src["text_projection"])


def test_patched_checkpoint_does_not_carry_the_way_back(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    patch = make_patch(base, 1)
    apply_to_file(tmp_path / "base.safetensors", [patch], tmp_path / "out.safetensors")
    data = (tmp_path / "out.safetensors").read_bytes()
    assert base["text_projection"].tobytes() not in data  # original matrix not embedded
    assert patch.layers[0].up.tobytes() not in data  # nor the update


def test_stack_equals_sequential_apply_bit_for_bit(tmp_path: Path) -> None:
    base = base_matrices()
    a, b = make_patch(base, 1), make_patch(base, 2, targets=("text_projection", "visual.proj"))
    sequential = b.apply(a.apply(base))
    stacked = stack([a, b])
    path = stacked.save(tmp_path / "s.fpatch.safetensors")
    via_stack = read_patch(path).apply(base)
    for name in base:
        np.testing.assert_array_equal(sequential[name], via_stack[name])
    assert [c["digest"] for c in read_patch(path).components] == [a.digest, b.digest]


def test_stack_rejects_mismatched_bases() -> None:
    a = make_patch(base_matrices(0), 1)
    b = make_patch(base_matrices(5), 2)
    with pytest.raises(PatchError, match="base fingerprint"):
        stack([a, b])


def test_parent_chain(tmp_path: Path) -> None:
    """A patch computed on top of another applies only on exactly that state."""
    base = write_base(tmp_path / "base.safetensors")
    first = make_patch(base, 1)
    after_first = first.apply(base)
    layer = Layer.lowrank("text_projection", np.full((24, 1), 0.01), np.ones((1, 16)))
    second = Patch.create("test-model", base, [layer], parent={"text_projection": after_first["text_projection"]})
    apply_to_file(tmp_path / "base.safetensors", [first, second], tmp_path / "ok.safetensors")
    with pytest.raises(PatchError, match="on top of other patches"):
        apply_to_file(tmp_path / "base.safetensors", [second], tmp_path / "bad.safetensors")
    assert stack([first, second]).result == second.result


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return load_file(path)


TARGET_SETS = [("text_projection",), ("visual.proj",), ("text_projection", "visual.proj")]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("apply"), st.integers(1, 3), st.integers(0, 2)),  # apply a stack of 1-3 new patches
            st.tuples(st.just("revert"), st.integers(0, 99), st.just(0)),  # revert the i-th applied one
        ),
        min_size=1,
        max_size=6,
    ),
    base_seed=st.integers(0, 6),
    scale=st.sampled_from([1e-6, 1e-3, 0.5, 30.0]),
)
def test_exact_revert_property(tmp_path_factory, ops, base_seed, scale) -> None:
    """Random sequences of stack/apply/revert: the checkpoint always equals base + live patches, bit for bit."""
    tmp = tmp_path_factory.mktemp("rev")
    base = write_base(tmp / "base.safetensors", seed=base_seed)
    current = tmp / "base.safetensors"
    live: list[Patch] = []
    counter = 0
    for step, (op, n, targets) in enumerate(ops):
        out = tmp / f"step{step}.safetensors"
        if op == "apply":
            new = []
            for _ in range(n):
                counter += 1
                new.append(make_patch(base, 1000 * base_seed + counter, targets=TARGET_SETS[(targets + counter) % 3], scale=scale))
            patch = new[0] if n == 1 else stack(new)
            apply_to_file(current, [patch], out)
            live.append(patch)
        else:
            if not live:
                continue
            gone = live.pop(n % len(live))
            result = revert_file(current, gone, out, base_path=tmp / "base.safetensors", others=live)
            assert result.exact
        current = out
        got = _tensors(current)
        if live:
            apply_to_file(tmp / "base.safetensors", live, tmp / "expected.safetensors")
            assert current.read_bytes() == (tmp / "expected.safetensors").read_bytes()
        else:
            expected = _tensors(tmp / "base.safetensors")
            assert set(expected) == set(got)
            for name in expected:
                assert expected[name].tobytes() == got[name].tobytes()
            assert Checkpoint.read(current).record is None


def test_revert_without_base_says_whether_exact(tmp_path: Path) -> None:
    base = write_base(tmp_path / "base.safetensors")
    # On a matrix of small dyadic values, a dyadic update adds and subtracts exactly.
    dyadic = {"text_projection": (np.arange(24 * 16, dtype=np.float32).reshape(24, 16) % 7) / 8}
    save_safetensors(tmp_path / "dyadic.safetensors", {"text_projection": RawTensor.from_array(dyadic["text_projection"])})
    exact_layer = Layer.lowrank("text_projection", np.full((24, 1), 0.5), np.full((1, 16), 0.5))
    exact = Patch.create("test-model", dyadic, [exact_layer])
    apply_to_file(tmp_path / "dyadic.safetensors", [exact], tmp_path / "p1.safetensors")
    res = revert_file(tmp_path / "p1.safetensors", exact, tmp_path / "r1.safetensors")
    assert res.exact
    np.testing.assert_array_equal(_tensors(tmp_path / "r1.safetensors")["text_projection"], dyadic["text_projection"])
    # Random updates generally do not: the command must say so, and the record remembers.
    rough = make_patch(base, 3, scale=10.0)
    apply_to_file(tmp_path / "base.safetensors", [rough], tmp_path / "p2.safetensors")
    res = revert_file(tmp_path / "p2.safetensors", rough, tmp_path / "r2.safetensors")
    assert not res.exact
    assert Checkpoint.read(tmp_path / "r2.safetensors").record.exact is False


def test_repr_is_short() -> None:
    """``print(model.patches)`` shows one short line a patch, not its arrays (issue 23, item 9)."""
    patch = make_patch(base_matrices(), 1)
    text = repr(patch)
    assert len(text) < 600 and "\n" not in text and "array(" not in text and patch.model in text
