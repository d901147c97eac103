"""The embedding index (runtime/index): sources, sharded resumable builds, rescore and search under patches.

Most tests use the numpy digit backend of tests/index_fakes.py behind the real ``runtime.Model``
facade (seconds, no export needed); the last ones run the same checks on ``mini``'s ONNX export
and its held-out real digits, with a patch made by the engine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from index_fakes import DIGITS, FakeFactory, forget, write_digit

from forgetpack.format.errors import ForgetpackError, PatchError
from runtime.index import IndexStore, build_index, rescore, search
from runtime.index.sources import content_hash, list_items

TEMPLATE = "a photo of the number {}."
PER_DIGIT = 6
TESTS = Path(__file__).resolve().parent


def digit_folder(root: Path) -> Path:
    """60 digit images in nested folders, one unreadable file, one duplicate under another name."""
    for digit in range(10):
        for j in range(PER_DIGIT):
            write_digit(root / f"d{digit}" / "nested" / f"{j}.png", digit, 100 * digit + j)
    (root / "broken.png").write_bytes(b"this is not an image")
    (root / "notes.txt").write_text("not an image, not listed")
    shutil.copy(root / "d3" / "nested" / "0.png", root / "d3" / "copy.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return digit_folder(tmp_path_factory.mktemp("digits"))


@pytest.fixture(scope="module")
def built(folder, tmp_path_factory):
    index = tmp_path_factory.mktemp("built") / "idx"
    return index, build_index(folder, index, FakeFactory(), shard_size=8, batch=4)


@pytest.fixture(scope="module")
def model():
    return FakeFactory()()


def test_sources_folder_list_and_tables(folder, tmp_path) -> None:
    items = list_items(folder)
    assert len(items) == 10 * PER_DIGIT + 2 and [i.key for i in items] == sorted(i.key for i in items)
    assert not any(i.key.endswith(".txt") for i in items)
    listing = tmp_path / "paths.txt"
    listing.write_text(f"# two images\n{folder}/d1/nested/0.png\n\n{os.path.relpath(folder / 'd2/nested/1.png', tmp_path)}\n")
    assert [Path(i.key).resolve() for i in list_items(listing)] == [folder / "d1/nested/0.png", (folder / "d2/nested/1.png").resolve()]
    data = (folder / "d4/nested/0.png").read_bytes()
    pq.write_table(pa.table({"image": [data, data], "label": [4, 4]}), tmp_path / "bytes.parquet")
    from_bytes = list_items(tmp_path / "bytes.parquet")
    assert [i.key for i in from_bytes] == [f"{tmp_path}/bytes.parquet#0", f"{tmp_path}/bytes.parquet#1"] and from_bytes[0].read() == data
    (tmp_path / "paths.csv").write_text(f"path,label\n{folder}/d5/nested/0.png,5\n")
    assert [i.key for i in list_items(tmp_path / "paths.csv")] == [f"{folder}/d5/nested/0.png"]
    with pytest.raises(ForgetpackError, match="no image column"):
        list_items(_csv(tmp_path, "x,y\n1,2\n"))
    with pytest.raises(ForgetpackError, match="not an image source"):
        list_items(folder / "d1/nested/0.png")


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "other.csv"
    path.write_text(text)
    return path


def test_build_stores_each_image_once_and_lists_the_unreadable(built, folder, model) -> None:
    index, report = built
    assert (report.added, report.duplicates, report.failed, report.rows) == (60, 1, 1, 60)
    assert report.failures[0][0] == str(folder / "broken.png") and "cannot decode image" in report.failures[0][1]
    store = IndexStore.open(index)
    assert store.meta["model"] == "fake:0" and store.meta["image_fingerprint"].startswith("sha256:")
    rows = store.table.to_arrow().to_pylist()
    assert len({r["content_hash"] for r in rows}) == 60
    for row in rows[:12]:  # each stored embedding is what the runtime gives for that file
        assert row["content_hash"] == content_hash(Path(row["path"]).read_bytes())
        # stored from a batch of 32, encoded here alone: GEMM kernels may round the last bit differently by batch size
        np.testing.assert_allclose(np.asarray(row["embedding"], np.float32), model.encode_image(row["path"])[0], rtol=0, atol=1e-6)
    assert store.failures() == report.failures
    with pytest.raises(ForgetpackError, match="already there .*--resume"):
        build_index(folder, index, FakeFactory())


def test_reindexing_adds_nothing_twice(built, folder, tmp_path) -> None:
    index, _ = built
    again = build_index(folder, index, FakeFactory(), shard_size=8, batch=4, resume=True)
    assert (again.shards_skipped, again.shards_committed, again.added, again.rows) == (8, 0, 0, 60)
    copies = tmp_path / "copies"  # the same images under other names and another shard layout
    shutil.copytree(folder / "d7", copies)
    other = build_index(copies, index, FakeFactory(), shard_size=4, resume=True)
    assert (other.added, other.duplicates, other.rows) == (0, PER_DIGIT, 60)


def test_resume_after_a_kill_recomputes_nothing_finished(folder, tmp_path) -> None:
    index = tmp_path / "idx"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from index_fakes import FakeFactory
        from runtime.index import build_index
        build_index({str(folder)!r}, {str(index)!r}, FakeFactory(), shard_size=8, batch=4,
                    progress=lambda p: time.sleep(1.0))
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            if (index / "shards.lance").is_dir() and (index / "embeddings.lance").is_dir() and len(IndexStore.open(index).done_shards()) >= 2:
                break
            time.sleep(0.2)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        if child.poll() is None:
            child.kill()
    before = IndexStore.open(index)
    finished = before.done_shards()
    assert 2 <= len(finished) < 8
    kept = {r["content_hash"]: r["embedding"] for r in before.table.to_arrow().to_pylist() if r["shard"] in finished}

    factory = FakeFactory()
    session = factory()
    report = build_index(folder, index, lambda: session, shard_size=8, batch=4, resume=True)
    assert report.shards_skipped == len(finished) and report.shards_committed == 8 - len(finished)
    assert session.backend.images_encoded == 60 - len(kept)  # each image not yet stored, once; none stored before
    after = IndexStore.open(index)
    assert after.count() == 60 and len(after.done_shards()) == 8
    assert {k: after.done_shards()[k]["run"] for k in finished} == {k: r["run"] for k, r in finished.items()}
    rows = {r["content_hash"]: r["embedding"] for r in after.table.to_arrow().to_pylist()}
    assert all(rows[h] == e for h, e in kept.items())  # nothing finished was rewritten or lost


def test_a_half_committed_shard_is_redone(folder, tmp_path) -> None:
    index = tmp_path / "idx"
    build_index(folder, index, FakeFactory(), shard_size=16)
    store = IndexStore.open(index)
    last = max(store.done_shards().values(), key=lambda r: r["ordinal"])
    store.ledger.delete(f"shard = '{last['shard']}'")  # as if killed between the rows' commit and the ledger's
    report = build_index(folder, index, FakeFactory(), shard_size=16, resume=True)
    assert (report.repaired, report.shards_committed, report.rows) == (1, 1, 60)


def test_rescore_equals_classify_image_by_image(built, model, tmp_path) -> None:
    index, _ = built
    patch = forget(model, "seven")
    out = tmp_path / "scores.parquet"
    report = rescore(index, DIGITS, [TEMPLATE], [patch], model=model, out=out, compare=True, chunk_rows=7)
    assert report.rows == 60 and report.counts["seven"] == 0 and report.base_counts["seven"] == PER_DIGIT
    assert report.changed == PER_DIGIT and sum(report.moved["seven"].values()) == PER_DIGIT
    table = pq.read_table(out).to_pylist()
    model.set_patches([patch])
    predictions = model.classify([r["path"] for r in table], DIGITS, [TEMPLATE])
    assert [r["label"] for r in table] == [p.label for p in predictions]
    np.testing.assert_allclose([r["score"] for r in table], [p.score for p in predictions], rtol=1e-5, atol=1e-6)
    model.set_patches([])
    assert [r["base_label"] for r in table] == [p.label for p in model.classify([r["path"] for r in table], DIGITS, [TEMPLATE])]


def test_search_forgets_sevens(built, model) -> None:
    index, _ = built
    before = search(index, "seven", k=10, model=model)
    assert sum("/d7/" in h.path for h in before.hits) == PER_DIGIT and before.hits[0].score >= before.hits[-1].score
    after = search(index, "seven", k=10, model=model, patches=[forget(model, "seven", "{}")])
    assert not any("/d7/" in h.path for h in after.hits)


def test_refusals_for_another_tower_or_base(built, tmp_path) -> None:
    index, _ = built
    other = FakeFactory(seed=1)()
    with pytest.raises(ForgetpackError, match="another image tower"):
        rescore(index, DIGITS, model=other)
    with pytest.raises(ForgetpackError, match="another image tower"):
        build_index(tmp_path, index, FakeFactory(seed=1), resume=True)
    foreign = forget(other, "seven")
    with pytest.raises(PatchError, match="made for a different base"):
        search(index, "seven", model=FakeFactory()(), patches=[foreign])
    with pytest.raises(ForgetpackError, match="not an index"):
        rescore(tmp_path, DIGITS, model=other)


def test_cli_index_rescore_search_json(folder, tmp_path, capsys, monkeypatch) -> None:
    import runtime
    from forgetpack.cli import main

    monkeypatch.setattr(runtime, "load", lambda source, **options: FakeFactory(int(str(source).split(":")[1]))())
    index = tmp_path / "idx"
    assert main(["index", str(folder), "--model", "fake:0", "-o", str(index), "--shard-size", "16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["added"], report["failed"], report["shards"]["committed"]) == (60, 1, 4)
    patch = tmp_path / "seven.fpatch.safetensors"
    forget(FakeFactory()(), "seven").save(patch)
    assert main(["rescore", str(index), "--labels", ",".join(DIGITS), "--template", TEMPLATE, "--patch", str(patch),
                 "--compare", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["counts"]["seven"] == 0 and scores["changed"] == PER_DIGIT
    assert main(["search", str(index), "seven", "-k", "3", "--json"]) == 0
    assert all("/d7/" in h["path"] for h in json.loads(capsys.readouterr().out)["hits"])
    assert main(["rescore", str(index), "--labels", "one,two", "--model", "fake:1"]) == 1
    assert "another image tower" in capsys.readouterr().err


# ---------------------------------------------------------------------------- mini, its export and real digits


@pytest.fixture(scope="module")
def mini_index(tmp_path_factory):
    """mini's ONNX export, 100 held-out MNIST digits (10 per class) as PNG files, their index, and an engine patch."""
    pytest.importorskip("torch")  # the export and the engine need torch (CI has it)
    from test_runtime import cached_export

    from forgetpack.cli import main
    from forgetpack.evaluation.datasets import load_dataset

    export_dir = cached_export(tmp_path_factory, "mini")
    data = load_dataset("mnist")
    root = tmp_path_factory.mktemp("mnist")
    taken = dict.fromkeys(range(10), 0)
    for i, label in enumerate(data.labels):
        if taken[int(label)] < 10:
            data.images[i].save(root / f"{data.classnames[label]}-{i}.png")
            taken[int(label)] += 1
    index = root / "idx"
    build_index(root, index, export_dir, shard_size=64, threads=2)
    patch = root / "seven.fpatch.safetensors"
    assert main(["forget", "mini", "--forget", "seven", "--template", "{}", "--template", TEMPLATE, "-o", str(patch)]) == 0
    return export_dir, root, index, patch


