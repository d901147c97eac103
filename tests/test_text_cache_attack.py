"""Attacks on the runtime's text-feature cache on disk (runtime/text_cache.py).

C1 a shard planted or edited in the cache folder must not change what the runtime answers;
C2 a FIFO named like a shard must not hang a reader; C3 eviction must not follow a link out of
the cache; C4 junk files must not be listed or opened again on every call.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from forgetpack.format.fileio import RawTensor, save_safetensors
from runtime import text_cache
from runtime.text_cache import TextFeatureCache

EXPORT = "sha256:" + "ab" * 32
WIDTH = 16
ROWS = {"one": np.full(WIDTH, 1, np.float32), "seven": np.full(WIDTH, 7, np.float32)}


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(text_cache, "_refused", set(), raising=False)  # "one warning per process": per test here


def _plant(path, prompts, feats, export_id=EXPORT, **extra) -> None:
    """A shard as an attacker writes it: the export id copied, any name, any features."""
    meta = {"export_id": export_id, "prompts": json.dumps(list(prompts)), "version": text_cache.VERSION, **extra}
    save_safetensors(path, {"features": RawTensor.from_array(np.asarray(feats, np.float32))}, meta)


def _name(prompts, export_id=EXPORT) -> str:
    """The file name a shard of ``prompts`` has (any shard-like name where keys are not names)."""
    key = getattr(text_cache, "shard_name", None)
    return key(export_id, prompts) if key else "0" * 32 + ".safetensors"


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "runtime.text_cache" and r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------- C1 planted and edited shards


def test_a_planted_shard_with_the_copied_export_id_is_not_used(tmp_path, caplog):
    folder = TextFeatureCache(EXPORT, WIDTH, root=tmp_path).folder
    folder.mkdir(parents=True, mode=0o700)
    _plant(folder / "planted.safetensors", ["seven"], ROWS["one"][None])  # any name: ignored, not opened
    keyed = folder / _name(["seven"])  # the right name, but no checksum
    _plant(keyed, ["seven"], ROWS["one"][None])
    forged = folder / _name(["one"])  # a checksum of other features
    _plant(forged, ["one"], ROWS["seven"][None], sha256=text_cache.checksum(forged.name, ROWS["one"].tobytes()))
    cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    with caplog.at_level(logging.WARNING):
        assert cache.get(["seven", "one"]) == {}
    assert len(_warnings(caplog)) == 2 and not keyed.exists() and not forged.exists()  # a miss, a warning, removed
    cache.put(ROWS)  # encoded again, and from now on found
    found = TextFeatureCache(EXPORT, WIDTH, root=tmp_path).get(["seven", "one"])
    assert set(found) == {"seven", "one"} and all(np.array_equal(found[p], ROWS[p]) for p in ROWS)


def test_an_edited_shard_is_a_miss_logged_and_encoded_again(tmp_path, caplog):
    TextFeatureCache(EXPORT, WIDTH, root=tmp_path).put(ROWS)
    cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    (shard,) = cache.folder.glob("*.safetensors")
    data = bytearray(shard.read_bytes())
    data[-4 * WIDTH :] = ROWS["one"].tobytes()  # "seven" (the last row) now reads as "one": same size, same header
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert cache.get(["seven"]) == {}
    assert any("checksum" in m for m in _warnings(caplog)) and not shard.exists()


def test_a_planted_shard_does_not_change_what_the_runtime_answers(tmp_path, monkeypatch):
    """The finding: with "seven" planted as "one"'s features, a seven was classified "one"."""
    import runtime
    from forgetpack.engine.models import load_model
    from forgetpack.export import export_loaded
    from forgetpack.format.manifest import Manifest

    monkeypatch.setenv("FORGETPACK_CACHE", "off")
    manifest = export_loaded(load_model("mini"), tmp_path / "mini", towers=("text",))
    backend = runtime.load(tmp_path / "mini", threads=1).backend
    truth = backend.text_features(["one", "seven"])
    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "cache"))
    folder = TextFeatureCache(manifest.export_id, truth.shape[1]).folder
    folder.mkdir(parents=True, mode=0o700)
    assert Manifest.read(tmp_path / "mini").export_id == manifest.export_id  # the id an attacker reads
    _plant(folder / "0123456789abcdef01234567.safetensors", ["seven"], truth[:1], export_id=manifest.export_id)
    _plant(folder / _name(["seven"], manifest.export_id), ["seven"], truth[:1], export_id=manifest.export_id)
    got = runtime.load(tmp_path / "mini", threads=1).backend.text_features(["seven", "one"])
    assert np.array_equal(got, truth[::-1])


