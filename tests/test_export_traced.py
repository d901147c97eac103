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


def test_the_same_export_again_is_not_traced_again(mini, tmp_path, traces) -> None:
    from forgetpack.export import export_loaded

    export_loaded(mini, tmp_path / "a", towers=("image",))
    export_loaded(mini, tmp_path / "b", towers=("image",))
    assert traces == ["image"] and _files(tmp_path / "a") == _files(tmp_path / "b")


def test_the_key_holds_every_weight_but_the_projection_and_the_opset(mini) -> None:
    """What makes another trace: any other weight (a visual parameter +1e-3), another opset or example;
    not the patchable projection, which each export refills with its own matrix."""
    import torch

    from forgetpack.engine.projections import find_projection

    module = graph._encoder(copy.deepcopy(mini.model), "image")
    example = torch.zeros(2, 3, 32, 32)
    projection = "model." + find_projection(mini.model, "image").target  # the wrapper's parameter name

    def key(opset: int = 18, x=example) -> str:
        return traced._key(module, "image", x, opset, None, projection)

    first = key()
    assert key() == first and key(19) != first and key(x=example + 1) != first
    weights = dict(module.named_parameters())
    with torch.no_grad():
        weights[projection].add_(1.0)
        assert key() == first  # another baked patch: the same trace
        next(p for n, p in weights.items() if n != projection).add_(1e-3)
        assert key() != first


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
