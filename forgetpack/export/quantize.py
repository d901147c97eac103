"""int8 exports: dynamic quantization of every MatMul/Gemm except the projections.

The projections stay float32 initializers under their own names, so patches still apply
(and hot-swap by re-projection still works) on an int8 export. onnx and onnxruntime are
imported inside the functions; no torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from forgetpack.export.graph import initializer, quiet, set_metadata
from forgetpack.format.errors import ForgetpackError, one_line
from forgetpack.format.fileio import atomic_directory
from forgetpack.format.manifest import GRAPH_ID_KEY, ExportedProjection, Manifest, Tower
from forgetpack.format.patch import fingerprint

if TYPE_CHECKING:
    import onnx


def quantize_export(src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Manifest:
    """An int8 copy of an fp32 export directory (no torch needed, no re-export).

    Same as ``forgetpack export --quantize int8`` but starting from the fp32 graphs, so one
    export can be served both ways (the benchmark and the tests use it).
    """
    src = Path(src)
    manifest = Manifest.read(src)
    if manifest.precision != "fp32":
        raise ForgetpackError(f"{src}: is already {manifest.precision}")
    manifest.precision = "int8"
    manifest.graph_id = "sha256:" + hashlib.sha256(f"{manifest.graph_id}|int8".encode()).hexdigest()
    # Without torch the int8 graphs cannot be measured against it: keep the fp32 figures as
    # such (TOWER.fp32, as export_checks keys them) and claim none for the int8 graphs.
    manifest.export_check = {f"{k}.fp32": v for k, v in manifest.export_check.items() if "." not in k}
    with atomic_directory(out, replace=force) as tmp:
        for tower in manifest.towers.values():
            shutil.copyfile(src / tower.file, tmp / tower.file)
            quantize_tower(tmp / tower.file, tower, manifest.projections, {GRAPH_ID_KEY: manifest.graph_id})
        shutil.copyfile(src / manifest.tokenizer["file"], tmp / manifest.tokenizer["file"])
        manifest.seal().save(tmp)
    return manifest


def quantize_tower(path: Path, tower: Tower, projections: dict[str, ExportedProjection], metadata: dict[str, str] | None = None) -> None:
    """Dynamic int8 quantization of MatMul/Gemm weights, in place, projection excluded.

    ``metadata`` is added to the graph's own (the int8 copy gets its own graph id).
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    exclude = _untangle_projection(proto, projections[tower.projection].initializer) if tower.projection else []
    metadata = {**{p.key: p.value for p in proto.metadata_props}, **(metadata or {})}
    staged = path.with_suffix(".staged.onnx")
    quantized = path.with_suffix(".int8.onnx")
    onnx.save_model(proto, str(staged))
    with quiet():
        try:
            quantize_dynamic(
                str(staged), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
            )
        except Exception as exc:
            raise ForgetpackError(f"int8 quantization of {path.name} failed: {one_line(exc)}") from exc
        finally:
            staged.unlink()
    proto = onnx.load(str(quantized))
    set_metadata(proto, metadata)
    if tower.projection is not None:
        proj = projections[tower.projection]
        matrix = initializer(proto, proj.initializer)
        if matrix is None or fingerprint(matrix) != proj.current:
            raise ForgetpackError(f"int8 quantization changed the projection {proj.initializer!r} of {path.name}")
    if [o.name for o in proto.graph.output] != ["embeddings", "features"]:
        raise ForgetpackError(f"int8 quantization changed the outputs of {path.name}")
    onnx.save_model(proto, str(path))
    quantized.unlink()


def _untangle_projection(proto: onnx.ModelProto, name: str) -> list[str]:
    """Keep the projection out of quantization, under its own name; returns the node names to exclude.

    onnxruntime's dynamic quantizer rewrites every ``Gemm(x, W, transB=1)`` into a MatMul over
    a new, transposed copy ``W_Transposed`` (dropping ``W``), even for excluded nodes. So a
    projection Gemm becomes ``MatMul(x, Transpose(W))`` (+ ``Add`` for a bias) first: the
    same arithmetic, ``W`` stays a named float32 initializer (onnxruntime folds the Transpose
    once, at session start), and the MatMul is excluded by name.
    """
    import onnx

    nodes = list(proto.graph.node)
    for i, node in enumerate(nodes):
        if name not in node.input:
            continue
        if node.op_type == "MatMul":
            return [node.name]
        if node.op_type != "Gemm":
            raise ForgetpackError(f"cannot quantize around the projection {name!r}: it feeds a {node.op_type}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = node.input[1]
        new = []
        if attrs.get("transB", 0):
            new.append(onnx.helper.make_node("Transpose", [weight], [f"{weight}__t"], name=f"{node.name}__transpose"))
            weight = f"{weight}__t"
        matmul_out = node.output[0] if len(node.input) < 3 or not node.input[2] else f"{node.output[0]}__mm"
        new.append(onnx.helper.make_node("MatMul", [node.input[0], weight], [matmul_out], name=f"{node.name}__matmul"))
        if matmul_out != node.output[0]:
            new.append(onnx.helper.make_node("Add", [matmul_out, node.input[2]], [node.output[0]], name=f"{node.name}__bias"))
        del proto.graph.node[:]
        proto.graph.node.extend(nodes[:i] + new + nodes[i + 1 :])
        return [f"{node.name}__matmul"]
    return []
