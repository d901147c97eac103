"""Regression tests for what an attack on the format, the runtime and file output found (issue 9).

Each test names its finding. These need no torch: a small numpy backend stands in for a model
where the finding is about the facade, and the export-based cases live in test_reliability_export.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from patch_factory import base_matrices, make_patch, write_base
from PIL import Image

import runtime
from forgetpack.cli import main
from forgetpack.format import fileio
from forgetpack.format.checkpoint import Checkpoint, apply_to_file, revert_file
from forgetpack.format.errors import ForgetpackError, PatchError, SignatureError
from forgetpack.format.fileio import RawTensor, save_safetensors, serialize
from forgetpack.format.fit import TargetInfo, apply_in_order
from forgetpack.format.layer import Layer
from forgetpack.format.patch import Patch, fingerprint, read_patch
from forgetpack.format.signing import generate_keypair, load_private_key, sign


def one_line_error(capsys, *args: object) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code != 0 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def forged(path: Path, patch: Patch, **metadata: str) -> Path:
    """Write ``patch`` with metadata fields replaced and the digest recomputed: it reads as genuine
    as far as the digest goes, so only the content checks can refuse it."""
    from forgetpack.format.metadata import digest

    tensors = patch.tensors()
    meta = {**patch.metadata(), **metadata}
    meta.pop("digest")
    meta["digest"] = digest(tensors, meta)
    path.write_bytes(serialize({k: RawTensor.from_array(v) for k, v in tensors.items()}, meta))
    return path


class MatrixBackend(runtime.Backend):
    """A numpy model: a text is a fixed random feature row, its embedding ``features @ W``; images
    are rows of the identity. Patches apply through the one fit rule, like the real backends."""

    name = "matrix"

    def __init__(self, seed: int = 0) -> None:
        self.model_id = "test-model"
        self.logit_scale = 10.0
        self._base = base_matrices(seed)
        self.targets = {n: TargetInfo(m.shape, fingerprint(m), "in_out") for n, m in self._base.items()}
        self._w = self._base["text_projection"]
        self.baked = ()

    def features(self, texts):
        return np.stack([np.random.default_rng(int(hashlib.sha256(t.encode()).hexdigest()[:8], 16))
                         .standard_normal(24).astype(np.float32) for t in texts])

    def encode_texts(self, texts):
        w = self._w  # one state per call
        time.sleep(0.0005)  # widen the window in which a patch change could interleave
        return self.features(texts) @ w

    def encode_images(self, images):
        return np.stack([np.eye(16, dtype=np.float32)[int(np.asarray(im).mean()) % 16] for im in images])

    def set_patches(self, patches):
        self._w = apply_in_order(self._base, patches, self.targets)["text_projection"]


# ---------------------------------------------------------------------------- 2. Inf models


def test_huge_finite_factors_are_refused(tmp_path: Path, capsys) -> None:
    base = write_base(tmp_path / "base.safetensors")
    good = make_patch(base, 1)
    huge = Layer.lowrank("text_projection", np.full((24, 2), 3e38), np.full((2, 16), 3e38))
    evil = replace(good, layers=(huge,))
    tensors = {k: RawTensor.from_array(v) for k, v in evil.tensors().items()}
    meta = evil.metadata()  # digest computed over the huge factors: the digest check passes
    (tmp_path / "inf.fpatch").write_bytes(serialize(tensors, meta))
    with pytest.raises(PatchError, match="beyond the limit"):
        read_patch(tmp_path / "inf.fpatch")
    for args in (("verify", tmp_path / "inf.fpatch", "--base", tmp_path / "base.safetensors"),
                 ("stack", tmp_path / "inf.fpatch", "-o", tmp_path / "s.fpatch"),
                 ("apply", tmp_path / "base.safetensors", tmp_path / "inf.fpatch", "-o", tmp_path / "out.safetensors")):
        assert "beyond the limit" in one_line_error(capsys, *args)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_result_that_overflows_its_dtype_is_refused() -> None:
    w = np.full((4, 4), 60000, dtype=np.float16)
    layer = Layer.lowrank("w", np.full((4, 1), 100.0), np.full((1, 4), 100.0))  # 60000 + 10000 > fp16 max
    with pytest.raises(PatchError, match="not finite in float16"):
        layer.apply(w)


def test_the_runtime_never_returns_nan() -> None:
    backend = MatrixBackend()
    model = runtime.Model(backend)
    backend._w = backend._w * np.float32(np.nan)
    with pytest.raises(ForgetpackError, match="not finite"):
        model.encode_text("cat")
    with pytest.raises(ForgetpackError, match="not finite"):
        model.classify(np.zeros((4, 4, 3), np.uint8), ["cat", "dog"])


# ---------------------------------------------------------------------------- 5. trust sets


def test_an_empty_trust_set_refuses_every_patch(tmp_path: Path) -> None:
    backend = MatrixBackend()
    patch = make_patch(backend._base, 1)
    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    signed = sign(patch, load_private_key(tmp_path / "key"))
    for keys in ([], ()):
        model = runtime.Model(MatrixBackend(), trusted_keys=keys)
        for p in (patch, signed):
            with pytest.raises(SignatureError):
                model.apply_patch(p)
        assert model.patches == ()
    # a single path (str or Path) is one key, not a list of characters
    for key in (str(tmp_path / "key.pub"), tmp_path / "key.pub"):
        model = runtime.Model(MatrixBackend(), trusted_keys=key)
        model.apply_patch(signed)
        with pytest.raises(SignatureError, match="is not signed"):
            model.apply_patch(make_patch(backend._base, 2))
    with pytest.raises(SignatureError, match="neither a public key file"):
        runtime.Model(MatrixBackend(), trusted_keys=[123])


# ---------------------------------------------------------------------------- 6. keygen


def test_keygen_never_leaves_the_private_key_readable(tmp_path: Path, monkeypatch) -> None:
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((Path(dst).name, stat.S_IMODE(os.stat(src).st_mode)))
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", spy)
    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    assert ("key", 0o600) in seen  # already 0600 when it takes the private key's name
    assert stat.S_IMODE(os.stat(tmp_path / "key").st_mode) == 0o600


# ---------------------------------------------------------------------------- 8. escapes in labels


def test_labels_with_escape_sequences_are_printed_escaped(tmp_path: Path, capsys) -> None:
    from forgetpack.cli.render import Table, show

    table = Table(title="x\x1b[2J")
    table.add_column("label")
    table.add_row("seven\x1b]0;owned\x07 :warning:")
    show(table)
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and ":warning:" in out and "\\x1b" in out


# ---------------------------------------------------------------------------- 9. one line, never a traceback


@pytest.mark.parametrize("field,value", [
    ("parent", "{}"),
    ("parent", json.dumps({"another.key": "sha256:" + "0" * 64})),
    ("result", json.dumps({"text_projection": 5})),
    ("base", json.dumps({"text_projection": "sha256:xyz"})),
    ("components", json.dumps([1, 2])),
])
def test_malformed_fingerprint_metadata_is_one_line(tmp_path: Path, capsys, field: str, value: str) -> None:
    base = write_base(tmp_path / "base.safetensors")
    path = forged(tmp_path / "bad.fpatch", make_patch(base, 1), **{field: value})
    for args in (("inspect", path), ("verify", path, "--base", tmp_path / "base.safetensors"), ("stack", path, "-o", tmp_path / "s"),
                 ("apply", tmp_path / "base.safetensors", path, "-o", tmp_path / "o.safetensors")):
        assert str(path) in one_line_error(capsys, *args)


def test_odd_recipe_types_are_refused_and_odd_effects_do_not_break_inspect(tmp_path: Path, capsys) -> None:
    """A recipe's name lists are lists of strings (format.metadata.check_metadata: every consumer lists
    them); the effect is free-form JSON, which inspect shows whatever its shape."""
    base = write_base(tmp_path / "base.safetensors")
    path = forged(tmp_path / "odd.fpatch", make_patch(base, 1),
                  recipe=json.dumps({"forget": 7, "preserve": {"a": 1}, "templates": None, "solver": [1]}),
                  effect=json.dumps({"forget": "x", "retained": None}))
    for args in (("inspect", path), ("inspect", path, "--json")):
        assert str(path) in one_line_error(capsys, *args)
    path = forged(tmp_path / "odd-effect.fpatch", make_patch(base, 1), effect=json.dumps({"forget": "x", "retained": None}))
    assert main(["inspect", str(path)]) == 0
    assert main(["inspect", str(path), "--json"]) == 0


def test_an_unwritable_destination_is_one_line_and_keeps_the_old_file(tmp_path: Path, capsys, monkeypatch) -> None:
    base = write_base(tmp_path / "base.safetensors")
    make_patch(base, 1).save(tmp_path / "a.fpatch")
    (tmp_path / "out.safetensors").write_bytes(b"old")

    def full_disk(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    line = one_line_error(capsys, "apply", tmp_path / "base.safetensors", tmp_path / "a.fpatch", "-o", tmp_path / "out.safetensors",
                          "--force")
    assert "No space left on device" in line and "out.safetensors" in line
    assert (tmp_path / "out.safetensors").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    for args in (("keygen", "-o", tmp_path / "k"), ("sign", tmp_path / "a.fpatch", "--key", tmp_path / "nokey"),
                 ("stack", tmp_path / "a.fpatch", "-o", tmp_path / "s.fpatch")):
        one_line_error(capsys, *args)


def test_a_deeply_nested_checkpoint_record_is_one_line(tmp_path: Path, capsys) -> None:
    base = base_matrices()
    tensors = {n: RawTensor.from_array(m) for n, m in base.items()}
    save_safetensors(tmp_path / "deep.safetensors", tensors, {"forgetpack": "[" * 100_000 + "]" * 100_000})
    make_patch(base, 1).save(tmp_path / "a.fpatch")
    assert "malformed 'forgetpack' metadata" in one_line_error(capsys, "apply", tmp_path / "deep.safetensors", tmp_path / "a.fpatch",
                                                               "-o", tmp_path / "o.safetensors")


def test_bad_images_and_options_are_one_line_errors(tmp_path: Path) -> None:
    model = runtime.Model(MatrixBackend())
    strip = tmp_path / "strip.png"
    Image.new("L", (2_000_000, 1)).save(strip)
    cases = [(strip, "too elongated"), (np.zeros((0, 0, 3), np.uint8), "not an image")]
    for image, message in cases:
        with pytest.raises(ForgetpackError, match=message):
            model.encode_image(image)
    with pytest.raises(ForgetpackError, match="neither a name nor"):
        from runtime.backends.onnx import resolve_providers

        resolve_providers([123])
    from runtime.backends import check_threads

    for threads in (0, 100000, "2", 2.0):
        with pytest.raises(ForgetpackError, match="threads must be"):
            check_threads(threads)


# ---------------------------------------------------------------------------- 10. temporaries


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    out = tmp_path / "out.safetensors"
    dead = 2**22 + 12345  # beyond pid_max on this kind of machine: never a live process
    stale_file = tmp_path / f".out.safetensors.fp{dead}.abc123.tmp"
    stale_dir = tmp_path / f".out.safetensors.fp{dead}.def456.old"
    live = tmp_path / f".out.safetensors.fp{os.getpid()}.ghi789.tmp"  # our own: a live writer
    other = tmp_path / f".other.fp{dead}.jkl012.tmp"  # another output's: not ours to remove
    stale_file.write_bytes(b"x" * 1000)
    stale_dir.mkdir()
    (stale_dir / "text.onnx").write_bytes(b"x")
    live.write_bytes(b"x")
    other.write_bytes(b"x")
    fileio.write_bytes_atomic(out, b"new")
    assert not stale_file.exists() and not stale_dir.exists()
    assert live.exists() and other.exists() and out.read_bytes() == b"new"


# ---------------------------------------------------------------------------- 11. concurrency


def test_concurrent_patch_changes_leave_one_consistent_state() -> None:
    """Two writers toggle patches while readers classify: every answer equals the answer of one
    valid patch state, and the patch list never holds a duplicate (bounded: 2 s)."""
    backend = MatrixBackend()
    patches = [make_patch(backend._base, seed) for seed in (1, 2)]
    model = runtime.Model(backend)
    texts = [f"label {i}" for i in range(8)]
    states = [(), (patches[0],), (patches[1],), (patches[0], patches[1]), (patches[1], patches[0])]
    reference = {}
    for state in states:
        model.set_patches(list(state))
        reference[tuple(p.digest for p in state)] = model.encode_text(texts)
    model.set_patches([])
    stop = time.monotonic() + 2.0
    errors: list[str] = []

    def writer(patch: Patch) -> None:
        while time.monotonic() < stop:
            try:
                model.apply_patch(patch)
            except PatchError:
                pass  # already applied: the other writer's state
            digests = [p.digest for p in model.patches]
            if len(digests) != len(set(digests)):
                errors.append(f"duplicate in {digests}")
            try:
                model.remove_patch(patch)
            except PatchError:
                pass

    def reader() -> None:
        while time.monotonic() < stop:
            emb, digests = model.consistently(lambda: (model.encode_text(texts), tuple(p.digest for p in model.patches)))
            ref = reference.get(digests)
            if ref is None or not np.allclose(emb, ref, atol=1e-6):
                errors.append(f"answer for {digests} matches no valid state")

    threads = [threading.Thread(target=writer, args=(p,)) for p in patches] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]


# ---------------------------------------------------------------------------- 12. limits


def test_inputs_that_are_not_regular_files_say_what_they_are(tmp_path: Path, capsys) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "folder").mkdir()
    expected = {"fifo": "not a regular file", "dangling": "dangling symbolic link", "folder": "is a directory",
                "/dev/zero": "not a regular file", "missing": "not found"}
    for name, message in expected.items():
        path = name if name.startswith("/") else tmp_path / name
        assert message in one_line_error(capsys, "inspect", path)


def test_a_patch_over_the_rank_limit_is_refused(tmp_path: Path) -> None:
    w = np.zeros((8, 6), np.float32)
    with pytest.raises(PatchError, match="has rank 7"):
        Patch.create("m", {"w": w}, [Layer.lowrank("w", np.ones((8, 7)), np.ones((7, 6)))])


def test_verify_refuses_a_checkpoint_after_an_inexact_revert(tmp_path: Path, capsys) -> None:
    base = write_base(tmp_path / "base.safetensors")
    patch = make_patch(base, 1, scale=0.3)
    patch.save(tmp_path / "a.fpatch")
    apply_to_file(tmp_path / "base.safetensors", [patch], tmp_path / "p.safetensors")
    result = revert_file(tmp_path / "p.safetensors", patch, tmp_path / "r.safetensors")
    assert not result.exact
    assert Checkpoint.read(tmp_path / "r.safetensors").record.exact is False
    assert "inexact revert" in one_line_error(capsys, "verify", tmp_path / "a.fpatch", "--base", tmp_path / "r.safetensors")
