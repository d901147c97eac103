"""Bad input: a fuzzed reader and every bad case of the issue through the CLI."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from patch_factory import base_matrices, make_patch, write_base

from forgetpack.cli import main
from forgetpack.format.errors import PatchError
from forgetpack.format.fileio import RawTensor, atomic_output, serialize
from forgetpack.format.patch import read_patch
from forgetpack.format.signing import generate_keypair, load_private_key, load_public_key, sign, verify_signature


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    base = write_base(tmp / "base.safetensors")
    write_base(tmp / "other_base.safetensors", seed=9)
    patch = make_patch(base, 1, targets=("text_projection", "visual.proj"))
    generate_keypair(tmp / "key", tmp / "key.pub")
    generate_keypair(tmp / "other", tmp / "other.pub")
    signed = sign(patch, load_private_key(tmp / "key"))
    signed.save(tmp / "good.fpatch.safetensors")
    return tmp, signed


def _parts(patch):
    return {k: RawTensor.from_array(v) for k, v in patch.tensors().items()}, patch.metadata()


def _write(path: Path, tensors, meta) -> Path:
    path.write_bytes(serialize(tensors, meta))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --------------------------------------------------------------------------- crafted cases


def _variants(tmp: Path, patch) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected words in the error)."""
    good = (tmp / "good.fpatch.safetensors").read_bytes()
    tensors, meta = _parts(patch)
    out: dict[str, tuple[Path, str]] = {}

    def variant(name: str, data: bytes, words: str) -> None:
        path = tmp / f"{name}.fpatch.safetensors"
        path.write_bytes(data)
        out[name] = (path, words)

    variant("truncated", good[: len(good) // 2], "not a readable safetensors patch")
    variant("random", os.urandom(2000), "not a readable safetensors patch")
    variant("empty", b"", "not a readable safetensors patch")
    variant("not_patch", serialize({"w": RawTensor.from_array(np.ones((2, 2), np.float32))}, {"format": "pt"}), "not a forgetpack patch")
    variant("version", serialize(tensors, {**meta, "format_version": "7"}), "unsupported patch format version '7'")
    missing = dict(tensors)
    missing.pop("layers.0.text_projection.down")
    variant("missing_tensor", serialize(missing, meta), "missing tensor layers.0.text_projection.down")
    extra = {**tensors, "sneaky": RawTensor.from_array(np.ones(3, np.float32))}
    variant("extra_tensor", serialize(extra, meta), "unexpected tensor sneaky")
    wrong_shape = dict(tensors)
    wrong_shape["layers.0.text_projection.up"] = RawTensor.from_array(np.ones((5, 2), np.float32))
    variant("wrong_shape", serialize(wrong_shape, meta), "has shape [5, 2], expected [24, 2]")
    wrong_dtype = dict(tensors)
    wrong_dtype["layers.0.text_projection.up"] = RawTensor.from_array(patch.layers[0].up.astype(np.float64))
    variant("wrong_dtype", serialize(wrong_dtype, meta), "dtype F64, expected F32")
    nan = dict(tensors)
    bad = patch.layers[0].up.copy()
    bad[0, 0] = np.nan
    nan["layers.0.text_projection.up"] = RawTensor.from_array(bad)
    variant("nan", serialize(nan, meta), "NaN or Inf")
    inf = dict(tensors)
    bad = patch.layers[1].down.copy()
    bad[0, 0] = np.inf
    inf["layers.1.visual.proj.down"] = RawTensor.from_array(bad)
    variant("inf", serialize(inf, meta), "NaN or Inf")
    tampered = dict(tensors)
    up = patch.layers[0].up.copy()
    up[3, 1] += 1e-3
    tampered["layers.0.text_projection.up"] = RawTensor.from_array(up)
    variant("tampered_tensor", serialize(tampered, meta), "digest mismatch")
    recipe = json.loads(meta["recipe"])
    recipe["forget"] = ["someone else"]
    variant("tampered_metadata", serialize(tensors, {**meta, "recipe": json.dumps(recipe)}), "digest mismatch")
    variant("bad_json", serialize(tensors, {**meta, "targets": "{not json"}), "'targets' is not valid JSON")
    return out


CASES = [
    "truncated", "random", "empty", "not_patch", "version", "missing_tensor", "extra_tensor", "wrong_shape",
    "wrong_dtype", "nan", "inf", "tampered_tensor", "tampered_metadata", "bad_json",
]  # fmt: skip


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("command", ["inspect", "verify", "apply"])
def test_bad_patch_through_cli(setup, capsys, case: str, command: str) -> None:
    tmp, patch = setup
    path, words = _variants(tmp, patch)[case]
    out = tmp / "out.safetensors"
    args = {"inspect": [path], "verify": [path], "apply": [tmp / "base.safetensors", path, "-o", out]}[command]
    code, err = run_cli(capsys, command, *args)
    assert_one_line_error(code, err, str(path), words)
    assert not out.exists()


def test_patch_for_another_base(setup, capsys) -> None:
    tmp, _ = setup
    good = tmp / "good.fpatch.safetensors"
    code, err = run_cli(capsys, "verify", good, "--base", tmp / "other_base.safetensors")
    assert_one_line_error(code, err, str(good), "different base")
    code, err = run_cli(capsys, "apply", tmp / "other_base.safetensors", good, "-o", tmp / "x.safetensors")
    assert_one_line_error(code, err, "different base", "sha256:")
    assert err.count("sha256:") >= 2  # both fingerprints named


def test_signatures(setup, capsys) -> None:
    tmp, patch = setup
    good = tmp / "good.fpatch.safetensors"
    code, err = run_cli(capsys, "verify", good, "--key", tmp / "key.pub")
    assert code == 0
    code, err = run_cli(capsys, "verify", good, "--key", tmp / "other.pub")
    assert_one_line_error(code, err, str(good), "signed by key")
    # A signature copied onto other content does not verify (the digest is still valid).
    other = make_patch(base_matrices(), 7)
    forged = other.__class__(**{**other.__dict__, "signature": patch.signature, "key_id": patch.key_id})
    forged.save(tmp / "forged.fpatch.safetensors")
    code, err = run_cli(capsys, "verify", tmp / "forged.fpatch.safetensors", "--key", tmp / "key.pub")
    assert_one_line_error(code, err, "signature does not verify")
    unsigned = tmp / "unsigned.fpatch.safetensors"
    other.save(unsigned)
    code, err = run_cli(capsys, "apply", tmp / "base.safetensors", unsigned, "-o", tmp / "y.safetensors", "--key", tmp / "key.pub")
    assert_one_line_error(code, err, "is not signed")
    code, err = run_cli(capsys, "verify", good, "--key", tmp / "key")  # a private key is not a public key
    assert_one_line_error(code, err, "not a PEM public key")


def test_output_in_missing_directory(setup, capsys) -> None:
    tmp, _ = setup
    out = tmp / "no" / "such" / "dir" / "out.safetensors"
    code, err = run_cli(capsys, "apply", tmp / "base.safetensors", tmp / "good.fpatch.safetensors", "-o", out)
    assert_one_line_error(code, err, "does not exist")
    code, err = run_cli(capsys, "stack", tmp / "good.fpatch.safetensors", "-o", out)
    assert_one_line_error(code, err, "does not exist")


def test_existing_output_is_never_torn(setup, capsys) -> None:
    tmp, _ = setup
    existing = tmp / "existing.safetensors"
    existing.write_bytes(b"precious")
    code, err = run_cli(capsys, "apply", tmp / "other_base.safetensors", tmp / "good.fpatch.safetensors", "-o", existing)
    assert_one_line_error(code, err, f"{existing} exists: pass --force to replace it")
    code, _ = run_cli(capsys, "apply", tmp / "other_base.safetensors", tmp / "good.fpatch.safetensors", "-o", existing, "--force")
    assert code != 0 and existing.read_bytes() == b"precious"  # with --force, a run that fails still leaves it whole
    with pytest.raises(RuntimeError), atomic_output(existing) as handle:
        handle.write(b"half of a new fi")
        raise RuntimeError("disk died")
    assert existing.read_bytes() == b"precious"
    assert [p.name for p in tmp.iterdir() if p.name.startswith(".existing")] == []


def test_missing_files(setup, capsys) -> None:
    tmp, _ = setup
    code, err = run_cli(capsys, "inspect", tmp / "nope.fpatch.safetensors")
    assert_one_line_error(code, err, "nope.fpatch.safetensors", "not found")
    code, err = run_cli(capsys, "apply", tmp / "nope.safetensors", tmp / "good.fpatch.safetensors", "-o", tmp / "z")
    assert_one_line_error(code, err, "nope.safetensors", "checkpoint not found")


def test_applying_twice_and_tampered_checkpoint(setup, capsys) -> None:
    tmp, _ = setup
    good = tmp / "good.fpatch.safetensors"
    assert run_cli(capsys, "apply", tmp / "base.safetensors", good, "-o", tmp / "once.safetensors")[0] == 0
    code, err = run_cli(capsys, "apply", tmp / "once.safetensors", good, "-o", tmp / "twice.safetensors")
    assert_one_line_error(code, err, "already applied")
    # Edit a patched matrix behind forgetpack's back: later operations refuse it.
    from forgetpack.format.checkpoint import Checkpoint
    from forgetpack.format.fileio import save_safetensors

    ckpt = Checkpoint.read(tmp / "once.safetensors")
    w = ckpt.matrix("text_projection")
    w[0, 0] += 1
    tensors = {**ckpt.tensors, "text_projection": RawTensor.from_array(w)}
    save_safetensors(tmp / "edited.safetensors", tensors, ckpt.metadata)
    code, err = run_cli(capsys, "revert", tmp / "edited.safetensors", good, "-o", tmp / "r.safetensors")
    assert_one_line_error(code, err, "modified after patching")


# --------------------------------------------------------------------------- fuzzing


def _mutations(good: bytes, rng: np.random.Generator, n: int):
    (header_len,) = struct.unpack("<Q", good[:8])
    for i in range(n):
        data = bytearray(good)
        kind = i % 6
        if kind == 0:  # truncate anywhere
            yield "truncate", bytes(data[: int(rng.integers(0, len(data)))])
            continue
        if kind == 1:  # flip random bytes anywhere
            for pos in rng.integers(0, len(data), size=int(rng.integers(1, 4))):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 2:  # flip bytes inside the JSON header
            for pos in rng.integers(8, 8 + header_len, size=int(rng.integers(1, 3))):
                data[pos] ^= int(rng.integers(1, 256))
        elif kind == 3:  # flip bytes in the tensor data
            pos = int(rng.integers(8 + header_len, len(data)))
            data[pos] ^= int(rng.integers(1, 256))
        elif kind == 4:  # corrupt the length prefix
            data[:8] = struct.pack("<Q", int(rng.integers(0, 2**63)) if rng.random() < 0.5 else header_len + int(rng.integers(-40, 40)))
        else:  # delete or insert a chunk
            pos = int(rng.integers(0, len(data)))
            if rng.random() < 0.5:
                del data[pos : pos + int(rng.integers(1, 64))]
            else:
                data[pos:pos] = rng.bytes(int(rng.integers(1, 64)))
        yield ["", "flip", "header", "data", "length", "splice"][kind], bytes(data)


def test_fuzzed_patches_end_in_patch_error(setup, tmp_path: Path) -> None:
    """1,200 mutated or truncated files: each is a PatchError, or unchanged in meaning.

    Reading checks structure and digest; the signature (outside the digest) is checked
    against the signer's key, as ``verify --key`` does.
    """
    tmp, patch = setup
    keys = [load_public_key(tmp / "key.pub")]
    good = (tmp / "good.fpatch.safetensors").read_bytes()
    rng = np.random.default_rng(1234)
    errors = harmless = 0
    path = tmp_path / "fuzz.fpatch.safetensors"
    for kind, data in _mutations(good, rng, 1200):
        path.write_bytes(data)
        try:
            parsed = read_patch(path)
            verify_signature(parsed, keys)
        except PatchError:
            errors += 1
            continue
        # A mutation that parses must be meaning-preserving (e.g. JSON whitespace).
        assert parsed.digest == patch.digest and parsed.signature == patch.signature, kind
        harmless += 1
    assert errors + harmless == 1200
    assert errors >= 1000


# --------------------------------------------------------------------------- no torch


def test_format_module_and_light_commands_do_not_import_torch(setup) -> None:
    tmp, _ = setup
    good = tmp / "good.fpatch.safetensors"
    script = f"""
import sys
import forgetpack.format.patch, forgetpack.format.checkpoint, forgetpack.format.signing
from forgetpack.cli import main
for args in (["--help"], ["inspect", {str(good)!r}], ["inspect", "--json", {str(good)!r}],
             ["verify", {str(good)!r}, "--base", {str(tmp / 'base.safetensors')!r}, "--key", {str(tmp / 'key.pub')!r}]):
    code = main(args)
    assert code == 0, (args, code)
heavy = [m for m in ("torch", "open_clip", "onnx", "onnxruntime") if m in sys.modules]
assert not heavy, heavy
print("OK")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("OK")
