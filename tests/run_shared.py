"""Artefacts a test run builds once and every test module shares (the mini export, real forget patches,
the feature cache), also across pytest-xdist's worker processes.

Each xdist worker is a pytest session of its own with its own temp dir (``.../pytest-N/popen-gw0``);
the folder above it belongs to the run, so shared artefacts live there and the first worker that
needs one builds it under a file lock while the others wait (pytest-xdist's documented pattern).
Without xdist (``-p no:xdist``, ``-n 0``, a single file) it is the session's own temp dir.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def run_dir(tmp_path_factory) -> Path:
    """The temp folder of the whole run: shared by xdist's workers, the session's own without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str, done: Callable[[Path], bool], build: Callable[[Path], None]) -> Path:
    """``run_dir / name``, built by ``build(path)`` unless ``done(path)``; one process builds, the others wait.

    ``build`` must leave ``done`` false until the artefact is whole (the project's writers rename into
    place), so that a build that failed is tried again by the next test that needs it."""
    from filelock import FileLock

    path = run_dir(tmp_path_factory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if done(path):
        return path
    with FileLock(f"{path}.lock"):
        if not done(path):
            build(path)
    return path