def _owned_by_another_user(folder, monkeypatch):
    if os.getuid() == 0:
        os.chown(folder, 4242, -1)
    else:
        uid = os.getuid()
        monkeypatch.setattr(os, "getuid", lambda: uid + 1)


@pytest.mark.parametrize("how", ["group-writable", "world-writable", "another owner", "parent group-writable", "a link"])
def test_a_cache_folder_others_can_change_turns_the_cache_off(tmp_path, monkeypatch, caplog, how):
    """A forger who can write the folder can compute a valid checksum: the folder is the boundary."""
    writer = TextFeatureCache(EXPORT, WIDTH, root=tmp_path / "root")
    writer.put(ROWS)  # valid shards, as a forger could write them
    folder = writer.folder
    if how == "group-writable":
        folder.chmod(0o770)
    elif how == "world-writable":
        folder.chmod(0o707)
    elif how == "parent group-writable":
        folder.parent.chmod(0o770)
    elif how == "a link":
        real = tmp_path / "elsewhere"
        folder.rename(real)
        folder.symlink_to(real)
    else:
        _owned_by_another_user(folder, monkeypatch)
    with caplog.at_level(logging.WARNING):
        cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path / "root")
        again = TextFeatureCache(EXPORT, WIDTH, root=tmp_path / "root")
        assert not cache.enabled and not again.enabled
        assert cache.get(list(ROWS)) == {}
        before = sorted(p.name for p in (tmp_path / "root").rglob("*"))
        cache.put({"new": ROWS["one"]})
        assert sorted(p.name for p in (tmp_path / "root").rglob("*")) == before  # nothing written
    assert len(_warnings(caplog)) == 1 and "off" in _warnings(caplog)[0]  # one warning per process


def test_a_folder_made_unsafe_after_opening_turns_the_cache_off(tmp_path, caplog):
    cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    cache.put(ROWS)
    assert set(cache.get(list(ROWS))) == set(ROWS)
    cache.folder.rename(tmp_path / "moved")  # replaced by a folder others can write
    cache.folder.mkdir(mode=0o777)
    cache.folder.chmod(0o777)
    with caplog.at_level(logging.WARNING):
        assert cache.get(list(ROWS)) == {} and not cache.enabled
    assert len(_warnings(caplog)) == 1


def test_the_cache_makes_its_folders_private(tmp_path):
    old = os.umask(0o002)  # a group-writable umask must not make the cache refuse its own folders
    try:
        cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path / "root")
        cache.put(ROWS)
    finally:
        os.umask(old)
    for folder in (cache.folder, cache.folder.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert set(TextFeatureCache(EXPORT, WIDTH, root=tmp_path / "root").get(list(ROWS))) == set(ROWS)


# ---------------------------------------------------------------------------- C2 a FIFO named like a shard


def test_a_fifo_named_like_a_shard_does_not_hang_a_reader(tmp_path):
    writer = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    writer.put(ROWS)
    fifos = [writer.folder / "x.safetensors", writer.folder / _name(["cat"])]
    for fifo in fifos:
        os.mkfifo(fifo)
    script = ("import json, sys; from runtime.text_cache import TextFeatureCache; "
              f"print(json.dumps(sorted(TextFeatureCache({EXPORT!r}, {WIDTH}, root={str(tmp_path)!r}).get(['cat', 'one']))))")
    try:  # in another process: a reader blocked in open() may hold the interpreter's lock
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                              cwd=Path(__file__).resolve().parents[1])
    except subprocess.TimeoutExpired:
        pytest.fail("a FIFO in the cache folder blocked the reader")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["one"] and all(stat.S_ISFIFO(os.lstat(f).st_mode) for f in fifos)


