"""Shared test set-up, and how pytest-xdist splits the suite (``tools/run_tests.sh`` runs it with
``-n auto --maxprocesses 4 --dist loadgroup --no-loadscope-reorder``).

Under xdist every test belongs to a group that one worker runs from start to end: its module (so a
module-scoped fixture is built once, as in a serial run), or a group its file names with
``pytest.mark.xdist_group``: "ray" holds every test that starts a Ray cluster, so that two never
run at once; "hardened-mini" the hardened forgets on mini, whose grids share most of their prompts
(one worker encodes them once). Groups are handed out in the order below, the costliest first, so that no long module
starts last while the other workers sit idle. Serial runs (``-p no:xdist``, one file) are unchanged.
"""

from __future__ import annotations

import os

import pytest
from run_shared import run_dir

# Seconds each group took on a quiet 2-core machine, roughly (python tools/test_times.py shows them);
# only the order matters. Groups not named here follow in collection order.
COST = {
    "hardened-mini": 130,  # tests/test_harden.py: its tests share most grid prompts
    "ray": 55,
    "tests/test_engine.py": 50,
    "tests/test_export.py": 50,
    "tests/test_benchmark_paper.py": 41,
    "tests/test_reliability_export.py": 38,
    "tests/test_audit.py": 29,
    "tests/test_mini.py": 25,
    "tests/test_first_hour_output.py": 24,
    "tests/test_runtime.py": 19,
    "tests/test_export_traced.py": 18,
    "tests/test_forget_cli.py": 18,
    "tests/test_architecture.py": 17,
    "kill-export": 17,
    "tests/test_index_attack.py": 15,
    "tests/test_extras.py": 15,
    "tests/test_evaluate.py": 12,
}


def pytest_configure(config: pytest.Config) -> None:
    # xdist registers it too; without xdist (-p no:xdist) the marks must still be known
    config.addinivalue_line("markers", "xdist_group(name): run with the other tests of this group on one xdist worker")
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers > 1:
        # Each worker gets its share of the cores for torch's (OpenMP) threads, and so do the commands it
        # starts: two workers of two threads each on two cores spin against each other (harden: 4x slower).
        # Before torch is imported (no test module is yet); a value the user set is kept.
        share = max(1, len(os.sched_getaffinity(0)) // workers) if hasattr(os, "sched_getaffinity") else 1
        os.environ.setdefault("OMP_NUM_THREADS", str(share))
        os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])


@pytest.hookimpl(tryfirst=True)  # before xdist turns the marks into its "@group" node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("loadgroup", default=False):
        return
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::", 1)[0]))
    group = {item.nodeid: item.get_closest_marker("xdist_group").args[0] for item in items}
    first = {}
    for i, item in enumerate(items):
        first.setdefault(group[item.nodeid], i)
    items.sort(key=lambda item: (-COST.get(group[item.nodeid], 0), first[group[item.nodeid]]))


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Every test run gets its own feature and image-embedding cache, never the user's
    ``~/.cache/forgetpack``; within a run it is shared, as it would be between commands (and so
    between xdist's workers, as between commands run at the same time)."""
    folder = run_dir(tmp_path_factory) / "forgetpack-cache"
    folder.mkdir(mode=0o700, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGETPACK_CACHE", str(folder))
        yield


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """The run's mini export, built once per run (tests/run_shared.py); a module that tests another
    export (ViT-B-32, one it makes itself) defines its own ``export_dir``."""
    from serve_helpers import serve_export

    return serve_export(tmp_path_factory)


@pytest.fixture(scope="module")
def patch_files(tmp_path_factory):
    """Real patches for "seven" and "three", as ``forgetpack forget mini`` makes them, once per run."""
    from serve_helpers import forget_patches

    return forget_patches(tmp_path_factory)


@pytest.fixture(scope="module")
def seven(patch_files):
    return patch_files["seven"]


@pytest.fixture(scope="module")
def onnx_model(export_dir):
    """The onnxruntime model of the module's own ``export_dir`` (mini or ViT-B-32), 2 threads."""
    import runtime

    return runtime.load(export_dir, threads=2)
