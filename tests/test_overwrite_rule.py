"""One overwrite rule for every command that writes (issue 23): an existing output is replaced only
with ``--force``, and an output that is one of the command's own inputs is refused even then.

Every refusal happens before any model is loaded, so these run in seconds even for ``forget``,
``eval``, ``export`` and ``benchmark``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from patch_factory import make_patch, write_base

from forgetpack.cli import main
from forgetpack.format.checkpoint import apply_to_file
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_output_dir, check_output_file
from forgetpack.format.signing import generate_keypair

PRECIOUS = b"precious"


@pytest.fixture()
def files(tmp_path: Path) -> Path:
    """A base, two patches, a checkpoint with the first applied, a key pair, an image folder."""
    base = write_base(tmp_path / "base.safetensors")
    a, b = make_patch(base, 1), make_patch(base, 2, targets=("visual.proj",))
    a.save(tmp_path / "a.fpatch")
    b.save(tmp_path / "b.fpatch")
    apply_to_file(tmp_path / "base.safetensors", [a], tmp_path / "patched.safetensors")
    generate_keypair(tmp_path / "key", tmp_path / "key.pub")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "x.png").write_bytes(b"not really")
    return tmp_path


def one_line_error(capsys, args: list[object]) -> str:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, (args, err)
    return lines[0].removeprefix("error: ")


def _commands(t: Path, out: Path) -> dict[str, list[object]]:
    """Every command that writes, each writing ``out`` (a file; a folder for export and index)."""
    return {
        "forget": ["forget", "mini", "--forget", "seven", "-o", out],
        "compose": ["compose", "mini", t / "a.fpatch", "-o", out],
        "apply": ["apply", t / "base.safetensors", t / "a.fpatch", "-o", out],
        "revert": ["revert", t / "patched.safetensors", t / "a.fpatch", "-o", out],
        "stack": ["stack", t / "a.fpatch", t / "b.fpatch", "-o", out],
        "keygen": ["keygen", "-o", out],
        "sign": ["sign", t / "a.fpatch", "--key", t / "key", "-o", out],
        "eval -o": ["eval", "mini", "--patch", t / "a.fpatch", "-o", out],
        "eval --plot": ["eval", "mini", "--plot", out],
        "benchmark -o": ["benchmark", "paper", "--model", "mini", "-o", out],
        "benchmark --plot": ["benchmark", "paper", "--model", "mini", "--plot", out],
        "rescore": ["rescore", t / "no-index", "--labels", "a,b", "-o", out],
        "export": ["export", "mini", "-o", out],
        "index": ["index", t / "images", "--model", "fake:0", "-o", out],
    }


FOLDER_OUTPUTS = ("export", "index")


@pytest.mark.parametrize("command", list(_commands(Path("."), Path("."))))
def test_an_existing_output_needs_force(files: Path, capsys, command: str) -> None:
    out = files / "existing"
    if command in FOLDER_OUTPUTS:
        out.mkdir()
        (out / "keep.txt").write_bytes(PRECIOUS)
    else:
        out.write_bytes(PRECIOUS)
    line = one_line_error(capsys, _commands(files, out)[command])
    assert line == f"{out} exists: pass --force to replace it"
    assert (out / "keep.txt" if command in FOLDER_OUTPUTS else out).read_bytes() == PRECIOUS


@pytest.mark.parametrize("command", ["apply", "revert", "stack", "keygen", "sign"])
def test_force_replaces_it_atomically(files: Path, capsys, command: str) -> None:
    out = files / "existing"
    out.write_bytes(PRECIOUS)
    assert main([str(a) for a in [*_commands(files, out)[command], "--force"]]) == 0, capsys.readouterr().err
    assert out.read_bytes() != PRECIOUS
    assert not [p.name for p in files.iterdir() if p.name.startswith(".existing")]  # no temporary left


def _inputs(t: Path) -> dict[str, tuple[list[object], Path, str]]:
    """Commands whose output is one of their own inputs: (arguments, the input, how the message names it)."""
    base, a, patched = t / "base.safetensors", t / "a.fpatch", t / "patched.safetensors"
    (t / "export").mkdir()
    (t / "export" / "a.fpatch").write_bytes(a.read_bytes())
    (t / "link.safetensors").symlink_to(base)
    os.link(base, t / "hard.safetensors")
    return {
        "apply onto its base": (["apply", base, a, "-o", base], base, "the base checkpoint"),
        "apply onto a symlink to its base": (["apply", base, a, "-o", t / "link.safetensors"], base, "the base checkpoint"),
        "apply onto a hard link to its base": (["apply", base, a, "-o", t / "hard.safetensors"], base, "the base checkpoint"),
        "apply onto its patch": (["apply", base, a, "-o", a], a, "a patch"),
        "revert in place": (["revert", patched, a, "-o", patched], patched, "the patched checkpoint"),
        "revert onto its base": (["revert", patched, a, "-o", base, "--base", base], base, "the base checkpoint"),
        "stack onto a patch": (["stack", t / "b.fpatch", a, "-o", a], a, "a patch"),
        "sign onto its key": (["sign", a, "--key", t / "key", "-o", t / "key"], t / "key", "the private key"),
        "forget onto its checkpoint": (["forget", f"ViT-B-32:{base}", "--forget", "cat", "-o", base], base, "the model"),
        "compose onto a patch": (["compose", "mini", a, "-o", a], a, "a patch"),
        "eval onto its patch": (["eval", "mini", "--patch", a, "-o", a], a, "a patch"),
        "export over a folder holding its patch": (["export", "mini", "--patch", t / "export" / "a.fpatch", "-o", t / "export"],
                                                   t / "export" / "a.fpatch", "a patch"),
        "index onto its source": (["index", t / "images", "--model", "fake:0", "-o", t / "images"],
                                  t / "images" / "x.png", "the image source"),
    }


@pytest.mark.parametrize("case", [
    "apply onto its base", "apply onto a symlink to its base", "apply onto a hard link to its base", "apply onto its patch",
    "revert in place", "revert onto its base", "stack onto a patch", "sign onto its key", "forget onto its checkpoint",
    "compose onto a patch", "eval onto its patch", "export over a folder holding its patch", "index onto its source",
])
def test_an_output_that_is_an_input_is_refused_even_with_force(files: Path, capsys, case: str) -> None:
    args, source, role = _inputs(files)[case]
    before = source.read_bytes()
    line = one_line_error(capsys, [*args, "--force"])
    assert line == f"{args[args.index('-o') + 1]} is also an input of this command ({role}): write elsewhere"
    assert source.read_bytes() == before


def test_the_rule_is_one_function(tmp_path: Path) -> None:
    """Library writes (caches, ``Patch.save``) still replace; a command's output does not, unless told."""
    out = tmp_path / "out"
    out.write_bytes(PRECIOUS)
    assert check_output_file(out) == out  # the library default: replace
    with pytest.raises(ForgetpackError, match="exists: pass --force"):
        check_output_file(out, replace=False)
    with pytest.raises(ForgetpackError, match=r"is also an input of this command \(the base\)"):
        check_output_file(out, inputs=[("the base", out)])
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"  # an empty folder is free
    with pytest.raises(ForgetpackError, match=r"is also an input of this command \(a patch\)"):
        check_output_dir(tmp_path, replace=True, inputs=[("a patch", out)])  # replacing the folder would remove it


def test_index_force_builds_anew_beside_the_old_one(tmp_path: Path) -> None:
    pytest.importorskip("lancedb")
    from index_fakes import FakeFactory, write_digit

    from runtime.index import IndexStore, build_index

    for digit in range(3):
        write_digit(tmp_path / "a" / f"{digit}.png", digit, digit)
        write_digit(tmp_path / "b" / f"{digit}.png", digit, 10 + digit)
    write_digit(tmp_path / "b" / "9.png", 9, 99)
    index = tmp_path / "idx"
    assert build_index(tmp_path / "a", index, FakeFactory()).rows == 3
    with pytest.raises(ForgetpackError, match="already there"):
        build_index(tmp_path / "b", index, FakeFactory())
    with pytest.raises(ForgetpackError, match="only one of"):
        build_index(tmp_path / "b", index, FakeFactory(), resume=True, force=True)
    report = build_index(tmp_path / "b", index, FakeFactory(), force=True)
    assert report.index == str(index) and report.rows == 4 and IndexStore.open(index).count() == 4
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".forgetpack-lock"))  # the writer lock stays
    assert left == ["a", "b", "idx"]  # the old index is gone, no temporary left
