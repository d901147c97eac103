"""One tower as an ONNX graph that a patch can still reach, verified against torch.

Each tower is exported whole with the dynamo exporter (``dynamo=True``), which keeps
parameter names as initializer names, so the projection stays one named initializer
(``text_projection``, ``text.proj.weight``, ``visual.proj``) consumed by one MatMul/Gemm whose
output is the graph output. We then add a second output, ``features``: that node's other
input, i.e. the tower's pre-projection features. A runtime swaps a patch in by re-projecting
``features`` with the patched matrix (a [n, d] x [d, e] product, and cached text features are
re-used), instead of rebuilding a session; plain ONNX consumers keep using ``embeddings``.

Everything is verified here: the initializer's bytes must have the fingerprint of the model's
(patched) matrix, it must feed exactly one node, ``features @ W`` must reproduce
``embeddings``, and the ONNX outputs must match torch. Any failure is a clear error, never a
silently unpatchable export. torch, onnx and onnxruntime are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.export.text_graph import DYNAMIC_AXIS, max_sequence, sequence_kind, text_encoder, token_lengths
from forgetpack.export.traced import traced
from forgetpack.format.errors import ForgetpackError, one_line
from forgetpack.format.manifest import GRAPH_ID_KEY, ExportedProjection, Tower
from forgetpack.format.onnxfile import OnnxFile
from forgetpack.format.patch import fingerprint

if TYPE_CHECKING:
    import onnx
    import torch

    from forgetpack.engine.models import LoadedModel

PARITY_TOLERANCE = 1e-4  # max abs difference of normalised embeddings, ONNX vs torch
INPUTS = {"image": ("pixel_values", "float32"), "text": ("input_ids", "int64")}  # tower -> graph input, dtype


def example_inputs(loaded: LoadedModel, image_size: Sequence[int]) -> tuple[dict[str, torch.Tensor], int]:
    """Example inputs per tower with batch 2 (so the exporter does not fix the batch axis to 1), and the embedding width."""
    import torch

    h, w = image_size
    pixels = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    ids = loaded.tokenizer(["a photo of a cat.", "zero"])
    with torch.no_grad():
        embed_dim = int(loaded.model.encode_text(ids[:1]).shape[-1])
    if sequence_kind(loaded.model) is not None:  # a dynamic axis is traced at a length below the context
        ids = ids[:, : int(token_lengths(loaded.model, ids).max())]
    return {"image": pixels, "text": ids}, embed_dim


def export_tower(
    model: Any,
    tower: str,
    example: torch.Tensor,
    proj: Any,
    base_fp: str,
    current_fp: str,
    path: Path,
    opset: int,
    graph_id: str,
    cases: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
    quantize: Callable[[Path, Tower, ExportedProjection], None] | None = None,
) -> tuple[Tower, ExportedProjection, dict[str, float]]:
    """Write ``path`` and return its manifest entries and the measured ONNX-vs-torch differences.

    ``proj`` is the located projection (``forgetpack.engine.projections``); ``base_fp`` and
    ``current_fp`` are the fingerprints of its unpatched and its (patched) matrix. The text
    tower gets a dynamic sequence axis where its features allow it (``text_graph``); ``cases``
    are (graph input, open_clip input) pairs checked for parity besides ``example``.
    ``quantize`` rewrites the verified fp32 graph in place (int8); the graph as shipped is then
    measured again on the same inputs, so the difference reported is its own, not the fp32 graph's.
    The differences are keyed as ``Manifest.export_check`` keys them (``export_checks``).
    """
    import onnx

    reference = _encoder(model, tower)
    sequence = sequence_kind(model) if tower == "text" else None
    module = text_encoder(model) if sequence is not None else reference
    input_name, input_dtype = INPUTS[tower]
    bound = max_sequence(model) if sequence is not None else None

    def trace() -> onnx.ModelProto:
        proto = _to_onnx(module, tower, example, input_name, opset, bound)
        strip_prefix(proto, "model.")
        return proto

    with single_query_pool(model if tower == "image" else None):
        proto = traced(module, tower, example, opset, bound, proj.target, trace)  # once per process and weights
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != opset:  # the exporter falls back to its own opset where it cannot convert
        raise ForgetpackError(f"the ONNX exporter wrote the {tower} graph at opset {written}, not the {opset} asked for: "
                              "export at its default opset instead")
    node, bias = projection_node(proto, tower, proj)
    matrix = initializer(proto, proj.target)
    if matrix is None:
        raise ForgetpackError(f"projection target {proj.target!r} of the {tower} tower is not an initializer of the exported graph")
    got = fingerprint(matrix)
    if got != current_fp:
        raise ForgetpackError(
            f"the {tower} graph's initializer {proj.target!r} has fingerprint {got}, the model's matrix has {current_fp}: "
            "the exporter changed it (constant folding?), so patches could not be verified against it"
        )
    add_features_output(proto, node, matrix.shape[0] if proj.layout == "in_out" else matrix.shape[1])
    drop_exporter_notes(proto.graph)
    name_nodes(proto)
    set_metadata(proto, {GRAPH_ID_KEY: graph_id, "forgetpack.tower": tower})
    onnx.save_model(proto, str(path))
    checks = [(example, example if sequence is None else None), *cases]
    expected = reference_outputs(reference, module, checks)  # torch runs once; the int8 graph is measured on it too
    reproject, fp32 = _verify(path, expected, checks, input_name, proj, matrix, bias, tower)
    spec = Tower(
        file=path.name,
        input=input_name,
        input_shape=["batch", DYNAMIC_AXIS] if sequence is not None else ["batch", *[int(d) for d in example.shape[1:]]],
        input_dtype=input_dtype,
        projection=proj.target,
    )
    entry = ExportedProjection(
        tower=tower, initializer=proj.target, layout=proj.layout, shape=[int(d) for d in matrix.shape],
        base=base_fp, current=current_fp, bias=bias, reproject=reproject,
    )
    if quantize is None:
        return spec, entry, export_checks(tower, fp32)
    quantize(path, spec, entry)
    return spec, entry, export_checks(tower, max_difference(_session(path), expected, checks, input_name), fp32)


def export_checks(tower: str, shipped: float, fp32: float | None = None) -> dict[str, float]:
    """``Manifest.export_check`` entries of a tower: the shipped graph's ONNX-vs-torch difference
    under the tower's name and, for a quantized graph, the fp32 graph's under ``TOWER.fp32``."""
    return {tower: shipped} if fp32 is None else {tower: shipped, f"{tower}.fp32": fp32}


@contextlib.contextmanager
def single_query_pool(model: Any) -> Iterator[None]:
    """While exporting, a ModifiedResNet's attention pool computes only the query it keeps.

    open_clip's ``AttentionPool2d`` attends from every token and returns token 0's output, so its
    projection (``attnpool.c_proj``, the patchable matrix) sees tokens × batch rows and the graph's
    ``features`` would not be one row per image. Token 0's query alone gives the same numbers (the
    export checks them against ``encode_image``) and one projected row per image. Other towers: no-op."""
    import torch
    import torch.nn.functional as F

    pool = getattr(getattr(model, "visual", None), "attnpool", None)
    if pool is None or not hasattr(pool, "c_proj"):
        yield
        return

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0) + pool.positional_embedding[:, None, :].to(x.dtype)
        tokens, width, heads = x.shape[0], x.shape[-1], pool.num_heads
        head = width // heads
        q = F.linear(x[0], pool.q_proj.weight, pool.q_proj.bias).reshape(-1, heads, 1, head) * head**-0.5
        k = F.linear(x, pool.k_proj.weight, pool.k_proj.bias).reshape(tokens, -1, heads, head).permute(1, 2, 3, 0)
        v = F.linear(x, pool.v_proj.weight, pool.v_proj.bias).reshape(tokens, -1, heads, head).permute(1, 2, 0, 3)
        attended = (torch.softmax(q @ k, dim=-1) @ v).reshape(-1, width)  # N, C: one row per image
        return F.linear(attended, pool.c_proj.weight, pool.c_proj.bias)

    pool.forward = forward
    try:
        yield
    finally:
        del pool.forward


def _encoder(model: Any, tower: str) -> torch.nn.Module:
    """The torch module to export for one tower (the wrapper keeps model names under ``model.``)."""
    import torch

    class Encode(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.model.encode_image(x) if tower == "image" else self.model.encode_text(x)

    return Encode().eval()


def _to_onnx(module: torch.nn.Module, tower: str, example: torch.Tensor, input_name: str, opset: int,
             sequence: int | None = None) -> onnx.ModelProto:
    """The graph with a dynamic batch axis, and a dynamic sequence axis up to ``sequence`` tokens if given."""
    import torch

    axes = {0: torch.export.Dim("batch", min=1, max=65536)}
    if sequence is not None:  # a prompt holds at least its start and end tokens
        axes[1] = torch.export.Dim(DYNAMIC_AXIS, min=2, max=sequence)
    with quiet():
        try:
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, external_data=False, input_names=[input_name],
                output_names=["embeddings"], dynamic_shapes=(axes,), opset_version=opset,
            )
        except Exception as exc:
            raise ForgetpackError(f"ONNX export of the {tower} tower failed: {one_line(exc)}") from exc
        return program.model_proto


def strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
    """Rename ``model.x`` initializers to the state-dict name ``x`` (the wrapper's prefix)."""
    renames = {}
    for init in proto.graph.initializer:
        if init.name.startswith(prefix):
            renames[init.name] = init.name[len(prefix):]
            init.name = renames[init.name]
    taken = {n.name for n in proto.graph.input} | {n.name for n in proto.graph.output}
    clash = taken & set(renames.values())
    if clash:
        raise ForgetpackError(f"cannot rename initializers: {sorted(clash)[0]!r} is also a graph input/output name")
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for info in proto.graph.value_info:
        if info.name in renames:
            info.name = renames[info.name]


def initializer(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    """The named initializer's value, or None when the graph has none by that name."""
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def projection_node(proto: onnx.ModelProto, tower: str, proj: Any) -> tuple[Any, str | None]:
    """The one MatMul/Gemm that consumes the projection, and its bias initializer (if any)."""
    users = [n for n in proto.graph.node if proj.target in n.input]
    if not users:
        names = sorted(i.name for i in proto.graph.initializer if "proj" in i.name)
        raise ForgetpackError(
            f"projection target {proj.target!r} of the {tower} tower cannot be found in the exported graph "
            f"(initializers named like it: {', '.join(names[:8]) or 'none'})"
        )
    if len(users) != 1:
        raise ForgetpackError(
            f"the {tower} graph uses initializer {proj.target!r} in {len(users)} nodes (the exporter merged identical "
            "tensors?): a patch could not change the projection alone"
        )
    node = users[0]
    if node.op_type not in ("MatMul", "Gemm") or list(node.input).index(proj.target) != 1:
        raise ForgetpackError(f"the {tower} graph applies {proj.target!r} with a {node.op_type} node, not as x @ W")
    bias = None
    if node.op_type == "Gemm":
        attrs = {a.name: a for a in node.attribute}
        trans_b = attrs["transB"].i if "transB" in attrs else 0
        if (trans_b == 1) != (proj.layout == "out_in") or ("transA" in attrs and attrs["transA"].i):
            raise ForgetpackError(f"the {tower} graph's Gemm over {proj.target!r} does not match its {proj.layout} layout")
        if "alpha" in attrs and attrs["alpha"].f != 1.0:
            raise ForgetpackError(f"the {tower} graph's Gemm over {proj.target!r} scales it (alpha != 1)")
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
    elif proj.layout != "in_out":
        raise ForgetpackError(f"the {tower} graph multiplies by {proj.target!r} untransposed, but its layout is {proj.layout}")
    return node, bias


def add_features_output(proto: onnx.ModelProto, node: Any, width: int) -> None:
    """Expose the projection's input as a second graph output, ``features``."""
    import onnx

    batch = proto.graph.output[0].type.tensor_type.shape.dim[0]
    proto.graph.node.append(onnx.helper.make_node("Identity", [node.input[0]], ["features"], name="forgetpack_features"))
    shape = [batch.dim_param or batch.dim_value or "batch", width]
    proto.graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, shape))


