"""The forget patch: a few kilobytes of safetensors that change a CLIP's projection matrices.

The spec is docs/patch-format.md. In short: each *layer* is one additive update of one
target matrix, stored as low-rank factors ``up @ down`` (or a dense ``delta``) in the
target's own storage layout; the metadata binds the patch to its base by sha256
fingerprints and carries the recipe, the measured effect and a content digest, plus an
optional ed25519 signature.

Layers apply exactly (``forgetpack.format.layer``), which makes ``apply`` reproducible
bit for bit and lets ``revert`` rebuild "base + remaining patches" instead of subtracting.

This module imports numpy and safetensors only (never torch).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack import __version__
from forgetpack.format.errors import PatchError
from forgetpack.format.fileio import RawTensor, read_safetensors, save_safetensors, serialize
from forgetpack.format.layer import LAYOUTS, Layer, Target, check_tensor, fingerprint
from forgetpack.format.metadata import (
    FORMAT,
    UNSIGNED_KEYS,
    VERSION,
    check_fingerprints,
    check_metadata,
    check_signature_fields,
    creation_time,
    decode,
    describe,
    dumps,
    loads,
    recipe_key,
)
from forgetpack.format.metadata import digest as content_digest

__all__ = ["FORMAT", "LAYOUTS", "Layer", "Patch", "Target", "VERSION", "describe", "display_name", "fingerprint",
           "read_patch", "stack"]

MAX_PATCH_BYTES = 32 * 1024 * 1024  # a patch is kilobytes; refuse to read giants
MAX_LAYERS = 256  # stacking concatenates layers; more than this is no longer a patch


@dataclass(frozen=True)
class Patch:
    """A verified forget patch. Build with :meth:`create` or :func:`stack`, read with :func:`read_patch`."""

    model: str
    targets: dict[str, Target] = field(repr=False)
    base: dict[str, str]  # target -> fingerprint of the base matrix
    layers: tuple[Layer, ...] = field(repr=False)  # arrays: print(model.patches) must stay one line a patch
    parent: dict[str, str] | None = None  # fingerprints it was computed on, when not the base
    result: dict[str, str] | None = None  # fingerprints after applying it, when known
    recipe: dict[str, Any] = field(default_factory=dict, repr=False)
    effect: dict[str, Any] = field(default_factory=dict, repr=False)
    components: tuple[dict[str, Any], ...] = field(default=(), repr=False)  # for stacked patches: what was stacked
    created: str = ""
    tool: str = f"forgetpack {__version__}"
    signature: str | None = None
    key_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)  # unknown metadata keys, kept and digested
    source: Path | None = field(default=None, compare=False)

    # -- construction ----------------------------------------------------------------

    @classmethod
    def create(
        cls,
        model: str,
        base: Mapping[str, np.ndarray],
        layers: Sequence[Layer],
        layouts: Mapping[str, str] | None = None,
        parent: Mapping[str, np.ndarray] | None = None,
        recipe: Mapping[str, Any] | None = None,
        effect: Mapping[str, Any] | None = None,
    ) -> Patch:
        """Make a patch from the matrices it was computed on.

        ``base`` holds the base model's target matrices (for fingerprints). When the patch
        was computed on top of other patches, ``parent`` holds those current matrices: the
        patch then applies only on exactly that state.
        """
        layouts = dict(layouts or {})
        targets = {}
        for layer in layers:
            if layer.target not in base:
                raise PatchError(f"layer target {layer.target!r} has no base matrix")
        for name in sorted({layer.target for layer in layers}):
            shape = tuple(int(d) for d in base[name].shape)
            targets[name] = Target(name, shape, layouts.get(name, "in_out"))
        start = dict(parent) if parent is not None else {n: base[n] for n in targets}
        end = dict(start)
        for layer in layers:
            end[layer.target] = layer.apply(end[layer.target])
        patch = cls(
            model=model,
            targets=targets,
            base={n: fingerprint(base[n]) for n in targets},
            parent={n: fingerprint(start[n]) for n in targets} if parent is not None else None,
            result={n: fingerprint(end[n]) for n in targets},
            layers=tuple(layers),
            recipe=dict(recipe or {}),
            effect=dict(effect or {}),
            created=creation_time(),  # empty unless asked (SOURCE_DATE_EPOCH): same request, same bytes
        )
        patch.validate()
        return patch

    # -- content ---------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return sum(layer.rank for layer in self.layers)

    def tensors(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.layers):
            out.update(layer.tensors(i))
        return out

    def delta(self, target: str) -> np.ndarray:
        """The total float64 update of one target (for analysis; apply goes layer by layer)."""
        shape = self.targets[target].shape
        total = np.zeros(shape, dtype=np.float64)
        for layer in self.layers:
            if layer.target == target:
                total += layer.delta()
        return total

    def apply(self, matrices: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Apply every layer in order to the given target matrices (a new dict)."""
        out = dict(matrices)
        for layer in self.layers:
            out[layer.target] = layer.apply(out[layer.target])
        return out

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` strings, signature fields included when present."""
        meta = dict(self.extra)
        meta.update(
            {
                "format": FORMAT,
                "format_version": str(VERSION),
                "model": self.model,
                "targets": dumps({n: t.to_json() for n, t in self.targets.items()}),
                "layers": dumps([{"target": lay.target, "kind": lay.kind, "rank": lay.rank} for lay in self.layers]),
                "base": dumps(self.base),
                "parent": dumps(self.parent),
                "result": dumps(self.result),
                "recipe": dumps(self.recipe),
                "effect": dumps(self.effect),
                "components": dumps(list(self.components)),
                "created": self.created,
                "tool": self.tool,
            }
        )
        meta["digest"] = content_digest(self.tensors(), meta)
        if self.signature is not None:
            meta["signature"] = self.signature
            meta["key_id"] = self.key_id or ""
        return meta

    @cached_property
    def digest(self) -> str:
        """The content digest, computed once per instance (hashing every tensor is not free, and
        services key their caches by it); ``dataclasses.replace`` makes a new instance, a new digest."""
        return self.metadata()["digest"]

    @cached_property
    def recipe_key(self) -> str | None:
        """The request this patch answers, on its base (``metadata.recipe_key``): what a regenerated duplicate shares."""
        return recipe_key(self.recipe, self.base)

    def to_bytes(self) -> bytes:
        return serialize({k: RawTensor.from_array(v) for k, v in self.tensors().items()}, self.metadata())

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the patch atomically; returns the path."""
        self.validate()
        save_safetensors(path, {k: RawTensor.from_array(v) for k, v in self.tensors().items()}, self.metadata())
        return Path(path)

    # -- checks ----------------------------------------------------------------------

    def validate(self) -> None:
        """Structural checks shared by construction and reading; raises ``PatchError``."""
        where = f"{self.source}: " if self.source else ""
        if not self.layers:
            raise PatchError(f"{where}patch has no layers")
        for name, target in self.targets.items():
            if target.layout not in LAYOUTS:
                raise PatchError(f"{where}target {name!r} has unknown layout {target.layout!r}")
            if len(target.shape) != 2 or min(target.shape) <= 0:
                raise PatchError(f"{where}target {name!r} has invalid shape {list(target.shape)}")
            if name not in self.base:
                raise PatchError(f"{where}target {name!r} has no base fingerprint")
        check_fingerprints(where, self.targets, base=self.base, parent=self.parent, result=self.result)
        if len(self.layers) > MAX_LAYERS:
            raise PatchError(f"{where}patch has {len(self.layers)} layers (at most {MAX_LAYERS})")
        if not all(isinstance(c, dict) for c in self.components):
            raise PatchError(f"{where}metadata 'components' must be a list of objects")
        check_metadata(where, self.recipe, self.effect, self.components)
        for i, layer in enumerate(self.layers):
            if layer.target not in self.targets:
                raise PatchError(f"{where}layer {i} changes undeclared target {layer.target!r}")
            rows, cols = self.targets[layer.target].shape
            if layer.dense is not None:
                check_tensor(where, f"layers.{i}.{layer.target}.delta", layer.dense, (rows, cols))
            else:
                if layer.up is None or layer.down is None or layer.up.ndim != 2:
                    raise PatchError(f"{where}layer {i} lacks its low-rank factors")
                rank = layer.up.shape[1]
                if not 1 <= rank <= min(rows, cols):
                    raise PatchError(f"{where}layer {i} has rank {rank} (a {rows}x{cols} target needs 1 to {min(rows, cols)})")
                check_tensor(where, f"layers.{i}.{layer.target}.up", layer.up, (rows, rank))
                check_tensor(where, f"layers.{i}.{layer.target}.down", layer.down, (rank, cols))
        unused = set(self.targets) - {layer.target for layer in self.layers}
        if unused:
            raise PatchError(f"{where}targets declared but never changed: {sorted(unused)}")


def display_name(patch: Patch) -> str:
    """How every message names a patch: its file, or the start of its digest when it has none."""
    return str(patch.source) if patch.source is not None else f"{patch.digest[:23]}…"


# ---------------------------------------------------------------------------- reading


def read_patch(path: str | os.PathLike[str]) -> Patch:
    """Read and fully validate a patch file; any problem is a one-line ``PatchError``.

    Checks: safetensors structure, format name and version, metadata schema, the exact
    set of tensors with their dtypes and shapes, finite values, and the content digest.
    A signature is checked only by :func:`forgetpack.format.signing.verify_signature`.
    """
    path = Path(path)
    if path.is_file() and path.stat().st_size > MAX_PATCH_BYTES:
        raise PatchError(f"{path}: too large for a patch ({path.stat().st_size} bytes)")
    raw, meta = read_safetensors(path, what="patch", error=PatchError)
    try:
        return _parse(path, raw, meta)
    except PatchError:
        raise
    except Exception as exc:  # malformed metadata of any shape is a user error, not a crash
        raise PatchError(f"{path}: malformed patch metadata ({type(exc).__name__}: {str(exc)[:120]})") from None


def _parse(path: Path, raw: Mapping[str, RawTensor], meta: Mapping[str, str]) -> Patch:
    if meta.get("format") != FORMAT:
        raise PatchError(f"{path}: not a forgetpack patch (metadata 'format' is {meta.get('format')!r})")
    version = meta.get("format_version")
    if version != str(VERSION):
        raise PatchError(f"{path}: unsupported patch format version {version!r} (this forgetpack reads {VERSION})")
    missing = [k for k in ("model", "targets", "layers", "base", "digest") if k not in meta]
    if missing:
        raise PatchError(f"{path}: metadata lacks {', '.join(missing)}")

    def load(key: str, kind: type, default: Any = None) -> Any:
        if key not in meta:
            return default
        value = loads(f"{path}: ", key, meta[key])
        if value is None and default is None:
            return None
        if not isinstance(value, kind):
            raise PatchError(f"{path}: metadata {key!r} should be a JSON {kind.__name__}")
        return value

    targets_json = load("targets", dict)
    targets = {}
    for name, info in targets_json.items():
        shape = info["shape"]
        if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int for d in shape)):
            raise PatchError(f"{path}: target {name!r} has invalid shape {shape!r}")
        targets[name] = Target(name, (shape[0], shape[1]), str(info.get("layout", "")))
    layer_specs = load("layers", list)

    expected: set[str] = set()
    layers = []
    for i, spec in enumerate(layer_specs):
        target, kind = spec["target"], spec["kind"]
        if target not in targets:
            raise PatchError(f"{path}: layer {i} changes undeclared target {target!r}")
        prefix = f"layers.{i}.{target}"
        names = [f"{prefix}.delta"] if kind == "dense" else [f"{prefix}.up", f"{prefix}.down"]
        if kind not in ("dense", "lowrank"):
            raise PatchError(f"{path}: layer {i} has unknown kind {kind!r}")
        expected.update(names)
        absent = [n for n in names if n not in raw]
        if absent:
            raise PatchError(f"{path}: missing tensor {absent[0]}")
        arrays = [decode(path, n, raw[n]) for n in names]
        layer = Layer(target, dense=arrays[0]) if kind == "dense" else Layer(target, up=arrays[0], down=arrays[1])
        if kind == "lowrank" and layer.up.ndim == 2 and layer.rank != spec.get("rank"):
            raise PatchError(f"{path}: layer {i} declares rank {spec.get('rank')} but stores {layer.rank}")
        layers.append(layer)
    extra_tensors = sorted(set(raw) - expected)
    if extra_tensors:
        raise PatchError(f"{path}: unexpected tensor {extra_tensors[0]}")

    known = {
        "format", "format_version", "model", "targets", "layers", "base", "parent", "result", "recipe",
        "effect", "components", "created", "tool", *UNSIGNED_KEYS,
    }  # fmt: skip
    base = load("base", dict)
    patch = Patch(
        model=str(meta["model"]),
        targets=targets,
        base={str(k): str(v) for k, v in base.items()},
        layers=tuple(layers),
        parent=load("parent", dict),
        result=load("result", dict),
        recipe=load("recipe", dict, {}),
        effect=load("effect", dict, {}),
        components=tuple(load("components", list, [])),
        created=meta.get("created", ""),
        tool=meta.get("tool", ""),
        signature=meta.get("signature"),
        key_id=meta.get("key_id"),
        extra={k: v for k, v in meta.items() if k not in known},
        source=path,
    )
    patch.validate()
    check_signature_fields(path, patch)
    unsigned = {k: v for k, v in meta.items() if k not in UNSIGNED_KEYS}
    actual = content_digest(patch.tensors(), unsigned)
    if actual != meta["digest"]:
        raise PatchError(f"{path}: content digest mismatch (file says {meta['digest'][:23]}…, content is {actual[:23]}…): the patch was modified")
    return patch


# ---------------------------------------------------------------------------- stacking


def stack(patches: Sequence[Patch]) -> Patch:
    """One patch whose application equals applying ``patches`` in order, bit for bit.

    The layers are concatenated, so the stacked patch applies each original update with
    its own rounding step: ``apply(stack([a, b])) == apply(b, apply(a))`` exactly.
    """
    if not patches:
        raise PatchError("nothing to stack")
    models = {p.model for p in patches}
    if len(models) > 1:
        raise PatchError(f"cannot stack patches for different models: {sorted(models)}")
    targets: dict[str, Target] = {}
    base: dict[str, str] = {}
    parent: dict[str, str] = {}
    current: dict[str, str | None] = {}  # fingerprint after the patches so far, when known
    for p in patches:
        where = display_name(p)
        for name, t in p.targets.items():
            if name in targets and targets[name] != t:
                raise PatchError(f"{where}: target {name!r} is {list(t.shape)} {t.layout}, earlier patches say {list(targets[name].shape)} {targets[name].layout}")
            targets.setdefault(name, t)
            if name in base and base[name] != p.base[name]:
                raise PatchError(f"{where}: base fingerprint of {name!r} is {p.base[name]}, earlier patches were made for {base[name]}")
            base.setdefault(name, p.base[name])
            if p.parent is not None:
                if name in current:
                    if current[name] is not None and current[name] != p.parent[name]:
                        raise PatchError(f"{where}: computed on {p.parent[name]} for {name!r}, but the patches before it lead to {current[name]}")
                else:
                    parent[name] = p.parent[name]
            elif name in current:
                # Made on the base but stacked after another change of the same matrix:
                # allowed (deltas add), but the end state is no longer known in advance.
                current[name] = None
                continue
            current[name] = (p.result or {}).get(name)
    components = []
    for p in patches:
        components.extend(p.components or [{"digest": p.digest, "model": p.model, "recipe": p.recipe, "layers": len(p.layers)}])
    result = {n: fp for n, fp in current.items() if fp is not None}
    return Patch(
        model=patches[0].model,
        targets=dict(sorted(targets.items())),
        base=base,
        layers=tuple(layer for p in patches for layer in p.layers),
        parent=parent or None,
        result=result if len(result) == len(targets) else None,
        recipe={"stacked": [p.digest for p in patches]},
        effect={},
        components=tuple(components),
        created=max(p.created for p in patches),
    )
