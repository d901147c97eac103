"""Apply and revert patches on safetensors checkpoints (e.g. open_clip_model.safetensors).

A patched checkpoint records, under the metadata key ``forgetpack``, the fingerprints of
its base target matrices and, for each applied patch, its digest and the fingerprints
after it. It never records the original matrices or the patch tensors: a deployed
artifact must not carry the way back to what was forgotten (docs/threat-model.md).

Revert is exact by construction when the base is at hand: the result is *recomputed* as
base + remaining patches with the same deterministic apply, so it is byte-identical to
applying the remaining patches to the base directly. Without the base, revert subtracts
the update in float64 and checks the result against the recorded fingerprint of the state
before the patch; it says plainly whether the result is exact.

Tensors that no patch touches are copied as raw bytes (bf16 included), so apply never
changes anything but the targets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import CheckpointError, PatchError
from forgetpack.format.fileio import RawTensor, read_safetensors, save_safetensors
from forgetpack.format.fit import TargetInfo, apply_in_order, check_fit, display_name, patchable_names, recorded_marks
from forgetpack.format.patch import Patch, fingerprint

RECORD_KEY = "forgetpack"
RECORD_FORMAT = "forgetpack.checkpoint"


@dataclass
class Record:
    """What a patched checkpoint says about itself."""

    base: dict[str, str] = field(default_factory=dict)  # target -> base fingerprint
    applied: list[dict[str, Any]] = field(default_factory=list)  # [{digest, model, after, recipe?}]
    current: dict[str, str] = field(default_factory=dict)  # target -> fingerprint now
    exact: bool = True  # False once an inexact (base-less) revert has happened

    def to_json(self) -> str:
        data = {
            "format": RECORD_FORMAT,
            "version": 1,
            "base": self.base,
            "applied": self.applied,
            "current": self.current,
            "exact": self.exact,
        }
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_metadata(cls, path: Path, metadata: Mapping[str, str]) -> Record | None:
        text = metadata.get(RECORD_KEY)
        if text is None:
            return None
        try:
            data = json.loads(text)
            if data.get("format") != RECORD_FORMAT or data.get("version") != 1:
                raise ValueError("unknown record format")
            record = cls(dict(data["base"]), list(data["applied"]), dict(data["current"]), bool(data["exact"]))
            for entry in record.applied:
                if not (isinstance(entry["digest"], str) and isinstance(entry["after"], dict)):
                    raise ValueError("bad entry")
            return record
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise CheckpointError(f"{path}: malformed '{RECORD_KEY}' metadata") from None


@dataclass
class Checkpoint:
    """A safetensors state dict held raw, with its forgetpack record (if patched)."""

    path: Path
    tensors: dict[str, RawTensor]
    metadata: dict[str, str]
    record: Record | None

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> Checkpoint:
        path = Path(path)
        tensors, metadata = read_safetensors(path, what="checkpoint", error=CheckpointError)
        return cls(path, tensors, metadata, Record.from_metadata(path, metadata))

    def matrix(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise CheckpointError(f"{self.path}: has no tensor {name!r} (the patch targets it)")
        raw = self.tensors[name]
        if raw.dtype not in ("F32", "F16", "F64"):
            raise CheckpointError(f"{self.path}: tensor {name!r} is {raw.dtype}; patch targets must be F32, F16 or F64")
        return raw.to_array()

    def fingerprints(self, names: Sequence[str]) -> dict[str, str]:
        return {n: fingerprint(self.matrix(n)) for n in names}

    def base_fingerprints(self, names: Sequence[str]) -> dict[str, str]:
        """Base fingerprints: recorded ones, or the current matrices' for unpatched targets.

        After an inexact (base-less) revert the matrices are no longer bit-identical to any
        recorded state, so nothing made for the base can be said to fit them."""
        recorded = self.record.base if self.record else {}
        if self.record and not self.record.exact and any(n in recorded for n in names):
            raise CheckpointError(f"{self.path}: is not bit-identical to its base after an inexact revert; "
                                  "rebuild it with 'forgetpack revert --base BASE' first")
        touched = {n for e in (self.record.applied if self.record else []) for n in e["after"]}
        out = {}
        for name in names:
            if name in recorded:
                out[name] = recorded[name]
            elif name in touched:
                raise CheckpointError(f"{self.path}: record lacks the base fingerprint of {name!r}")
            else:
                out[name] = fingerprint(self.matrix(name))
        return out

    @property
    def applied(self) -> list[str]:
        """What the fit check needs to refuse a patch already applied: digests and recipe keys (``fit.marks``)."""
        return recorded_marks(self.record.applied) if self.record else []

    def targets(self, names: Sequence[str]) -> dict[str, TargetInfo]:
        """The named matrices as the fit check sees them: shape and base fingerprint."""
        base = self.base_fingerprints(names)
        return {n: TargetInfo(tuple(self.matrix(n).shape), base[n]) for n in names}

    def check_untampered(self) -> None:
        """The targets must still have the fingerprints the record says they have."""
        if not self.record:
            return
        for name, expected in self.record.current.items():
            if name in self.tensors and fingerprint(self.matrix(name)) != expected:
                raise CheckpointError(
                    f"{self.path}: {name!r} was modified after patching (fingerprint {fingerprint(self.matrix(name))}, "
                    f"record says {expected})"
                )


def check_fits(patch: Patch, checkpoint: Checkpoint) -> None:
    """Raise unless ``patch`` applies to ``checkpoint`` as it is now (the one rule: ``fit.check_fit``)."""
    names = sorted(patch.targets)
    present = [n for n in names if n in checkpoint.tensors]
    state = checkpoint.fingerprints(present) if patch.parent is not None else None
    check_fit(patch, checkpoint.targets(present), model=str(checkpoint.path), state=state, applied=checkpoint.applied,
              patchable=patchable_names(checkpoint.tensors))


def patched_tensors(checkpoint: Checkpoint, patches: Sequence[Patch]) -> tuple[dict[str, RawTensor], Record]:
    """Apply ``patches`` in order to a checkpoint in memory; returns tensors and the new record."""
    checkpoint.check_untampered()
    names = sorted({n for p in patches for n in p.targets if n in checkpoint.tensors})
    old = checkpoint.record or Record()
    record = Record(dict(old.base), list(old.applied), dict(old.current), old.exact)
    targets = checkpoint.targets(names)
    record.base.update({n: t.base for n, t in targets.items()})
    current = {n: checkpoint.matrix(n) for n in names}
    for patch in patches:
        current = apply_in_order(current, [patch], targets, model=str(checkpoint.path), applied=recorded_marks(record.applied),
                                 patchable=patchable_names(checkpoint.tensors))
        after = {n: fingerprint(current[n]) for n in sorted(patch.targets)}
        entry = {"digest": patch.digest, "model": patch.model, "after": after}
        record.applied.append(entry if patch.recipe_key is None else {**entry, "recipe": patch.recipe_key})
        record.current.update(after)
    tensors = dict(checkpoint.tensors)
    tensors.update({n: RawTensor.from_array(m) for n, m in current.items()})
    return tensors, record


def _write(out: str | os.PathLike[str], checkpoint: Checkpoint, tensors: dict[str, RawTensor], record: Record) -> None:
    metadata = dict(checkpoint.metadata)
    metadata[RECORD_KEY] = record.to_json()
    save_safetensors(out, tensors, metadata)


def apply_to_file(checkpoint_path: str | os.PathLike[str], patches: Sequence[Patch], out: str | os.PathLike[str]) -> Record:
    """Write ``checkpoint`` with ``patches`` applied in order to ``out`` (atomically)."""
    checkpoint = Checkpoint.read(checkpoint_path)
    tensors, record = patched_tensors(checkpoint, patches)
    _write(out, checkpoint, tensors, record)
    return record


@dataclass
class RevertResult:
    record: Record
    exact: bool
    how: str


def revert_file(
    checkpoint_path: str | os.PathLike[str],
    patch: Patch,
    out: str | os.PathLike[str],
    base_path: str | os.PathLike[str] | None = None,
    others: Sequence[Patch] = (),
) -> RevertResult:
    """Remove ``patch`` from a patched checkpoint.

    With ``base_path``: the result is base + the remaining patches (``others`` must be
    exactly those, in any order; the recorded order is used), byte-identical to applying
    them to the base. Without it: the update is subtracted and the result is exact only if
    it matches the recorded fingerprints of the state before ``patch``.
    """
    checkpoint = Checkpoint.read(checkpoint_path)
    record = checkpoint.record
    if record is None or not record.applied:
        raise CheckpointError(f"{checkpoint.path}: has no forgetpack patches applied")
    checkpoint.check_untampered()
    digests = [e["digest"] for e in record.applied]
    if patch.digest not in digests:
        raise PatchError(f"{display_name(patch)}: was not applied to {checkpoint.path} (applied: {', '.join(d[:15] for d in digests)})")
    index = digests.index(patch.digest)
    remaining = digests[:index] + digests[index + 1 :]

    if base_path is not None:
        base = Checkpoint.read(base_path)
        if base.record is not None and base.record.applied:
            raise CheckpointError(f"{base.path}: is itself patched; give the unpatched base")
        fps = base.fingerprints(sorted(record.base))
        for name, expected in record.base.items():
            if fps[name] != expected:
                raise CheckpointError(f"{base.path}: is not the base of {checkpoint.path} ({name!r} is {fps[name]}, record says {expected})")
        by_digest = {p.digest: p for p in others}
        lacking = [d for d in remaining if d not in by_digest]
        if lacking:
            raise CheckpointError(f"{checkpoint.path}: to rebuild exactly, also give the remaining patch(es) {', '.join(d[:23] for d in lacking)}")
        unknown = [str(p.source) for d, p in by_digest.items() if d not in remaining]
        if unknown:
            raise PatchError(f"{unknown[0]}: is not among the remaining patches of {checkpoint.path}")
        tensors, new_record = patched_tensors(base, [by_digest[d] for d in remaining])
        # Tensors the patches never touch come from the patched checkpoint, unchanged.
        merged = dict(checkpoint.tensors)
        merged.update({n: tensors[n] for n in record.base})
        if not remaining:
            metadata = {k: v for k, v in checkpoint.metadata.items() if k != RECORD_KEY}
            save_safetensors(out, merged, metadata)
        else:
            _write(out, checkpoint, merged, new_record)
        return RevertResult(new_record, True, "rebuilt from the base: exact")

    current = {n: checkpoint.matrix(n) for n in patch.targets}
    for layer in reversed(patch.layers):
        m = current[layer.target]
        current[layer.target] = (m.astype(np.float64) - layer.delta()).astype(m.dtype)
    before = dict(record.base)
    for entry in record.applied[:index]:
        before.update(entry["after"])
    got = {n: fingerprint(m) for n, m in current.items()}
    last_for_targets = all(n not in e["after"] for e in record.applied[index + 1 :] for n in patch.targets)
    exact = record.exact and last_for_targets and all(got[n] == before[n] for n in got)
    applied = [e for i, e in enumerate(record.applied) if i != index]
    new_record = Record(dict(record.base), applied, {**record.current, **got}, exact)
    tensors = dict(checkpoint.tensors)
    tensors.update({n: RawTensor.from_array(m) for n, m in current.items()})
    if not applied and exact:
        metadata = {k: v for k, v in checkpoint.metadata.items() if k != RECORD_KEY}
        save_safetensors(out, tensors, metadata)
    else:
        _write(out, checkpoint, tensors, new_record)
    if exact:
        return RevertResult(new_record, True, "subtracted; matches the recorded pre-patch fingerprints: exact")
    return RevertResult(
        new_record,
        False,
        "subtracted in float64: NOT bit-exact (rounding); give --base and the remaining patches for an exact result",
    )
