"""``forgetpack forget`` and ``forgetpack compose`` from the command line."""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from forgetpack.cli import main
from forgetpack.format.patch import read_patch

MODEL = "ViT-B-32:none"


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_forget_writes_a_patch_and_prints_a_table(tmp_path, capsys) -> None:
    out_path = tmp_path / "cat.fpatch.safetensors"
    code, out, err = run(["forget", MODEL, "--forget", "tabby cat", "--auto-preserve", "8",
                          "--template", "{}", "--template", "a photo of a {}.", "-o", str(out_path)], capsys)
    assert code == 0, err
    assert "tabby cat" in out and "retained" in out and "closed-form" in out
    patch = read_patch(out_path)
    assert patch.recipe["forget"] == ["tabby cat"] and patch.recipe["preserve_mode"] == "auto:8"
    assert patch.effect["forget"]["tabby cat"]["outranked"]


def test_forget_json_and_compose(tmp_path, capsys) -> None:
    a, b, c = (tmp_path / f"{n}.fpatch.safetensors" for n in "abc")
    common = ["--template", "{}", "--template", "a photo of a {}.", "--json"]
    code, out, err = run(["forget", MODEL, "--forget", "goldfish", "--preserve", "tench,volcano",  # comma form too
                          "--preserve", "pizza", "--rank", "2", "-o", str(a), *common], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["recipe"]["preserve"] == ["tench", "volcano", "pizza"] and report["rank"] == 2
    assert report["effect"]["all_outranked"] and report["patch"] == str(a)
    assert report["effect"]["forget"]["goldfish"]["outranked"]  # the report says what the patch records

    names = tmp_path / "keep.txt"
    names.write_text("# names to keep\ntench\n\ngoldfish\n", encoding="utf-8")
    code, out, err = run(["forget", MODEL, "--forget", "pizza", "--preserve-file", str(names), "-o", str(b), *common], capsys)
    assert code == 0, err

    code, out, err = run(["compose", MODEL, str(a), str(b), "-o", str(c), "--json"], capsys)
    assert code == 0, err
    composed = read_patch(c)
    assert composed.recipe["forget"] == ["goldfish", "pizza"]
    assert set(composed.recipe["preserve"]) == {"tench", "volcano"}  # forgotten names are not preserved
    assert all(e["outranked"] for e in composed.effect["forget"].values())
    code, out, err = run(["compose", MODEL, str(a), str(b), "-o", str(tmp_path / "d.fpatch.safetensors")], capsys)
    assert code == 0 and "forgetpack compose" in out and "forgetpack forget" not in out  # its own report's title


@pytest.mark.parametrize("args,message", [
    (["--forget", ""], "empty forget name"),
    (["--forget", "cat,,dog"], "empty forget name"),
    (["--forget", "cat,cat"], "duplicate forget name"),
    (["--forget", "cat", "--forget", "cat"], "duplicate forget name"),
    (["--forget", "cat", "--preserve", "cat"], "both a forget name and a preserve name"),
    (["--forget", "cat", "--rank", "0"], "rank must be a positive integer"),
    (["--forget", "cat", "--rank", "-3"], "rank must be a positive integer"),
    (["--forget", "cat", "--auto-preserve", "-1"], "--auto-preserve must be ≥ 0"),
    (["--forget", "cat", "--preserve-file", "/no/such/file.txt"], "preserve file not found"),
    (["--forget", "cat", "--preserve", "dog", "--preserve-file", "/no/such/file.txt"], "only one of"),
    (["--forget", "cat", "--preserve", "dog", "--auto-preserve", "3"], "either an explicit preserve list"),
    (["--forget", "cat", "--template", "no placeholder"], "must contain"),
])  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message) -> None:
    out_path = tmp_path / "x.fpatch.safetensors"
    code, out, err = run(["forget", MODEL, *args, "-o", str(out_path)], capsys)
    assert code == 1
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out_path.exists()


def test_bad_files_and_models(tmp_path, capsys) -> None:
    out_path = tmp_path / "x.fpatch.safetensors"
    binary = tmp_path / "names.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81 not text")
    cases = [
        (["forget", MODEL, "--forget", "cat", "--preserve-file", str(binary), "-o", str(out_path)], "not UTF-8 text"),
        (["forget", "NoSuchArch:none", "--forget", "cat", "-o", str(out_path)], "unknown architecture"),
        (["forget", "ViT-B-32", "--forget", "cat", "-o", str(out_path)], "unknown model spec"),
        (["forget", MODEL, "--forget", "cat", "-o", str(tmp_path)], "is a directory"),
        (["forget", MODEL, "--forget", "cat", "-o", str(tmp_path / "missing" / "x.fpatch")], "does not exist"),
        (["compose", MODEL, str(tmp_path / "none.fpatch"), "-o", str(out_path)], "none.fpatch"),
    ]
    for args, message in cases:
        code, out, err = run(args, capsys)
        assert code == 1, args
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not out_path.exists()


def test_non_finite_solver_output_writes_nothing(tmp_path, capsys, monkeypatch) -> None:
    import numpy as np

    from forgetpack.engine.solvers import closed_form

    def broken(problem):
        width, embed = problem.M.shape
        return np.full((width, 1), np.nan), np.ones((1, embed))

    monkeypatch.setattr(closed_form, "solve_closed_form", broken)
    out_path = tmp_path / "x.fpatch.safetensors"
    code, out, err = run(["forget", MODEL, "--forget", "tabby cat", "--template", "{}", "-o", str(out_path)], capsys)
    assert code == 1 and "non-finite" in err and not out_path.exists()


def test_progress_goes_to_stderr_and_never_with_json(monkeypatch, tmp_path, capsys) -> None:
    """The library reports progress through a callback; the CLI draws it, and not with --json."""
    from forgetpack.cli.commands import forget as command

    seen = []

    class Counts:
        def __call__(self, done, total):
            seen.append((done, total))

        def step(self, text, counting=None):
            pass

    class Bar:
        def __init__(self, enabled, *args, **kwargs):
            seen.append(enabled)

        def __enter__(self):
            return Counts() if seen[-1] else None

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(command, "progress_bar", Bar)
    monkeypatch.setenv("FORGETPACK_CACHE", "off")  # nothing cached: every prompt is encoded
    from forgetpack.engine import features

    features.clear_memory_cache()
    out_path = tmp_path / "x.fpatch.safetensors"
    args = ["forget", MODEL, "--forget", "tabby cat", "--auto-preserve", "2", "--template", "{}", "-o", str(out_path)]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert seen[0] is True and seen[1:] and all(0 < done <= total for done, total in seen[1:])
    seen.clear()
    features.clear_memory_cache()
    code, out, err = run([*args, "--json", "--force"], capsys)  # the same output again: replaced only with --force
    assert code == 0 and seen == [False] and json.loads(out)["recipe"]["forget"] == ["tabby cat"]
    features.clear_memory_cache()


def test_help_stays_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys; from forgetpack.cli import main; main(['forget', '--help']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--forget" in out and out.strip().endswith("False")