@pytest.mark.slow
def test_mini_rescore_equals_classify_with_the_patch(mini_index, tmp_path) -> None:
    import runtime

    export_dir, _, index, patch = mini_index
    out = tmp_path / "scores.parquet"
    report = rescore(index, DIGITS, [TEMPLATE], [patch], out=out, compare=True)
    assert report.rows == 100 and report.changed > 0
    table = pq.read_table(out).to_pylist()
    model = runtime.load(export_dir, threads=2)
    model.apply_patch(patch)
    predictions = model.classify([r["path"] for r in table], DIGITS, [TEMPLATE])
    assert [r["label"] for r in table] == [p.label for p in predictions]
    np.testing.assert_allclose([r["score"] for r in table], [p.score for p in predictions], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_mini_search_seven_forgets_sevens(mini_index) -> None:
    _, _, index, patch = mini_index
    before = search(index, "seven", k=10)
    assert any(Path(h.path).name.startswith("seven-") for h in before.hits)
    after = search(index, "seven", k=10, patches=[patch])
    assert not any(Path(h.path).name.startswith("seven-") for h in after.hits)


@pytest.mark.slow
def test_towers_option_loads_only_what_a_job_uses(mini_index) -> None:
    """rescore/search load the text tower only, indexing the image tower only; each refuses the other's work."""
    import runtime
    from runtime.index.embed import ModelSpec
    from runtime.index.rescore import open_session

    export_dir, root, index, _ = mini_index
    image = sorted(root.glob("seven-*.png"))[0]
    full = runtime.load(export_dir, threads=1)
    text, _ = open_session(IndexStore.open(index), threads=1)
    assert text.backend.towers == ("text",)
    np.testing.assert_array_equal(text.encode_text(["seven"]), full.encode_text(["seven"]))
    with pytest.raises(ForgetpackError, match="loaded without its image tower"):
        text.encode_image([image])
    images = ModelSpec(str(export_dir), threads=1)()
    assert images.backend.towers == ("image",)
    np.testing.assert_array_equal(images.encode_image([image]), full.encode_image([image]))
    with pytest.raises(ForgetpackError, match="loaded without its text tower"):
        images.encode_text(["seven"])
    assert runtime.load(export_dir, towers=()).backend.towers == ()  # the manifest alone (the Ray driver's check)
    with pytest.raises(ForgetpackError, match="has no 'audio' tower"):
        runtime.load(export_dir, towers=("audio",))
    with pytest.raises(ForgetpackError, match="towers must be a list"):
        runtime.load(export_dir, towers=[1])
