"""The export manifest: what an export directory holds and how the runtime must use it.

One JSON file (``manifest.json``) written by ``forgetpack export`` and read by every
backend. The schema is documented in docs/runtime.md; this module is its single definition,
shared by the exporter (torch side) and the runtime (torch-free), so the two cannot drift.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.manifest_schema import validate_manifest

FORMAT = "forgetpack.export"
VERSION = 2  # 2: graph_id ties graphs to the manifest; export_id is the hash of the manifest's content
MANIFEST = "manifest.json"
GRAPH_ID_KEY = "forgetpack.graph_id"  # ONNX metadata_props key tying a graph to its manifest
# Fields that describe the run rather than the export: left out of the content hash.
UNHASHED = ("export_id", "created", "tool", "versions", "export_check")


def content_hash(data: dict[str, Any]) -> str:
    """sha256 of a manifest's JSON without the fields that describe the run (``UNHASHED``)."""
    content = {k: v for k, v in data.items() if k not in UNHASHED}
    return "sha256:" + hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


@dataclass
class Tower:
    """One ONNX graph: its file, its input, and its two outputs.

    ``embeddings`` is the tower's output as open_clip's ``encode_*`` returns it (not
    normalised); ``features`` is the input of the final projection, exposed so a runtime can
    re-project with a hot-swapped matrix. ``projection`` names the patch target (or None).
    """

    file: str
    input: str
    input_shape: list[int | str]  # "batch" for the dynamic axis; text: "sequence" when any length up to the context works
    input_dtype: str  # "float32" | "int64"
    embeddings: str = "embeddings"
    features: str | None = "features"
    projection: str | None = None


@dataclass
class ExportedProjection:
    """A patchable projection matrix and the ONNX initializer that holds it."""

    tower: str  # "image" | "text"
    initializer: str
    layout: str  # "in_out" (y = x @ W) | "out_in" (y = x @ W.T)
    shape: list[int]
    base: str  # fingerprint of the unpatched matrix (what patches are made for)
    current: str  # fingerprint of the matrix in the graph (base + baked-in patches)
    bias: str | None = None  # initializer of a bias added after the matrix, if any
    reproject: bool = True  # embeddings == features @ W (+ bias): hot-swap by re-projection


@dataclass
class Manifest:
    model_id: str
    arch: str
    embed_dim: int
    opset: int
    precision: str  # "fp32" | "int8"
    export_id: str  # sha256 of the manifest's content (content_id): any edit shows
    graph_id: str  # stamped into every graph of the export
    towers: dict[str, Tower]
    projections: dict[str, ExportedProjection]
    preprocess: dict[str, Any]
    tokenizer: dict[str, Any]
    logit_scale: float
    patches: list[dict[str, Any]] = field(default_factory=list)  # baked in, in order
    logit_bias: float | None = None
    created: str = ""
    tool: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    export_check: dict[str, float] = field(default_factory=dict)  # max abs ONNX vs torch (normalised), per tower
    format: str = FORMAT
    version: int = VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def content_id(self) -> str:
        """The hash of everything the runtime relies on: what ``export_id`` must be."""
        return content_hash(self.to_json())

    def seal(self) -> Manifest:
        """Set ``export_id`` from the content; call after the last change."""
        self.export_id = self.content_id()
        return self

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = Path(directory) / MANIFEST
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
        return path

    @classmethod
    def read(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read and validate ``DIR/manifest.json``; anything wrong is a one-line error."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise ForgetpackError(f"{directory}: not a directory (expected a forgetpack export)")
        if not path.is_file():
            raise ForgetpackError(f"{directory}: not a forgetpack export (no {MANIFEST}; create one with 'forgetpack export')")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except RecursionError:
            raise ForgetpackError(f"{path}: unreadable manifest (nested too deeply)") from None
        except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: bad JSON, 5,000-digit numbers
            raise ForgetpackError(f"{path}: unreadable manifest ({str(exc)[:120]})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ForgetpackError(f"{path}: not a forgetpack export manifest (format is {data.get('format') if isinstance(data, dict) else None!r})")
        if data.get("version") != VERSION:
            raise ForgetpackError(f"{path}: export manifest version {data.get('version')!r} is not supported (this runtime reads {VERSION})")
        validate_manifest(data, str(path))
        try:
            towers = {name: Tower(**t) for name, t in data.pop("towers").items()}
            projections = {name: ExportedProjection(**p) for name, p in data.pop("projections").items()}
            manifest = cls(towers=towers, projections=projections, **data)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ForgetpackError(f"{path}: malformed manifest ({exc})") from None
        for name, tower in manifest.towers.items():
            if tower.projection is not None and tower.projection not in manifest.projections:
                raise ForgetpackError(f"{path}: tower {name!r} names projection {tower.projection!r}, which the manifest lacks")
        if manifest.export_id != manifest.content_id():
            raise ForgetpackError(f"{path}: the manifest was modified after export (its export id does not match its content)")
        for target, proj in manifest.projections.items():
            if not manifest.patches and proj.base != proj.current:
                raise ForgetpackError(f"{path}: projection {target!r} has no baked patches, yet its base and current fingerprints differ")
        return manifest

    @property
    def base_fingerprints(self) -> dict[str, str]:
        return {name: p.base for name, p in self.projections.items()}
