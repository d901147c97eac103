"""Findings of an attack on the index (runtime/index), each with the test that failed before its fix.

I1 two builders on one index; I2 damaged Lance files; I3 resuming with another export of the same
tower (int8); I4 a giant file named .png read whole. The numpy digit backend of
tests/index_fakes.py stands in for a model (its ``precision`` variant carries an export-like manifest).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from index_fakes import DIGITS, FakeFactory, write_digit

from forgetpack.format.errors import ForgetpackError
from runtime.index import IndexStore, build_index, rescore, search, verify_index
from runtime.index.sources import MAX_IMAGE_BYTES, Item

TESTS = Path(__file__).resolve().parent
FP32 = FakeFactory(precision="fp32")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits")
    for digit in range(10):
        for j in range(6):
            write_digit(root / f"d{digit}" / f"{j}.png", digit, 100 * digit + j)
    return root


@pytest.fixture(scope="module")
def pristine(digits, tmp_path_factory) -> Path:
    index = tmp_path_factory.mktemp("pristine") / "idx"
    build_index(digits, index, FP32, shard_size=16)
    return index


@pytest.fixture
def copy(pristine, tmp_path) -> Path:
    """A copy of a sound index, to damage."""
    index = tmp_path / "idx"
    shutil.copytree(pristine, index)
    return index


def _child(script: str) -> list[str]:
    """A Python process that runs the CLI with the fake model (``runtime.load`` patched)."""
    return [sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(TESTS)!r})
        import runtime
        from index_fakes import FakeFactory
        runtime.load = lambda source, **options: FakeFactory(int(str(source).split(":")[1]))()
        from runtime.index.store import IndexStore
        from forgetpack.cli import main

        def slow_commits(seconds):  # each shard's commit takes ``seconds`` more: a build that lasts
            real = IndexStore.commit_shard
            def commit(self, *args, **kwargs):
                real(self, *args, **kwargs)
                time.sleep(seconds)
            IndexStore.commit_shard = commit
    """) + textwrap.dedent(script)]


# ---------------------------------------------------------------------------- I1: one writer at a time


