"""CLI conventions: every patch command speaks JSON on stdout with --json, terminal-active
characters from files never reach the terminal, and `backends` lists what is installed."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from patch_factory import make_patch, write_base

from forgetpack.cli import main
from forgetpack.cli.render import escape
from forgetpack.format.patch import read_patch


def run(capsys, *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    base = write_base(tmp_path / "base.safetensors")
    make_patch(base, 1).save(tmp_path / "a.fpatch.safetensors")
    make_patch(base, 2, targets=("visual.proj",)).save(tmp_path / "b.fpatch.safetensors")
    return tmp_path


def test_every_patch_command_prints_json(files: Path, capsys) -> None:
    t = files
    code, out, _ = run(capsys, "keygen", "-o", t / "key", "--json")
    keys = json.loads(out)
    assert code == 0 and keys["public"] == f"{t / 'key'}.pub" and len(keys["key_id"]) == 16

    code, out, _ = run(capsys, "sign", t / "a.fpatch.safetensors", "--key", t / "key", "-o", t / "a.signed.fpatch", "--json")
    signed = json.loads(out)
    assert code == 0 and signed["key_id"] == keys["key_id"]
    assert signed["digest"] == read_patch(t / "a.fpatch.safetensors").digest  # signing keeps the digest

    code, out, _ = run(capsys, "verify", t / "a.signed.fpatch", "--key", t / "key.pub", "--base", t / "base.safetensors", "--json")
    verified = json.loads(out)
    assert code == 0 and verified["signature"] == {"key_id": keys["key_id"], "verified": True}
    assert verified["fits"] == str(t / "base.safetensors") and verified["digest_ok"]

    code, out, _ = run(capsys, "stack", t / "a.fpatch.safetensors", t / "b.fpatch.safetensors", "-o", t / "ab.fpatch", "--json")
    stacked = json.loads(out)
    assert code == 0 and stacked["patches"] == 2 and stacked["digest"] == read_patch(t / "ab.fpatch").digest

    code, out, _ = run(capsys, "apply", t / "base.safetensors", t / "a.fpatch.safetensors", t / "b.fpatch.safetensors",
                       "-o", t / "patched.safetensors", "--json")
    applied = json.loads(out)
    assert code == 0 and len(applied["applied"]) == 2

    code, out, _ = run(capsys, "revert", t / "patched.safetensors", t / "b.fpatch.safetensors", "-o", t / "reverted.safetensors",
                       "--base", t / "base.safetensors", "--keep", t / "a.fpatch.safetensors", "--json")
    reverted = json.loads(out)
    assert code == 0 and reverted["exact"] is True and reverted["applied"] == applied["applied"][:1]

    code, out, _ = run(capsys, "inspect", t / "a.signed.fpatch", "--json")
    assert code == 0 and json.loads(out)["key_id"] == keys["key_id"]


def test_inspect_says_an_unchecked_signature_is_not_verified(files: Path, capsys) -> None:
    run(capsys, "keygen", "-o", files / "key")
    run(capsys, "sign", files / "a.fpatch.safetensors", "--key", files / "key")
    code, out, _ = run(capsys, "inspect", files / "a.fpatch.safetensors")
    assert code == 0 and "not verified" in re.sub(r"[│\s]+", " ", out)  # folded table cells joined


def test_escape_makes_terminal_controls_visible() -> None:
    assert escape("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert escape("\x9b31m") == "\\x9b31m"  # C1 control sequence introducer
    assert escape("abc\u202edef") == "abc\\u202edef"  # right-to-left override
    assert escape("two\nlines") == "two\nlines" and escape("two\nlines", cell=True) == "two\\x0alines"
    assert escape("café [bold] :warning:") == "café [bold] :warning:"


def test_metadata_with_escape_sequences_is_printed_escaped(tmp_path: Path, capsys) -> None:
    """A patch whose metadata carries terminal escapes (digest recomputed, so it reads fine)
    must not clear the screen or turn ':warning:' into an emoji when inspected."""
    from dataclasses import replace

    base = write_base(tmp_path / "base.safetensors")
    patch = make_patch(base, 1)
    evil = replace(patch, created="\x1b[2J\x1b[H2026", tool="x\x07 :warning: [red]",
                   recipe={**patch.recipe, "forget": ["\x1b]0;owned\x07seven"]})
    evil.save(tmp_path / "evil.fpatch")
    for args in (("inspect",), ("inspect", "--json"), ("verify",), ("verify", "--json")):
        code, out, err = run(capsys, args[0], tmp_path / "evil.fpatch", *args[1:])
        assert code == 0
        for stream in (out, err):
            assert "\x1b" not in stream and "\x07" not in stream and "⚠" not in stream
    code, out, _ = run(capsys, "inspect", tmp_path / "evil.fpatch")
    assert "\\x1b[2J" in out and ":warning:" in out


def test_backends_lists_runtime_backends_providers_and_solvers(capsys) -> None:
    code, out, _ = run(capsys, "backends", "--json")
    listing = json.loads(out)
    assert code == 0
    assert {"onnx", "torch"} <= set(listing["runtime_backends"])
    assert {"closed-form", "paper", "nullspace"} <= set(listing["solvers"])
    assert "CPUExecutionProvider" in listing["onnxruntime"]["available"]
    code, out, _ = run(capsys, "backends")
    assert code == 0 and "closed-form" in out and "CPUExecutionProvider" in out
