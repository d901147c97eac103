"""A tower traced once per process (forgetpack.export.traced): a second export of the same weights,
with another patch baked in, writes the same bytes a fresh trace writes, without tracing again."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from forgetpack.export import graph, traced


@pytest.fixture(scope="module")
def mini():
    from forgetpack.engine.models import load_model

    return load_model("mini")


@pytest.fixture
def traces(monkeypatch) -> list[str]:
    """The towers torch traced during the test (each call of the exporter)."""
    calls: list[str] = []
    real = graph._to_onnx
    monkeypatch.setattr(graph, "_to_onnx", lambda module, tower, *a, **k: calls.append(tower) or real(module, tower, *a, **k))
    traced.forget_traces()
    return calls


def _files(folder) -> dict[str, bytes]:
    out = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "manifest.json"}
    manifest = json.loads((folder / "manifest.json").read_text())
    out["manifest"] = json.dumps({k: v for k, v in manifest.items() if k not in ("created", "export_id")}, sort_keys=True).encode()
    return out


def test_a_second_export_reuses_the_trace_and_writes_the_same_bytes(mini, seven, tmp_path, traces) -> None:
    from forgetpack.export import export_loaded

    export_loaded(mini, tmp_path / "plain", towers=("text",))
    export_loaded(mini, tmp_path / "kept", patches=[seven], towers=("text",))  # another projection: same trace
    assert traces == ["text"]
    traced.forget_traces()
    export_loaded(mini, tmp_path / "fresh", patches=[seven], towers=("text",))
    assert traces == ["text", "text"]
    kept, fresh = _files(tmp_path / "kept"), _files(tmp_path / "fresh")
    assert kept.keys() == fresh.keys() and all(kept[name] == fresh[name] for name in kept)  # byte for byte
    assert _files(tmp_path / "plain")["text.onnx"] != kept["text.onnx"]  # the baked patch is in the graph


def test_other_weights_or_another_opset_trace_again(mini, tmp_path, traces) -> None:
    import torch

    from forgetpack.export import export_loaded

    export_loaded(mini, tmp_path / "a", towers=("image",))
    export_loaded(mini, tmp_path / "b", towers=("image",), opset=19)
    other = copy.deepcopy(mini)
    with torch.no_grad():
        next(other.model.visual.parameters()).add_(1e-3)  # not the projection: another graph
    export_loaded(other, tmp_path / "c", towers=("image",))
    assert traces == ["image"] * 3
    export_loaded(mini, tmp_path / "d", towers=("image",))
    assert traces == ["image"] * 3 and _files(tmp_path / "a") == _files(tmp_path / "d")


def test_a_shipped_graph_names_no_path_of_the_machine_that_made_it(export_dir) -> None:
    """torch's exporter notes each node's stack trace (this checkout's and site-packages' paths); the
    export drops those notes, so a graph handed to a customer carries no file path of its maker."""
    import onnx

    root = str(Path(__file__).resolve().parents[1]).encode()
    for name in ("image.onnx", "text.onnx"):
        data = (export_dir / name).read_bytes()
        assert root not in data and b"site-packages" not in data and b"stack_trace" not in data, name
        graph = onnx.load_from_string(data).graph
        assert not graph.metadata_props and not any(node.metadata_props for node in graph.node)
