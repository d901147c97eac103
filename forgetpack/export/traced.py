"""Towers traced once per process: exporting the same weights again costs the writing, not the tracing.

torch's ONNX exporter spends seconds tracing and decomposing a tower (mini: ~2.5 s a tower on one
core, against ~0.5 s for everything else an export does) and returns the same graph, byte for
byte, for the same module, weights, example input and opset. A process that exports one model
several times (with other patches baked in, fp32 and int8, an export per customer) traces it once.

The key covers the module's structure, every parameter and buffer but the patchable projection,
the example input, the opset and the sequence bound. The projection is left out so that exports
with other baked patches share the trace: its initializer is refilled with this export's matrix
like every other weight, and ``graph.export_tower`` then checks its fingerprint and measures the
graph against torch, as it does for a fresh trace. An entry keeps the graph without the model's
weights (they are refilled from the model, whose fingerprint is in the key), and only the latest
few entries are kept.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from forgetpack.format.recent import Recent

if TYPE_CHECKING:
    import onnx
    import torch

MAX_ENTRIES = 4
_TRACES: Recent[bytes] = Recent(MAX_ENTRIES)  # serialized graphs without the model's weights


def traced(module: torch.nn.Module, tower: str, example: torch.Tensor, opset: int, sequence: int | None,
           projection: str, trace: Callable[[], onnx.ModelProto], prefix: str = "model.") -> onnx.ModelProto:
    """``trace()``'s graph (its initializer names without ``prefix``), from this process's earlier trace when
    the key matches. ``projection`` is the state-dict name of the patchable matrix."""
    import onnx

    weights = {name.removeprefix(prefix): p for name, p in module.named_parameters()}

    def skeleton() -> bytes:  # the trace, with the initializers that hold the model's own bytes emptied
        proto = trace()
        for init in proto.graph.initializer:
            weight = weights.get(init.name)
            if init.raw_data and weight is not None and _array(weight).tobytes() == init.raw_data:
                init.ClearField("raw_data")
        return proto.SerializeToString()

    proto = onnx.ModelProto.FromString(_TRACES.get(_key(module, tower, example, opset, sequence, prefix + projection), skeleton))
    for init in proto.graph.initializer:  # refilled from this model: its projection is this export's
        if init.name in weights and not init.raw_data:
            init.raw_data = _array(weights[init.name]).tobytes()
    return proto


def forget_traces() -> None:
    """Drop every kept trace (tests compare a kept trace with a fresh one)."""
    _TRACES.clear()


def _key(module: torch.nn.Module, tower: str, example: torch.Tensor, opset: int, sequence: int | None,
         projection: str) -> str:
    import torch

    digest = hashlib.sha256()
    head = (tower, opset, sequence, tuple(example.shape), str(example.dtype), torch.__version__, repr(module))
    digest.update(repr(head).encode())
    digest.update(_array(example))
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        if name != projection:
            digest.update(_array(tensor))
    return digest.hexdigest()


def _array(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a C-contiguous array (no copy for a contiguous CPU tensor)."""
    import torch

    t = tensor.detach().cpu().contiguous()
    return (t.view(torch.uint8) if t.dtype == torch.bfloat16 else t).numpy()