def drop_exporter_notes(graph: onnx.GraphProto) -> None:
    """Remove the notes torch's exporter leaves on each node and on the graph: stack traces naming
    the files of the machine that exported (its user's paths), fx dumps and name scopes (about 800 KB
    in mini's text graph). A shipped graph then says nothing about where it was made, and the same
    model exported by the same versions is the same bytes wherever forgetpack is installed."""
    del graph.metadata_props[:]
    for node in graph.node:
        del node.metadata_props[:]
        for attribute in node.attribute:  # the bodies of If and Loop nodes
            for sub in [attribute.g] * attribute.HasField("g") + list(attribute.graphs):
                drop_exporter_notes(sub)


def name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name (quantization excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    """Set ``metadata_props`` keys, replacing any already there (the export id ties graph to manifest)."""
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in keep}, **values})


def _verify(
    path: Path, expected: Sequence[np.ndarray], checks: Sequence[tuple[Any, Any]], input_name: str, proj: Any,
    matrix: np.ndarray, bias: str | None, tower: str,
) -> tuple[bool, float]:
    """ONNX vs torch (``expected``: ``reference_outputs``) on every check; and whether
    ``features @ W (+ b)`` reproduces ``embeddings``."""
    session = _session(path)
    diff, reproject = 0.0, True
    bias_value = None
    if bias is not None:
        info = OnnxFile(path).initializers.get(bias)
        reproject = info is not None
        bias_value = info.array().astype(np.float64) if info is not None else None
    w = matrix.astype(np.float64)
    for (graph_input, _), want in zip(checks, expected, strict=True):
        embeddings, features = session.run(["embeddings", "features"], {input_name: graph_input.numpy()})
        diff = max(diff, _difference(embeddings, want))
        if not diff <= PARITY_TOLERANCE:
            raise ForgetpackError(f"the exported {tower} graph disagrees with torch: max abs difference {diff:.2e} "
                                  f"on normalised embeddings (input shape {list(graph_input.shape)})")
        projected = features.astype(np.float64) @ (w if proj.layout == "in_out" else w.T)
        if bias_value is not None:
            projected = projected + bias_value
        scale = max(float(np.abs(embeddings).max()), 1e-12)
        reproject = reproject and bool(np.abs(projected - embeddings).max() <= 1e-4 * scale)
    return reproject, diff


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def reference_outputs(reference: Any, module: Any, checks: Sequence[tuple[Any, Any]]) -> list[np.ndarray]:
    """Torch's embeddings for each (graph input, reference input) check: open_clip's own ``encode_*``
    on the reference input, or the exported module on the graph input where there is none (the
    trace example of a dynamic axis)."""
    import torch

    with torch.no_grad():
        return [(reference(r) if r is not None else module(g)).numpy() for g, r in checks]


def max_difference(session: Any, expected: Sequence[np.ndarray], checks: Sequence[tuple[Any, Any]], input_name: str) -> float:
    """Max abs difference of normalised embeddings, the graph in ``session`` vs ``expected``."""
    return max(_difference(session.run(["embeddings"], {input_name: g.numpy()})[0], want)
               for (g, _), want in zip(checks, expected, strict=True))


def _difference(embeddings: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(_normalise(embeddings) - _normalise(expected)).max())


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporters print progress and warnings by the screenful; the library never prints."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "torch.onnx", "onnx_ir", "root", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)

