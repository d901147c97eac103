"""Patch metadata: the format's name and version, the canonical JSON, the content digest, and
the checks of fields that live outside the digest. Duck-typed on the patch, so ``patch.py``
builds on it without a cycle.
"""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import json
import math
import os
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


MAX_JSON_DEPTH = 32  # recipe, effect, components: a handful of levels in every patch forgetpack writes
MAX_JSON_ITEMS = 1_000_000  # values in one metadata field (a recipe's vocabulary is the largest: thousands)
NAME_LISTS = ("forget", "preserve", "templates")  # recipe fields every consumer lists as names


def loads(where: str, key: str, text: str) -> Any:
    """One metadata field's JSON, checked by :func:`check_json`: NaN and Infinity, which ``json``
    would accept, are refused as they are read."""

    def constant(name: str) -> Any:
        raise PatchError(f"{where}metadata {key!r} holds {name}, which patch metadata may not")

    try:
        value = json.loads(text, parse_constant=constant)
    except json.JSONDecodeError:
        raise PatchError(f"{where}metadata {key!r} is not valid JSON") from None
    except RecursionError:
        raise PatchError(f"{where}metadata {key!r} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    check_json(where, key, value)
    return value


def check_json(where: str, key: str, value: Any) -> None:
    """The one rule for JSON metadata, read or made: plain JSON values (objects with text keys),
    finite numbers, at most ``MAX_JSON_DEPTH`` levels and ``MAX_JSON_ITEMS`` values."""
    stack, count = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > MAX_JSON_DEPTH:
            raise PatchError(f"{where}metadata {key!r} is nested more than {MAX_JSON_DEPTH} levels deep")
        if count > MAX_JSON_ITEMS:
            raise PatchError(f"{where}metadata {key!r} holds more than {MAX_JSON_ITEMS} values")
        if isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise PatchError(f"{where}metadata {key!r} has an object key that is not text")
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend((v, depth + 1) for v in item)
        elif isinstance(item, float):
            if not math.isfinite(item):
                shown = "NaN" if math.isnan(item) else "Infinity" if item > 0 else "-Infinity"
                raise PatchError(f"{where}metadata {key!r} holds {shown}, which patch metadata may not")
        elif item is not None and not isinstance(item, (str, int)):  # bool is an int
            raise PatchError(f"{where}metadata {key!r} holds a {type(item).__name__}, not a JSON value")


def check_recipe(where: str, recipe: Mapping[str, Any], key: str = "recipe") -> None:
    """A recipe's name lists (``forget``, ``preserve``, ``templates``), when present, are lists of text."""
    for field in NAME_LISTS:
        value = recipe.get(field)
        if field in recipe and not (isinstance(value, list) and all(isinstance(n, str) for n in value)):
            raise PatchError(f"{where}metadata {key!r} field {field!r} must be a list of strings, not {type(value).__name__}")


def check_metadata(where: str, recipe: Mapping[str, Any], effect: Mapping[str, Any], components: Any) -> None:
    """The JSON rule for a patch's free-form fields, as made and as read (``Patch.validate``): plain
    finite JSON of bounded depth and size, and name lists of text in its recipe and its components'."""
    for key, value in (("recipe", recipe), ("effect", effect), ("components", list(components))):
        check_json(where, key, value)
    check_recipe(where, recipe)
    for i, component in enumerate(components):
        if isinstance(component.get("recipe"), dict):
            check_recipe(where, component["recipe"], f"components[{i}].recipe")


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


def recipe_key(recipe: Mapping[str, Any], base: Mapping[str, str]) -> str | None:
    """Which request a patch answers, on which base: sha256 over the canonical JSON of its recipe and
    base fingerprints; None for a patch that records no recipe.

    The one recipe comparison: every "already applied / baked in" guard compares these as well as
    digests, since a duplicate solved again (another machine, another version's measured effect, a
    signature) has another digest but the same request, and applying it would move the same names again.
    """
    if not recipe:
        return None
    canonical = dumps({"base": dict(sorted(base.items())), "recipe": recipe})
    return "sha256:" + hashlib.sha256(b"forgetpack.patch.recipe.v1\n" + canonical.encode()).hexdigest()


def recipe_names(recipe: Mapping[str, Any], components: Any = ()) -> str:
    """The forget names of a recipe (a stacked patch's: its components'), for messages."""
    recipes = [recipe, *(c.get("recipe") or {} for c in components if isinstance(c, dict))]
    names = [str(n) for r in recipes if isinstance(r.get("forget"), list) for n in r["forget"]]
    return ", ".join(dict.fromkeys(names)) or "no names recorded"


def creation_time() -> str:
    """``created`` for a new patch: empty unless ``SOURCE_DATE_EPOCH`` asks for one, so the same request on
    the same base gives the same bytes (and digest) wherever and whenever it is solved."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        return ""
    try:
        moment = _dt.datetime.fromtimestamp(int(epoch), _dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        raise PatchError(f"SOURCE_DATE_EPOCH must be whole seconds since 1970, not {epoch!r}") from None
    return moment.isoformat()


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
