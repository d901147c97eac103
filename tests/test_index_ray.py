"""The Ray Data engine of the index on a local Ray instance: the same rows as the local engine, bit for bit."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from index_fakes import FakeFactory, write_digit

from runtime.index import IndexStore, build_index

TESTS = Path(__file__).resolve().parent

pytestmark = pytest.mark.xdist_group("ray")  # one Ray cluster at a time under pytest-xdist (tests/conftest.py)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=150 * 1024**2,
             runtime_env={"env_vars": {"PYTHONPATH": path}}, log_to_driver=False)
    yield ray
    ray.shutdown()


def rows(index: Path) -> dict[str, tuple[str, np.ndarray]]:
    table = IndexStore.open(index).table.to_arrow().to_pylist()
    return {r["content_hash"]: (r["path"], np.asarray(r["embedding"], np.float32)) for r in table}


def same_rows(a: Path, b: Path) -> None:
    left, right = rows(a), rows(b)
    assert left.keys() == right.keys()
    for key, (path, embedding) in left.items():
        assert right[key][0] == path
        np.testing.assert_array_equal(right[key][1], embedding)


def test_ray_and_local_engines_store_identical_rows(ray_local, tmp_path) -> None:
    source = tmp_path / "images"
    for digit in range(10):
        for j in range(4):
            write_digit(source / f"d{digit}" / f"{j}.png", digit, 10 * digit + j)
    (source / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    local = build_index(source, tmp_path / "local", FakeFactory(), shard_size=8, batch=4)
    remote = build_index(source, tmp_path / "ray", FakeFactory(), engine="ray", shard_size=8, batch=4, workers=2)
    assert (remote.added, remote.failed, remote.shards_committed) == (local.added, local.failed, local.shards_committed) == (40, 1, 6)
    assert remote.failures == local.failures
    same_rows(tmp_path / "local", tmp_path / "ray")
    again = build_index(source, tmp_path / "ray", FakeFactory(), engine="ray", resume=True, shard_size=8, batch=4)
    assert (again.shards_skipped, again.added) == (6, 0)


@pytest.mark.slow
def test_ray_engine_on_the_mini_export(ray_local, tmp_path_factory, tmp_path) -> None:
    pytest.importorskip("torch")  # exporting needs torch (CI has it; the export is shared with test_runtime.py)
    from test_runtime import cached_export

    from forgetpack.evaluation.datasets import load_dataset

    export_dir = cached_export(tmp_path_factory, "mini")
    data = load_dataset("mnist")
    source = tmp_path / "mnist"
    source.mkdir()
    for i in range(0, 1000, 20):  # 50 held-out digits
        data.images[i].save(source / f"{i}.png")
    build_index(source, tmp_path / "local", export_dir, shard_size=16, threads=1)
    report = build_index(source, tmp_path / "ray", export_dir, engine="ray", shard_size=16, threads=1, workers=2)
    assert report.added == 50
    same_rows(tmp_path / "local", tmp_path / "ray")
