"""Shared test set-up."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def feature_cache(tmp_path_factory):
    """Every test run gets its own feature and image-embedding cache, never the user's
    ``~/.cache/forgetpack``; within a run it is shared, as it would be between commands."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORGETPACK_CACHE", str(tmp_path_factory.mktemp("forgetpack-cache")))
        yield


@pytest.fixture(scope="module")
def onnx_model(export_dir):
    """The onnxruntime model of the module's own ``export_dir`` (mini or ViT-B-32), 2 threads."""
    import runtime

    return runtime.load(export_dir, threads=2)