# ---------------------------------------------------------------------------- C3 eviction and links


def test_eviction_never_follows_a_link_out_of_the_cache(tmp_path):
    outside = tmp_path / "models"
    outside.mkdir()
    model = outside / "model.safetensors"
    model.write_bytes(b"\0" * 20_000)  # the user's model, far over the cache's bound
    keyed = outside / _name(["x"])
    keyed.write_bytes(b"\0" * 20_000)
    root = tmp_path / "runtime-text"
    root.mkdir(mode=0o700)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    cache = TextFeatureCache(EXPORT, WIDTH, max_bytes=100, root=root)
    cache.put(ROWS)
    (cache.folder / ("0" * 32 + ".safetensors")).symlink_to(model)  # a linked file inside the export folder
    cache.put({"more": ROWS["one"]})
    assert model.stat().st_size == 20_000 and keyed.stat().st_size == 20_000
    removed = text_cache.evict(root, 0)
    assert all(p.parent == cache.folder and not p.is_symlink() for p in removed)
    assert model.exists() and keyed.exists() and (cache.folder / ("0" * 32 + ".safetensors")).is_symlink()


# ---------------------------------------------------------------------------- C4 junk files


def test_junk_files_are_not_listed_or_opened_on_every_call(tmp_path, monkeypatch):
    writer = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    writer.put(ROWS)
    folder = writer.folder
    for i in range(3000):
        (folder / f"junk-{i}.safetensors").write_bytes(b"junk")
    past = time.time_ns() - 60 * 10**9
    os.utime(folder, ns=(past, past))  # settled: not changed within a timestamp tick of the listing
    cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    opened, listed = [], []
    real_open, real_scandir = os.open, os.scandir
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    monkeypatch.setattr(os, "scandir", lambda *a: listed.append(a) or real_scandir(*a))
    assert set(cache.get(list(ROWS))) == set(ROWS)  # the first call lists the folder once
    assert not any(os.path.basename(p).startswith("junk-") for p in opened)
    listed.clear()
    start = time.perf_counter()
    for _ in range(20):
        assert set(cache.get(list(ROWS))) == set(ROWS)
    elapsed = time.perf_counter() - start
    assert listed == [] and not any(os.path.basename(p).startswith("junk-") for p in opened)  # a lookup is a stat of the folder
    assert elapsed < 2.0, f"20 lookups took {elapsed:.2f}s"


def test_a_changed_folder_is_listed_again_but_junk_is_never_opened(tmp_path, monkeypatch):
    writer = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    cache = TextFeatureCache(EXPORT, WIDTH, root=tmp_path)
    writer.put({"one": ROWS["one"]})
    assert set(cache.get(list(ROWS))) == {"one"}
    for i in range(50):
        (writer.folder / f"junk-{i}.safetensors").write_bytes(b"junk")
    bad = writer.folder / _name(["junk"])
    bad.write_bytes(b"junk named like a shard")
    writer.put({"seven": ROWS["seven"]})  # another process's write is seen by a long-running one
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda path, *a, **k: opened.append(str(path)) or real_open(path, *a, **k))
    assert set(cache.get(list(ROWS))) == set(ROWS)
    assert set(cache.get(list(ROWS))) == set(ROWS)
    assert not any(os.path.basename(p).startswith("junk-") for p in opened) and opened.count(bad.name) <= 1


# ---------------------------------------------------------------------------- every other cache: one rule


@pytest.mark.parametrize("kind", ["features", "image-embeddings", "warm-models", "training-data"])
def test_every_cache_folder_is_private_and_refused_when_others_can_write(tmp_path, monkeypatch, caplog, kind) -> None:
    from forgetpack.format import cache

    monkeypatch.setenv("FORGETPACK_CACHE", str(tmp_path / "root"))
    folder = cache.cache_dir(kind)
    assert folder == tmp_path / "root" / kind and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)
    with caplog.at_level("WARNING", logger="forgetpack.format.cache"):
        assert cache.cache_dir(kind) is None  # that cache is off, not trusted
    assert "writable by others" in caplog.text and kind in caplog.text
