"""Export a (patched) open_clip model to a self-contained ONNX directory for the runtime.

Layout of an export (docs/runtime.md has the manifest schema)::

    DIR/manifest.json     model id, base fingerprints, baked-in patches, opset, towers,
                          projection target -> ONNX initializer, preprocessing, tokenizer
    DIR/image.onnx        pixel_values [batch, 3, H, W] -> embeddings, features
    DIR/text.onnx         input_ids [batch, context] -> embeddings, features
    DIR/tokenizer.json    for the ``tokenizers`` library (open_clip's BPE, or the HF tower's own)

Design of the graphs, for cheap hot-swapping: each tower is exported whole with the dynamo
exporter (``dynamo=True``), which keeps parameter names as initializer names, so the
projection stays one named initializer (``text_projection``, ``text.proj.weight``,
``visual.proj``) consumed by one MatMul/Gemm whose output is the graph output. We then add a
second output, ``features``: that node's other input, i.e. the tower's pre-projection
features. A runtime swaps a patch in by re-projecting ``features`` with the patched matrix
(a [n, d] x [d, e] product, and cached text features are re-used), instead of rebuilding a
session; plain ONNX consumers keep using ``embeddings``. Everything is verified at export:
the initializer's bytes must have the fingerprint of the model's (patched) matrix, it must
feed exactly one node, ``features @ W`` must reproduce ``embeddings``, and the ONNX outputs
must match torch. Any failure is a clear error, never a silently unpatchable export.

torch, open_clip and onnx are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack import __version__
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.manifest import EXPORT_ID_KEY, Manifest, Projection, Tower
from forgetpack.format.patch import Patch, display_name, fingerprint, read_patch

if TYPE_CHECKING:
    import onnx
    import torch

    from forgetpack.engine.models import LoadedModel

DEFAULT_OPSET = 18
PARITY_TOLERANCE = 1e-4  # max abs difference of normalised embeddings, ONNX vs torch
SIDES = {"image": "visual", "text": "text"}  # tower name in the export -> projections registry side


# ---------------------------------------------------------------------------- public API


def export(
    spec: str,
    out: str | os.PathLike[str],
    patches: Sequence[str | os.PathLike[str] | Patch] = (),
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Load ``spec`` (see forgetpack.engine.models), bake ``patches`` in, export to ``out``."""
    from forgetpack.engine.models import load_model

    _check_output(Path(out), force)
    loaded = load_model(spec)
    return export_loaded(loaded, out, patches, quantize=quantize, opset=opset, force=force, log=log)


