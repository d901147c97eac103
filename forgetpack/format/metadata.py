"""Patch metadata: the format's name and version, the canonical JSON, the content digest, and
the checks of fields that live outside the digest. Duck-typed on the patch, so ``patch.py``
builds on it without a cycle.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import PatchError
from forgetpack.format.fileio import RawTensor

FORMAT = "forgetpack.patch"
VERSION = 1
UNSIGNED_KEYS = ("digest", "signature", "key_id")  # outside the digest: a signature covers the digest
JSON_KEYS = ("targets", "layers", "base", "parent", "result", "recipe", "effect", "components")
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")


def dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """sha256 over every tensor (name, dtype, shape, bytes) and the unsigned metadata."""
    h = hashlib.sha256(b"forgetpack.patch.digest.v1\n")
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        h.update(f"{name}|{array.dtype.str}|{list(array.shape)}\n".encode())
        h.update(array.tobytes())
    unsigned = {k: v for k, v in metadata.items() if k not in UNSIGNED_KEYS}
    h.update(dumps(unsigned).encode())
    return "sha256:" + h.hexdigest()


def check_fingerprints(where: str, targets: Mapping[str, Any], **maps: Mapping[str, Any] | None) -> None:
    """``base`` and ``parent`` name exactly the targets, ``result`` some of them, each with a sha256."""
    for key, value in maps.items():
        if value is None:
            continue
        if not all(isinstance(k, str) and isinstance(v, str) and FINGERPRINT.fullmatch(v) for k, v in value.items()):
            raise PatchError(f"{where}metadata {key!r} must map target names to sha256 fingerprints")
        names, exact = set(value), key != "result"
        if (names != set(targets)) if exact else not names <= set(targets):
            raise PatchError(f"{where}metadata {key!r} names {sorted(names)}, but the patch changes {sorted(targets)}")


def check_signature_fields(path: Path, patch: Any) -> None:
    """Signature fields are outside the digest: check at least their form on every read."""
    if patch.signature is None and patch.key_id is None:
        return
    try:
        raw = base64.b64decode(patch.signature or "", validate=True)
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise PatchError(f"{path}: malformed signature (expected 64 base64-encoded bytes)")
    if not re.fullmatch(r"[0-9a-f]{16}", patch.key_id or ""):
        raise PatchError(f"{path}: malformed key id {patch.key_id!r}")


def decode(path: Path, name: str, tensor: RawTensor) -> np.ndarray:
    if tensor.dtype != "F32":
        raise PatchError(f"{path}: tensor {name} has dtype {tensor.dtype}, expected F32")
    if len(tensor.shape) != 2:
        raise PatchError(f"{path}: tensor {name} has shape {list(tensor.shape)}, expected a matrix")
    return tensor.to_array()


def describe(patch: Any) -> dict[str, Any]:
    """The decoded metadata of a patch, for ``inspect --json``."""
    meta = patch.metadata()
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            out[key] = json.loads(value) if key in JSON_KEYS else value
        except json.JSONDecodeError:
            out[key] = value
    out["size_bytes"] = patch.source.stat().st_size if patch.source and patch.source.exists() else len(patch.to_bytes())
    return out
