"""Export a (patched) open_clip model to a self-contained ONNX directory for the runtime.

Layout of an export (docs/runtime.md has the manifest schema)::

    DIR/manifest.json     model id, base fingerprints, baked-in patches, opset, towers,
                          projection target -> ONNX initializer, preprocessing, tokenizer
    DIR/image.onnx        pixel_values [batch, 3, H, W] -> embeddings, features
    DIR/text.onnx         input_ids [batch, sequence] -> embeddings, features (sequence: up to
                          the context, dynamic where padding cannot change the result)
    DIR/tokenizer.json    for the ``tokenizers`` library (open_clip's BPE, or the HF tower's own)

This module puts the pieces together; one module per job:

- ``graph``: a tower as an ONNX graph whose projection a patch can still reach, verified
  against torch (why the graphs look the way they do is explained there);
- ``quantize``: int8 copies that keep the projections float32;
- ``preprocess``: open_clip's image transform as replayable steps;
- ``tokenizer``: the tokenizer as ``tokenizer.json``.

torch, open_clip and onnx are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack import __version__
from forgetpack.export.graph import PARITY_TOLERANCE, example_inputs, export_tower
from forgetpack.export.preprocess import preprocess_settings
from forgetpack.export.quantize import quantize_export, quantize_tower
from forgetpack.export.text_graph import parity_cases
from forgetpack.export.tokenizer import export_tokenizer
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import atomic_directory, check_output_dir
from forgetpack.format.fit import apply_in_order, targets_of
from forgetpack.format.manifest import ExportedProjection, Manifest, Tower
from forgetpack.format.patch import Patch, fingerprint, read_patch

if TYPE_CHECKING:
    from forgetpack.engine.models import LoadedModel

__all__ = ["DEFAULT_OPSET", "PARITY_TOLERANCE", "SUPPORTED_OPSETS", "check_opset", "export", "export_loaded", "preprocess_settings", "quantize_export"]

DEFAULT_OPSET = 18
# The opsets an export may ask for: 18 is the dynamo exporter's own (asked for less, it silently writes
# 18; asked for more than it knows, it writes graphs onnxruntime refuses), 20 the highest that every
# onnxruntime forgetpack supports (pyproject: onnxruntime>=1.17) loads. export_tower also checks the
# opset each graph was really written at, so the manifest never records one the graphs do not have.
SUPPORTED_OPSETS = range(18, 21)


def check_opset(opset: Any) -> int:
    """The one opset rule, checked before any work: a one-line ``ForgetpackError`` for anything else."""
    if type(opset) is not int or opset not in SUPPORTED_OPSETS:
        raise ForgetpackError(f"opset {opset!r} is not supported: exports are written at ONNX opset "
                              f"{SUPPORTED_OPSETS[0]} to {SUPPORTED_OPSETS[-1]}")
    return opset
PathLike = str | os.PathLike[str]
Patches = Sequence[PathLike | Patch]  # files or loaded patches, baked in this order
Progress = Callable[[str], None]  # receives one line per step
TOWERS = ("image", "text")


def export(spec: str, out: PathLike, patches: Patches = (), quantize: str | None = None, opset: int = DEFAULT_OPSET,
           force: bool = False, progress: Progress | None = None) -> Manifest:
    """Load ``spec`` (see forgetpack.engine.models), bake ``patches`` in, export to ``out``.

    ``progress`` receives a line per step (the library itself never prints).
    """
    from forgetpack.engine.models import load_model

    check_opset(opset)
    check_output_dir(out, force)  # before spending seconds loading the model
    loaded = load_model(spec)
    return export_loaded(loaded, out, patches, quantize=quantize, opset=opset, force=force, progress=progress)


def export_loaded(loaded: LoadedModel, out: PathLike, patches: Patches = (), quantize: str | None = None,
                  opset: int = DEFAULT_OPSET, force: bool = False, progress: Progress | None = None,
                  towers: Sequence[str] = ("image", "text")) -> Manifest:
    """Export an already loaded model. The model is left as it was (patches are undone).

    ``towers`` limits the export to some towers (a text-only export serves ``encode_text``).
    Every patch must fit (``forgetpack.format.fit``) the projections of the exported towers.
    """
    from forgetpack.engine.projections import find_projection
    from forgetpack.engine.torch_patch import read_matrices

    report = progress or (lambda _line: None)
    check_opset(opset)
    if quantize not in (None, "int8"):
        raise ForgetpackError(f"unknown quantization {quantize!r} (supported: int8)")
    unknown = sorted(set(towers) - set(TOWERS))
    if unknown or not towers:
        raise ForgetpackError(f"unknown tower(s) {unknown} (towers: {', '.join(TOWERS)})")
    model = loaded.model.eval()
    located = {tower: find_projection(model, tower) for tower in TOWERS if tower in towers}
    baked = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    base = read_matrices(model, [proj.target for proj in located.values()])
    targets = targets_of(base, layouts={proj.target: proj.layout for proj in located.values()})
    patched = apply_in_order(base, baked, targets, model=f"this export of {loaded.model_id}")
    base_fps = {n: fingerprint(m) for n, m in base.items()}
    current_fps = {n: fingerprint(m) for n, m in patched.items()}
    graph_id = _graph_id(loaded.model_id, base_fps, current_fps, baked, quantize, opset)
    preprocess = preprocess_settings(loaded.preprocess)
    examples, embed_dim = example_inputs(loaded, preprocess["size"])
    specs: dict[str, Tower] = {}
    projections: dict[str, ExportedProjection] = {}
    checks: dict[str, float] = {}

    def to_int8(path: Path, spec: Tower, entry: ExportedProjection) -> None:
        report(f"quantizing the {spec.file} graph to int8 ...")
        quantize_tower(path, spec, {entry.initializer: entry})

    with atomic_directory(out, replace=force) as tmp, _holding(model, patched, base):
        for tower, proj in located.items():
            report(f"exporting the {tower} tower ...")
            specs[tower], projections[proj.target], tower_checks = export_tower(
                model, tower, examples[tower], proj, base_fps[proj.target], current_fps[proj.target],
                tmp / f"{tower}.onnx", opset, graph_id, cases=parity_cases(loaded) if tower == "text" else (),
                quantize=to_int8 if quantize == "int8" else None,
            )
            checks.update(tower_checks)
        manifest = Manifest(
            model_id=loaded.model_id,
            arch=loaded.arch,
            embed_dim=embed_dim,
            opset=opset,
            precision="int8" if quantize == "int8" else "fp32",
            export_id="",
            graph_id=graph_id,
            towers=specs,
            projections=projections,
            preprocess=preprocess,
            tokenizer=export_tokenizer(loaded, tmp),
            logit_scale=float(model.logit_scale.exp().item()),
            logit_bias=float(model.logit_bias.item()) if getattr(model, "logit_bias", None) is not None else None,
            patches=[_patch_entry(p) for p in baked],
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            tool=f"forgetpack {__version__}",
            versions=_versions(),
            export_check=checks,
        ).seal()
        manifest.save(tmp)
    report(f"wrote {out}")
    return manifest


@contextlib.contextmanager
def _holding(model: Any, patched: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Iterator[None]:
    """The model holds the patched matrices while it is exported, and its own again afterwards."""
    from forgetpack.engine.torch_patch import write_matrices

    write_matrices(model, patched)
    try:
        yield
    finally:
        write_matrices(model, base)


def _graph_id(model_id: str, base: dict[str, str], current: dict[str, str], patches: Sequence[Patch],
               quantize: str | None, opset: int) -> str:
    """The id stamped into the graphs, tying them to their manifest: same inputs, same id."""
    data = {"model": model_id, "base": base, "current": current, "patches": [p.digest for p in patches],
            "quantize": quantize, "opset": opset}
    return "sha256:" + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _patch_entry(patch: Patch) -> dict[str, Any]:
    """A baked-in patch as the manifest records it; ``recipe`` lets the runtime refuse a regenerated duplicate."""
    return {"digest": patch.digest, "model": patch.model, "targets": sorted(patch.targets),
            "forget": list(patch.recipe.get("forget", [])), "key_id": patch.key_id, "recipe": patch.recipe_key}


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import open_clip
    import torch

    return {"torch": torch.__version__, "open_clip": open_clip.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}