def export_loaded(
    loaded: LoadedModel,
    out: str | os.PathLike[str],
    patches: Sequence[str | os.PathLike[str] | Patch] = (),
    quantize: str | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    towers: Sequence[str] = ("image", "text"),
) -> Manifest:
    """Export an already loaded model. The model is left as it was (patches are undone).

    ``towers`` limits the export to some towers (a text-only export serves ``encode_text``).
    """
    from forgetpack.engine.projections import find_projection
    from forgetpack.engine.torch_patch import apply_patches, read_matrices

    log = log or (lambda _msg: None)
    out = Path(out)
    _check_output(out, force)
    if quantize not in (None, "int8"):
        raise ForgetpackError(f"unknown quantization {quantize!r} (supported: int8)")
    unknown = sorted(set(towers) - set(SIDES))
    if unknown or not towers:
        raise ForgetpackError(f"unknown tower(s) {unknown} (towers: {', '.join(SIDES)})")
    model = loaded.model.eval()
    located = {tower: find_projection(model, side) for tower, side in SIDES.items() if tower in towers}
    targets = {p.target: p for p in located.values()}
    loaded_patches = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    for patch in loaded_patches:
        for name in patch.targets:
            if name not in targets:
                raise ForgetpackError(
                    f"{display_name(patch)}: targets {name!r}, which is not a projection of "
                    f"{loaded.model_id} in this export (its projections: {', '.join(sorted(targets))})"
                )
    base = read_matrices(model, targets)
    base_fps = {n: fingerprint(m) for n, m in base.items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        current_fps = apply_patches(model, loaded_patches) if loaded_patches else dict(base_fps)
        current_fps = {n: current_fps.get(n, base_fps[n]) for n in targets}
        export_id = _export_id(loaded.model_id, base_fps, current_fps, loaded_patches, quantize, opset)
        towers: dict[str, Tower] = {}
        projections: dict[str, Projection] = {}
        examples = _examples(loaded)
        checks: dict[str, float] = {}
        for tower, proj in located.items():
            log(f"exporting the {tower} tower ...")
            spec, entry, check = _export_tower(
                model, tower, examples[tower], proj, base_fps[proj.target], current_fps[proj.target],
                tmp / f"{tower}.onnx", opset, export_id,
            )
            towers[tower], projections[proj.target] = spec, entry
            checks[tower] = check
        if quantize == "int8":
            for tower in towers:
                log(f"quantizing the {tower} tower to int8 ...")
                quantize_tower(tmp / towers[tower].file, towers[tower], projections)
        tokenizer = _export_tokenizer(loaded, tmp)
        manifest = Manifest(
            model_id=loaded.model_id,
            arch=loaded.arch,
            embed_dim=int(examples["embed_dim"]),
            opset=opset,
            precision="int8" if quantize == "int8" else "fp32",
            export_id=export_id,
            towers=towers,
            projections=projections,
            preprocess=preprocess_settings(loaded.preprocess),
            tokenizer=tokenizer,
            logit_scale=float(model.logit_scale.exp().item()),
            logit_bias=float(model.logit_bias.item()) if getattr(model, "logit_bias", None) is not None else None,
            patches=[_patch_entry(p) for p in loaded_patches],
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            tool=f"forgetpack {__version__}",
            versions=_versions(),
            export_check=checks,
        )
        manifest.save(tmp)
        _publish(tmp, out)
        log(f"wrote {out}")
        return manifest
    finally:
        if loaded_patches:  # leave the caller's model as it was
            _restore(model, base)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- towers


class _Encode:
    """Make the torch module to export for one tower (a wrapper keeps model names under ``model.``)."""

    @staticmethod
    def module(model: Any, tower: str) -> torch.nn.Module:
        import torch

        class Encode(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return self.model.encode_image(x) if tower == "image" else self.model.encode_text(x)

        return Encode().eval()


def _examples(loaded: LoadedModel) -> dict[str, Any]:
    """Example inputs with batch 2 (so the batch axis is not specialised to 1) and the torch outputs."""
    import torch

    settings = preprocess_settings(loaded.preprocess)
    h, w = settings["size"]
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(2, 3, h, w, generator=generator)
    ids = loaded.tokenizer(["a photo of a cat.", "zero"])
    with torch.no_grad():
        embed_dim = loaded.model.encode_text(ids[:1]).shape[-1]
    return {"image": pixels, "text": ids, "embed_dim": embed_dim}


def _export_tower(
    model: Any,
    tower: str,
    example: torch.Tensor,
    proj: Any,
    base_fp: str,
    current_fp: str,
    path: Path,
    opset: int,
    export_id: str,
) -> tuple[Tower, Projection, float]:
    import onnx
    import torch

    module = _Encode.module(model, tower)
    input_name = "pixel_values" if tower == "image" else "input_ids"
    batch = torch.export.Dim("batch", min=1, max=65536)
    with _quiet():
        try:
            program = torch.onnx.export(
                module, (example,), None, dynamo=True, external_data=False, input_names=[input_name],
                output_names=["embeddings"], dynamic_shapes=({0: batch},), opset_version=opset,
            )
        except Exception as exc:
            raise ForgetpackError(f"ONNX export of the {tower} tower failed: {_one_line(exc)}") from exc
        proto: onnx.ModelProto = program.model_proto
    _strip_prefix(proto, "model.")
    node, bias = _projection_node(proto, tower, proj)
    matrix = _initializer(proto, proj.target)
    if matrix is None:
        raise ForgetpackError(f"projection target {proj.target!r} of the {tower} tower is not an initializer of the exported graph")
    got = fingerprint(matrix)
    if got != current_fp:
        raise ForgetpackError(
            f"the {tower} graph's initializer {proj.target!r} has fingerprint {got}, the model's matrix has {current_fp}: "
            "the exporter changed it (constant folding?), so patches could not be verified against it"
        )
    _add_features_output(proto, node, matrix.shape[0] if proj.layout == "in_out" else matrix.shape[1])
    _name_nodes(proto)
    _set_metadata(proto, {EXPORT_ID_KEY: export_id, "forgetpack.tower": tower})
    onnx.save_model(proto, str(path))
    reproject, check = _verify_tower(path, module, example, input_name, proj, matrix, bias, tower)
    spec = Tower(
        file=path.name,
        input=input_name,
        input_shape=["batch", *[int(d) for d in example.shape[1:]]],
        input_dtype="float32" if tower == "image" else "int64",
        projection=proj.target,
    )
    entry = Projection(
        tower=tower, initializer=proj.target, layout=proj.layout, shape=[int(d) for d in matrix.shape],
        base=base_fp, current=current_fp, bias=bias, reproject=reproject,
    )
    return spec, entry, check


def _strip_prefix(proto: onnx.ModelProto, prefix: str) -> None:
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


def _initializer(proto: onnx.ModelProto, name: str) -> np.ndarray | None:
    from onnx import numpy_helper

    for init in proto.graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    return None


def _projection_node(proto: onnx.ModelProto, tower: str, proj: Any) -> tuple[Any, str | None]:
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
        if any(a in attrs and abs(attrs[a].f - 1.0) > 0 for a in ("alpha",)):
            raise ForgetpackError(f"the {tower} graph's Gemm over {proj.target!r} scales it (alpha != 1)")
        if len(node.input) > 2 and node.input[2]:
            bias = node.input[2]
    elif proj.layout != "in_out":
        raise ForgetpackError(f"the {tower} graph multiplies by {proj.target!r} untransposed, but its layout is {proj.layout}")
    return node, bias


def _add_features_output(proto: onnx.ModelProto, node: Any, width: int) -> None:
    """Expose the projection's input as a second graph output, ``features``."""
    import onnx

    batch = proto.graph.output[0].type.tensor_type.shape.dim[0]
    proto.graph.node.append(onnx.helper.make_node("Identity", [node.input[0]], ["features"], name="forgetpack_features"))
    info = onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [batch.dim_param or batch.dim_value or "batch", width])
    proto.graph.output.append(info)


def _name_nodes(proto: onnx.ModelProto) -> None:
    """Give every node a unique name (quantization excludes nodes by name)."""
    seen: set[str] = set()
    for i, node in enumerate(proto.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def _set_metadata(proto: onnx.ModelProto, values: dict[str, str]) -> None:
    import onnx

    keep = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    onnx.helper.set_model_props(proto, {**{p.key: p.value for p in keep}, **values})


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _verify_tower(
    path: Path, module: Any, example: Any, input_name: str, proj: Any, matrix: np.ndarray, bias: str | None, tower: str
) -> tuple[bool, float]:
    """ONNX vs torch on the example; and whether ``features @ W (+ b)`` reproduces ``embeddings``."""
    import torch

    session = _session(path)
    embeddings, features = session.run(["embeddings", "features"], {input_name: example.numpy()})
    with torch.no_grad():
        expected = module(example).numpy()
    diff = float(np.abs(_normalise(embeddings) - _normalise(expected)).max())
    if not diff <= PARITY_TOLERANCE:
        raise ForgetpackError(f"the exported {tower} graph disagrees with torch: max abs difference {diff:.2e} on normalised embeddings")
    w = matrix.astype(np.float64)
    projected = features.astype(np.float64) @ (w if proj.layout == "in_out" else w.T)
    if bias is not None:
        proto_bias = _initializer_from_file(path, bias)
        if proto_bias is None:
            return False, diff
        projected = projected + proto_bias
    scale = max(float(np.abs(embeddings).max()), 1e-12)
    return bool(np.abs(projected - embeddings).max() <= 1e-4 * scale), diff


def _initializer_from_file(path: Path, name: str) -> np.ndarray | None:
    from forgetpack.format.onnxfile import OnnxFile

    info = OnnxFile(path).initializers.get(name)
    return None if info is None else info.array().astype(np.float64)


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------- quantization


def quantize_export(src: str | os.PathLike[str], out: str | os.PathLike[str], force: bool = False) -> Manifest:
    """An int8 copy of an fp32 export directory (no torch needed, no re-export).

    Same as ``forgetpack export --quantize int8`` but starting from the fp32 graphs, so one
    export can be served both ways (the benchmark and the tests use it).
    """
    src, out = Path(src), Path(out)
    _check_output(out, force)
    manifest = Manifest.read(src)
    if manifest.precision != "fp32":
        raise ForgetpackError(f"{src}: is already {manifest.precision}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        manifest.precision = "int8"
        manifest.export_id = "sha256:" + hashlib.sha256(f"{manifest.export_id}|int8".encode()).hexdigest()
        for tower in manifest.towers.values():
            shutil.copyfile(src / tower.file, tmp / tower.file)
            quantize_tower(tmp / tower.file, tower, manifest.projections, {EXPORT_ID_KEY: manifest.export_id})
        shutil.copyfile(src / manifest.tokenizer["file"], tmp / manifest.tokenizer["file"])
        manifest.save(tmp)
        _publish(tmp, out)
        return manifest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)



def quantize_tower(path: Path, tower: Tower, projections: dict[str, Projection], metadata: dict[str, str] | None = None) -> None:
    """Dynamic int8 quantization of MatMul/Gemm weights, in place, projection excluded.

    The projection stays a float32 initializer under its own name, so patches still apply
    (and hot-swap by re-projection still works) on an int8 export.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(str(path))
    exclude = _untangle_projection(proto, projections[tower.projection].initializer) if tower.projection else []
    metadata = {**{p.key: p.value for p in proto.metadata_props}, **(metadata or {})}
    staged = path.with_suffix(".staged.onnx")
    quantized = path.with_suffix(".int8.onnx")
    onnx.save_model(proto, str(staged))
    with _quiet():
        try:
            quantize_dynamic(
                str(staged), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=exclude,
            )
        except Exception as exc:
            raise ForgetpackError(f"int8 quantization of {path.name} failed: {_one_line(exc)}") from exc
        finally:
            staged.unlink()
    proto = onnx.load(str(quantized))
    _set_metadata(proto, metadata)
    if tower.projection is not None:
        proj = projections[tower.projection]
        matrix = _initializer(proto, proj.initializer)
        if matrix is None or fingerprint(matrix) != proj.current:
            raise ForgetpackError(f"int8 quantization changed the projection {proj.initializer!r} of {path.name}")
    if [o.name for o in proto.graph.output] != ["embeddings", "features"]:
        raise ForgetpackError(f"int8 quantization changed the outputs of {path.name}")
    onnx.save_model(proto, str(path))
    quantized.unlink()


def _untangle_projection(proto: onnx.ModelProto, initializer: str) -> list[str]:
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
        if initializer not in node.input:
            continue
        if node.op_type == "MatMul":
            return [node.name]
        if node.op_type != "Gemm":
            raise ForgetpackError(f"cannot quantize around the projection {initializer!r}: it feeds a {node.op_type}")
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


# ---------------------------------------------------------------------------- preprocessing


def preprocess_settings(transform: Any) -> dict[str, Any]:
    """open_clip's eval transform as replayable steps (runtime/preprocess.py) plus a summary.

    Read off the ``Compose`` the model was loaded with, so the export does what the torch
    model's own preprocess does; an unknown step is an error rather than a silent change.
    """
    steps: list[dict[str, Any]] = []
    for t in getattr(transform, "transforms", [transform]):
        kind = type(t).__name__
        if kind == "Resize":
            if getattr(t, "max_size", None) is not None:
                raise ForgetpackError("cannot export preprocessing: Resize with max_size")
            size = t.size
            interp = _interpolation(t.interpolation)
            if isinstance(size, int) or len(size) == 1:
                steps.append({"op": "resize_shortest", "size": int(size if isinstance(size, int) else size[0]), "interpolation": interp})
            else:
                steps.append({"op": "resize", "size": [int(s) for s in size], "interpolation": interp})
        elif kind == "ResizeKeepRatio":
            if t.random_scale_prob or t.random_aspect_prob:
                raise ForgetpackError("cannot export preprocessing: ResizeKeepRatio with random scaling (a training transform)")
            steps.append({"op": "resize_keep_ratio", "size": [int(s) for s in t.size], "longest": float(t.longest),
                          "interpolation": _interpolation(t.interpolation)})
        elif kind in ("CenterCrop", "CenterCropOrPad"):
            size = t.size if not isinstance(t.size, int) else (t.size, t.size)
            steps.append({"op": "center_crop", "size": [int(s) for s in size], "fill": int(getattr(t, "fill", 0) or 0)})
        elif kind == "MaybeConvertMode":
            steps.append({"op": "convert", "mode": t.mode})
        elif kind == "function" and getattr(t, "__name__", "") == "_convert_to_rgb":
            steps.append({"op": "convert", "mode": "RGB"})
        elif kind in ("ToTensor", "MaybeToTensor"):
            steps.append({"op": "to_tensor"})
        elif kind == "Normalize":
            steps.append({"op": "normalize", "mean": [float(m) for m in t.mean], "std": [float(s) for s in t.std]})
        else:
            raise ForgetpackError(f"cannot export preprocessing step {kind} (only open_clip's eval transforms are supported)")
    ops = [s["op"] for s in steps]
    if "to_tensor" not in ops or "normalize" not in ops:
        raise ForgetpackError(f"cannot export preprocessing {ops}: expected open_clip's eval transform")
    resize = next((s for s in steps if s["op"].startswith("resize")), None)
    crop = next((s for s in steps if s["op"] == "center_crop"), None)
    size = crop["size"] if crop else (resize["size"] if resize and isinstance(resize["size"], list) else [resize["size"]] * 2)
    norm = next(s for s in steps if s["op"] == "normalize")
    mode = {"resize_shortest": "shortest", "resize": "squash"}.get(resize["op"], None) if resize else None
    if resize and resize["op"] == "resize_keep_ratio":
        mode = "longest" if resize["longest"] >= 1 else "shortest"
    return {
        "size": [int(s) for s in size],
        "resize_mode": mode,
        "interpolation": resize["interpolation"] if resize else None,
        "crop": crop is not None,
        "fill": crop["fill"] if crop else 0,
        "mean": norm["mean"],
        "std": norm["std"],
        "steps": steps,
    }


def _interpolation(mode: Any) -> str:
    value = getattr(mode, "value", mode)
    if value not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        raise ForgetpackError(f"cannot export preprocessing: interpolation {mode!r}")
    return value


# ---------------------------------------------------------------------------- tokenizer


def _export_tokenizer(loaded: LoadedModel, out: Path) -> dict[str, Any]:
    """Write ``tokenizer.json`` and return the manifest's tokenizer settings."""
    from open_clip import tokenizer as oc

    tok = loaded.tokenizer
    cleans = {oc._clean_lower: "lower", oc._clean_whitespace: "whitespace", oc._clean_canonicalize: "canonicalize"}
    clean = cleans.get(getattr(tok, "clean_fn", None))
    if clean is None:
        raise ForgetpackError(f"cannot export tokenizer {type(tok).__name__}: unknown text cleaning")
    context = int(tok.context_length)
    if isinstance(tok, oc.SimpleTokenizer):
        from runtime.tokenizer import clip_bpe_tokenizer

        if tok.reduction_fn is not None:
            raise ForgetpackError("cannot export a tokenizer with a random reduction mask (training-only behaviour)")
        merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
        special = [t for t, i in sorted(tok.encoder.items(), key=lambda kv: kv[1]) if i in tok.all_special_ids]
        clip_bpe_tokenizer(tok.encoder, merges, special).save(str(out / "tokenizer.json"))
        return {"kind": "clip_bpe", "file": "tokenizer.json", "context_length": context, "clean": clean,
                "sot_id": int(tok.sot_token_id), "eot_id": int(tok.eot_token_id), "pad_id": 0}
    if isinstance(tok, oc.HFTokenizer):
        if tok.tokenizer_mode:
            raise ForgetpackError(f"cannot export an HF tokenizer in mode {tok.tokenizer_mode!r}")
        hf = tok.tokenizer
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ForgetpackError(f"cannot export HF tokenizer {type(hf).__name__}: it is not a fast (tokenizers-backed) tokenizer")
        (out / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
        return {"kind": "hf", "file": "tokenizer.json", "context_length": context, "clean": clean,
                "pad_id": int(hf.pad_token_id), "pad_token": str(hf.pad_token),
                "sep_id": int(hf.sep_token_id) if hf.sep_token_id is not None else None,
                "strip_sep_token": bool(tok.strip_sep_token),
                "truncation_side": getattr(hf, "truncation_side", "right"), "padding_side": getattr(hf, "padding_side", "right")}
    raise ForgetpackError(f"cannot export tokenizer {type(tok).__name__} (supported: open_clip SimpleTokenizer, HFTokenizer)")


# ---------------------------------------------------------------------------- helpers


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ForgetpackError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ForgetpackError(f"{out}: directory exists and is not empty (use --force to replace it)")
    if not out.resolve().parent.is_dir():
        raise ForgetpackError(f"{out}: parent directory {out.resolve().parent} does not exist")


def _publish(tmp: Path, out: Path) -> None:
    """Move the finished export into place (replacing an old one) with the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def _restore(model: Any, matrices: dict[str, np.ndarray]) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in matrices.items():
            params[name].copy_(torch.from_numpy(value))


def _export_id(model_id: str, base: dict[str, str], current: dict[str, str], patches: Sequence[Patch],
               quantize: str | None, opset: int) -> str:
    """A content id tying graphs to their manifest: same inputs, same id."""
    data = {"model": model_id, "base": base, "current": current, "patches": [p.digest for p in patches],
            "quantize": quantize, "opset": opset}
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _patch_entry(patch: Patch) -> dict[str, Any]:
    return {"digest": patch.digest, "model": patch.model, "targets": sorted(patch.targets),
            "forget": list(patch.recipe.get("forget", [])), "key_id": patch.key_id}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and warnings by the screenful; keep them out of the CLI's output."""
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


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
