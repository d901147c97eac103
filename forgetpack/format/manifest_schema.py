"""Every field of an export manifest checked before anything uses it.

A manifest is a file anybody can edit. The runtime reads numbers from it (a logit scale, a
normalisation std, a context length), opens files it names and trusts its fingerprints, so
each value is checked for type, range and finiteness here, in one place, and any problem is a
one-line ``ForgetpackError`` naming the manifest and the field. File names must stay inside the
export folder.
"""

from __future__ import annotations

import math
import re
from typing import Any

from forgetpack.format.errors import ForgetpackError

TOWERS = ("image", "text")
FINGERPRINT = re.compile(r"sha256:[0-9a-f]{64}")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
MAX_SIDE = 8192  # pixels of a preprocessed input side
MAX_CONTEXT = 4096  # tokens
SEQUENCE_AXIS = "sequence"  # a text input axis that takes any length up to the tokenizer's context
MAX_LOGIT = 1e4


class _Check:
    """Type and range checks that name the manifest and the field on failure."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, field: str, problem: str) -> ForgetpackError:
        return ForgetpackError(f"{self.where}: manifest field {field!r} {problem}")

    def mapping(self, value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(field, "must be an object")
        return value

    def text(self, value: Any, field: str, choices: tuple[str, ...] = ()) -> str:
        if not isinstance(value, str) or (choices and value not in choices):
            raise self.fail(field, f"must be {'one of ' + ', '.join(choices) if choices else 'text'}, not {_short(value)}")
        return value

    def integer(self, value: Any, field: str, low: int, high: int) -> int:
        if type(value) is not int or not low <= value <= high:
            raise self.fail(field, f"must be a whole number from {low} to {high}, not {_short(value)}")
        return value

    def number(self, value: Any, field: str, low: float, high: float, positive: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or not low <= value <= high or (positive and value <= 0):
            raise self.fail(field, f"must be a finite number {'above 0 ' if positive else ''}from {low:g} to {high:g}, not {_short(value)}")
        return float(value)

    def fingerprint(self, value: Any, field: str) -> str:
        if not isinstance(value, str) or not FINGERPRINT.fullmatch(value):
            raise self.fail(field, f"must be a sha256 fingerprint, not {_short(value)}")
        return value

    def file_name(self, value: Any, field: str) -> str:
        """A plain file name inside the export folder: no path, no '..', nothing hidden."""
        if not isinstance(value, str) or not value or value.startswith(".") or any(c in value for c in "/\\\x00"):
            raise self.fail(field, f"must be a file name inside the export folder, not {_short(value)}")
        return value

    def sizes(self, value: Any, field: str, count: int = 2) -> list[int]:
        if not isinstance(value, list) or len(value) != count:
            raise self.fail(field, f"must be a list of {count} sizes, not {_short(value)}")
        return [self.integer(v, field, 1, MAX_SIDE) for v in value]

    def channels(self, value: Any, field: str, positive: bool) -> list[float]:
        if not isinstance(value, list) or len(value) != 3:
            raise self.fail(field, f"must be a list of 3 numbers, not {_short(value)}")
        return [self.number(v, field, -1e3, 1e3, positive) for v in value]


def validate_manifest(data: dict[str, Any], where: str) -> None:
    """Raise a one-line error for the first field of ``data`` that is missing, mistyped or out of range."""
    c = _Check(where)
    c.text(data.get("model_id"), "model_id")
    c.text(data.get("arch"), "arch")
    c.integer(data.get("embed_dim"), "embed_dim", 1, 65536)
    c.integer(data.get("opset"), "opset", 7, 100)
    c.text(data.get("precision"), "precision", ("fp32", "int8"))
    c.fingerprint(data.get("export_id"), "export_id")
    c.fingerprint(data.get("graph_id"), "graph_id")
    c.number(data.get("logit_scale"), "logit_scale", 0, MAX_LOGIT, positive=True)
    if data.get("logit_bias") is not None:
        c.number(data["logit_bias"], "logit_bias", -MAX_LOGIT, MAX_LOGIT)
    patches = data.get("patches", [])
    if not isinstance(patches, list):
        raise c.fail("patches", "must be a list")
    for i, entry in enumerate(patches):
        c.fingerprint(c.mapping(entry, f"patches[{i}]").get("digest"), f"patches[{i}].digest")
        if entry.get("recipe") is not None:  # absent from older exports and for a patch without a recipe
            c.fingerprint(entry["recipe"], f"patches[{i}].recipe")
    towers = c.mapping(data.get("towers"), "towers")
    if not towers:
        raise c.fail("towers", "lists no tower")
    for name, tower in towers.items():
        _tower(c, name, c.mapping(tower, f"towers.{name}"))
    for target, proj in c.mapping(data.get("projections"), "projections").items():
        _projection(c, target, c.mapping(proj, f"projections.{target}"), towers)
    if "image" in towers:
        _preprocess(c, c.mapping(data.get("preprocess"), "preprocess"))
    if "text" in towers:
        _tokenizer(c, c.mapping(data.get("tokenizer"), "tokenizer"))


def _tower(c: _Check, name: str, tower: dict[str, Any]) -> None:
    field = f"towers.{name}"
    c.text(name, "towers", TOWERS)
    c.file_name(tower.get("file"), f"{field}.file")
    c.text(tower.get("input"), f"{field}.input")
    c.text(tower.get("input_dtype"), f"{field}.input_dtype", ("float32", "int64"))
    shape = tower.get("input_shape")
    if not isinstance(shape, list) or not shape or shape[0] != "batch":
        raise c.fail(f"{field}.input_shape", f"must start with the batch axis, not {_short(shape)}")
    for i, d in enumerate(shape[1:], 1):
        if name == "text" and i == 1 and d == SEQUENCE_AXIS:  # a dynamic sequence axis (feed up to the context)
            continue
        c.integer(d, f"{field}.input_shape", 1, MAX_SIDE)
    c.text(tower.get("embeddings", "embeddings"), f"{field}.embeddings")
    for optional in ("features", "projection"):
        if tower.get(optional) is not None:
            c.text(tower[optional], f"{field}.{optional}")


def _projection(c: _Check, target: str, proj: dict[str, Any], towers: dict[str, Any]) -> None:
    field = f"projections.{target}"
    if c.text(proj.get("tower"), f"{field}.tower", TOWERS) not in towers:
        raise c.fail(f"{field}.tower", f"names the {proj['tower']} tower, which the manifest lacks")
    c.text(proj.get("initializer"), f"{field}.initializer")
    c.text(proj.get("layout"), f"{field}.layout", ("in_out", "out_in"))
    if not isinstance(proj.get("shape"), list) or len(proj["shape"]) != 2:
        raise c.fail(f"{field}.shape", f"must be two sizes, not {_short(proj.get('shape'))}")
    for d in proj["shape"]:
        c.integer(d, f"{field}.shape", 1, 1 << 20)
    c.fingerprint(proj.get("base"), f"{field}.base")
    c.fingerprint(proj.get("current"), f"{field}.current")
    if proj.get("bias") is not None:
        c.text(proj["bias"], f"{field}.bias")
    if not isinstance(proj.get("reproject", True), bool):
        raise c.fail(f"{field}.reproject", "must be true or false")


_STEP_FIELDS = {
    "resize_shortest": ("size", "interpolation"),
    "resize": ("size", "interpolation"),
    "resize_keep_ratio": ("size", "longest", "interpolation"),
    "center_crop": ("size",),
    "convert": ("mode",),
    "to_tensor": (),
    "normalize": ("mean", "std"),
}


def _preprocess(c: _Check, pre: dict[str, Any]) -> None:
    c.sizes(pre.get("size"), "preprocess.size")
    steps = pre.get("steps")
    if not isinstance(steps, list) or not steps:
        raise c.fail("preprocess.steps", "must be a non-empty list of steps")
    ops = []
    for i, step in enumerate(steps):
        field = f"preprocess.steps[{i}]"
        op = c.text(c.mapping(step, field).get("op"), f"{field}.op", tuple(_STEP_FIELDS))
        ops.append(op)
        missing = [k for k in _STEP_FIELDS[op] if k not in step]
        if missing:
            raise c.fail(field, f"({op}) lacks {', '.join(missing)}")
        if "interpolation" in step:
            c.text(step["interpolation"], f"{field}.interpolation", INTERPOLATIONS)
        if op == "resize_shortest":
            c.integer(step["size"], f"{field}.size", 1, MAX_SIDE)
        elif op in ("resize", "resize_keep_ratio", "center_crop"):
            c.sizes(step["size"], f"{field}.size")
        if op == "resize_keep_ratio":
            c.number(step["longest"], f"{field}.longest", 0, 1)
        if op == "center_crop":
            c.integer(step.get("fill", 0), f"{field}.fill", 0, 255)
        if op == "convert":
            c.text(step["mode"], f"{field}.mode", ("RGB", "L", "RGBA"))
        if op == "normalize":
            c.channels(step["mean"], f"{field}.mean", positive=False)
            c.channels(step["std"], f"{field}.std", positive=True)
    if "to_tensor" not in ops or "normalize" not in ops:
        raise c.fail("preprocess.steps", "must convert the image to an array and normalise it")


def _tokenizer(c: _Check, tok: dict[str, Any]) -> None:
    kind = c.text(tok.get("kind"), "tokenizer.kind", ("clip_bpe", "hf"))
    c.file_name(tok.get("file"), "tokenizer.file")
    c.integer(tok.get("context_length"), "tokenizer.context_length", 1, MAX_CONTEXT)
    c.text(tok.get("clean", "lower"), "tokenizer.clean", ("lower", "whitespace", "canonicalize"))
    c.integer(tok.get("pad_id", 0), "tokenizer.pad_id", 0, 1 << 24)
    if kind == "clip_bpe":
        c.integer(tok.get("sot_id"), "tokenizer.sot_id", 0, 1 << 24)
        c.integer(tok.get("eot_id"), "tokenizer.eot_id", 0, 1 << 24)
    else:
        if tok.get("sep_id") is not None:
            c.integer(tok["sep_id"], "tokenizer.sep_id", 0, 1 << 24)
        for side in ("truncation_side", "padding_side"):
            c.text(tok.get(side, "right"), f"tokenizer.{side}", ("left", "right"))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