def test_i1_a_second_builder_fails_at_once_while_the_first_writes(digits, tmp_path, monkeypatch, capsys) -> None:
    import runtime
    from forgetpack.cli import main

    index = tmp_path / "idx"
    first = subprocess.Popen(_child(f"""
        slow_commits(1.0)
        sys.exit(main(["index", {str(digits)!r}, "--model", "fake:0", "-o", {str(index)!r}, "--shard-size", "8"]))
    """), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and first.poll() is None:
            if (index / "embeddings.lance").is_dir() and IndexStore.open(index).done_shards():
                break
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read().decode()[-2000:]
        monkeypatch.setattr(runtime, "load", lambda source, **options: FakeFactory(int(str(source).split(":")[1]))())
        assert main(["index", str(digits), "--model", "fake:0", "-o", str(index), "--shard-size", "8", "--resume"]) == 1
        err = capsys.readouterr().err.strip()
        assert "another build is writing to this index" in err and str(index) in err and "\n" not in err
        with pytest.raises(ForgetpackError, match="another build is writing"):
            build_index(digits, index, FakeFactory(), shard_size=8, resume=True)
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    report = verify_index(index)
    assert (report.rows, report.shards, report.damaged) == (60, 8, False)
    again = build_index(digits, index, FakeFactory(), shard_size=8, resume=True)  # the lock is free again
    assert (again.added, again.rows) == (0, 60)


def test_i1_two_processes_creating_one_index_one_wins_the_other_says_so(digits, tmp_path) -> None:
    index, go = tmp_path / "idx", tmp_path / "go"
    children = []
    for n in range(2):
        children.append(subprocess.Popen(_child(f"""
            slow_commits(0.5)
            Path({str(tmp_path)!r}, "ready{n}").touch()
            deadline = time.monotonic() + 60
            while not Path({str(go)!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            sys.exit(main(["index", {str(digits)!r}, "--model", "fake:0", "-o", {str(index)!r}, "--shard-size", "16"]))
        """), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready{n}").exists() for n in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        go.touch()
        codes = [c.wait(timeout=120) for c in children]
        errors = [c.stderr.read().decode().strip() for c in children]
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()
                c.wait()
    assert sorted(codes) == [0, 1], errors
    loser = errors[codes.index(1)]
    assert "Traceback" not in loser and "\n" not in loser and "another build is writing to this index" in loser, loser
    assert IndexStore.open(index).count() == 60 and not verify_index(index).damaged


# ---------------------------------------------------------------------------- I2: damage named, never served


def _data(index: Path, table: str = "embeddings") -> list[Path]:
    return sorted((index / f"{table}.lance" / "data").iterdir())


def _latest_manifest(index: Path, table: str = "embeddings") -> Path:
    return sorted((index / f"{table}.lance" / "_versions").glob("*.manifest"))[0]  # versions count down


def _truncate(path: Path, size: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 if size is None else size])


DAMAGE = {
    "truncated data file": lambda index: _truncate(_data(index)[0]),
    "missing data file": lambda index: _data(index)[0].unlink(),
    "truncated manifest": lambda index: _truncate(_latest_manifest(index)),
    "empty ledger": lambda index: [_truncate(p, 0) for p in _data(index, "shards")],
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_i2_damaged_lance_files_are_one_line_naming_the_index(copy, digits, damage, monkeypatch, capsys) -> None:
    import runtime
    from forgetpack.cli import main

    DAMAGE[damage](copy)
    model = FP32()
    for attempt in (lambda: rescore(copy, DIGITS, model=model), lambda: search(copy, "seven", model=model),
                    lambda: verify_index(copy), lambda: build_index(digits, copy, FP32, shard_size=16, resume=True)):
        with pytest.raises(ForgetpackError, match="damaged") as caught:
            attempt()
        assert str(copy) in str(caught.value) and "\n" not in str(caught.value) and ".rs:" not in str(caught.value)
    monkeypatch.setattr(runtime, "load", lambda source, **options: FP32())
    assert main(["rescore", str(copy), "--labels", "one,two"]) == 1
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and str(copy) in err and "\n" not in err and "Traceback" not in err
    assert main(["index", "--verify", str(copy)]) == 1
    assert "damaged" in capsys.readouterr().err


def _stored(index: Path, row: int = 0) -> tuple[str, np.ndarray]:
    found = IndexStore.open(index).table.to_arrow().to_pylist()[row]
    return found["path"], np.asarray(found["embedding"], np.float32)


def _overwrite_in_place(index: Path, old: bytes, new: bytes) -> None:
    """Change a stored embedding's bytes in its data file, as a disk would (no Lance commit)."""
    for path in _data(index):
        data = path.read_bytes()
        if data.count(old) == 1:
            path.write_bytes(data.replace(old, new))
            return
    raise AssertionError("the embedding's bytes were not found in one data file")


def test_i2_a_zeroed_embedding_is_refused_by_readers_and_verify(copy, monkeypatch, capsys) -> None:
    import runtime
    from forgetpack.cli import main

    path, embedding = _stored(copy)
    _overwrite_in_place(copy, embedding.tobytes(), np.zeros_like(embedding).tobytes())
    IndexStore.open(copy)  # the cheap check on open cannot see it: the rows are all there
    with pytest.raises(ForgetpackError, match="damaged: 1 stored embedding.* not unit vectors"):
        rescore(copy, DIGITS, model=FP32())
    report = verify_index(copy)
    assert report.damaged and report.not_unit == 1 and report.examples[0].startswith(f"{path}: embedding norm 0")
    monkeypatch.setattr(runtime, "load", lambda source, **options: FP32())
    assert main(["index", "--verify", str(copy), "--json"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["not_unit"] == 1 and err.count("\n") == 1 and "not unit vectors" in err


def test_i2_a_flipped_bit_is_found_by_verify_through_the_shard_digest(copy, capsys) -> None:
    from forgetpack.cli import main

    _, embedding = _stored(copy, 5)
    flipped = embedding.copy()
    flipped.view(np.uint32)[3] ^= 1  # the lowest mantissa bit: the norm does not show it
    _overwrite_in_place(copy, embedding.tobytes(), flipped.tobytes())
    report = verify_index(copy)
    assert (report.not_unit, report.digest_mismatch, report.damaged) == (0, 1, True)
    assert main(["index", "--verify", str(copy)]) == 1
    assert "differ from their recorded digest" in capsys.readouterr().err


def test_i2_verify_passes_a_sound_index_and_the_open_check_sees_lost_rows(pristine, copy, capsys) -> None:
    from forgetpack.cli import main

    report = verify_index(pristine)
    assert (report.rows, report.shards, report.damaged, report.digests) == (60, 4, False, True)
    assert main(["index", "--verify", str(pristine)]) == 0
    assert "no damage found" in capsys.readouterr().out
    store = IndexStore.open(copy)
    store.table.delete("path LIKE '%/d3/%'")  # rows gone, their shards still in the ledger
    with pytest.raises(ForgetpackError, match="54 embeddings stored, 60 committed by its ledger"):
        IndexStore.open(copy)


# ---------------------------------------------------------------------------- I3: the whole image tower on resume


def test_i3_resume_refuses_the_int8_export_of_the_same_model(digits, tmp_path) -> None:
    index = tmp_path / "idx"
    first = sorted(digits.glob("d[0-4]"))
    part = tmp_path / "part"
    for folder in first:
        shutil.copytree(folder, part / folder.name)
    build_index(part, index, FP32, shard_size=16)
    int8 = FakeFactory(precision="int8")
    assert not np.array_equal(int8().encode_image([digits / "d7/0.png"]), FP32().encode_image([digits / "d7/0.png"]))
    with pytest.raises(ForgetpackError, match="another export of the image tower .*fp32.*int8") as caught:
        build_index(digits, index, int8, shard_size=16, resume=True)
    assert "\n" not in str(caught.value) and str(index) in str(caught.value)
    assert IndexStore.open(index).count() == 30  # nothing added
    assert build_index(digits, index, FP32, shard_size=16, resume=True).rows == 60  # the same export goes on
    # reading needs only the same image projection: rescoring with the int8 export's text side is allowed
    assert rescore(index, DIGITS, model=int8()).rows == 60


# ---------------------------------------------------------------------------- I4: size before reading


def test_i4_a_giant_sparse_png_is_refused_from_its_size_before_a_read(tmp_path, monkeypatch) -> None:
    giant = tmp_path / "giant.png"
    with open(giant, "wb") as handle:  # sparse: no disk, 1 GiB by stat
        handle.truncate(1 << 30)
    import builtins

    real_open = builtins.open

    def guarded(file, mode="r", *args, **kwargs):
        assert not (str(file) == str(giant) and "r" in mode), "the giant file was opened for reading"
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded)
    with pytest.raises(ForgetpackError, match=f"giant.png: 1,073,741,824 bytes is over the limit of {MAX_IMAGE_BYTES:,}"):
        Item(str(giant)).read()
    monkeypatch.undo()
    write_digit(tmp_path / "ok.png", 3, 1)
    report = build_index(tmp_path, tmp_path / "idx", FakeFactory())
    assert report.added == 1 and report.failures[0][0] == str(giant) and "over the limit" in report.failures[0][1]
    with pytest.raises(ForgetpackError, match="over the limit"):
        Item("table.parquet#0", b"\0" * (MAX_IMAGE_BYTES + 1)).read()
    assert os.path.getsize(giant) == 1 << 30


def test_i2_an_index_made_before_digests_is_verified_on_norms_and_still_grows(digits, tmp_path, monkeypatch) -> None:
    import pyarrow as pa

    from runtime.index import store

    new_schema = store._ledger_schema
    monkeypatch.setattr(store, "_ledger_schema", lambda: pa.schema([f for f in new_schema() if f.name != "digest"]))
    index, half = tmp_path / "idx", tmp_path / "half"
    shutil.copytree(digits / "d1", half / "d1")
    build_index(half, index, FP32, shard_size=16)
    monkeypatch.undo()
    assert "digest" not in IndexStore.open(index).ledger.schema.names
    assert build_index(digits, index, FP32, shard_size=16, resume=True).rows == 60
    report = verify_index(index)
    assert (report.rows, report.digests, report.damaged) == (60, False, False)


def test_l4_column_on_a_folder_or_a_path_list_is_refused(tmp_path) -> None:
    """``--column`` was silently ignored for a folder source (issue 24, L4)."""
    from runtime.index.sources import list_items

    folder = tmp_path / "imgs"
    folder.mkdir()
    listing = tmp_path / "paths.txt"
    listing.write_text("")
    for source, kind in ((folder, "folder"), (listing, "list of paths")):
        with pytest.raises(ForgetpackError, match=f"--column names a column of a .parquet/.csv source; this is a {kind}"):
            list_items(source, column="image")
    assert list_items(folder) == []  # without --column a folder still lists
