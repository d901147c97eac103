"""Where each tower type keeps its final projection matrix: one registry for every model.

The engine only ever changes a tower's last linear map (text → joint space, image → joint
space). Towers store it differently, so each rule below says, for one tower type, the matrix's
state-dict name, its layout (``in_out``: ``y = x @ W``; ``out_in``: ``y = x @ W.T``, an
``nn.Linear`` weight) and the bias added after it, if any. A bias is left unchanged by patches;
solvers work on the linear part and the engine subtracts the bias from their targets.

An unknown tower, or one whose projection is not a single matrix (an HF tower built with
``hf_proj_type: mlp``, a projection-free tower), is a clear ``ForgetpackError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError


@dataclass(frozen=True)
class Projection:
    """One projection matrix of a model, as the patch format names it."""

    target: str  # state-dict name, e.g. "text_projection" or "text.proj.weight"
    layout: str  # "in_out" or "out_in"
    rule: str  # the name of the registry rule that found it
    bias: str | None = None  # state-dict name of a bias added after the matrix, if any

    def feature_form(self, matrix: np.ndarray) -> np.ndarray:
        """The matrix as ``M`` with ``y = x @ M`` ([in, out], float64), whatever the layout."""
        m = np.asarray(matrix, dtype=np.float64)
        return m if self.layout == "in_out" else m.T

    def storage_factors(self, up: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Low-rank factors of a feature-form update ``up @ down`` in this matrix's own layout."""
        return (up, down) if self.layout == "in_out" else (down.T, up.T)


@dataclass(frozen=True)
class Rule:
    """How to find the projection of one tower type: a predicate and a locator."""

    name: str
    side: str  # "text" or "image": the tower, as exports name it
    applies: Callable[[Any], bool]
    locate: Callable[[Any], Projection]


def _cls(module: Any) -> str:
    return type(module).__name__


def _parameter_names(model: Any) -> set[str]:
    return {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}


# ---------------------------------------------------------------------------- text towers


def _openai_text(model: Any) -> Projection:
    """open_clip ``CLIP``: the text tower is flattened onto the model (``model.text_projection``)."""
    return _text_projection(model.text_projection, "text_projection", "openai-text")


def _text_transformer(model: Any) -> Projection:
    """``CustomTextCLIP``/``CoCa`` with open_clip's own ``TextTransformer`` as ``model.text``."""
    return _text_projection(model.text.text_projection, "text.text_projection", "text-transformer")


def _text_projection(proj: Any, name: str, kind: str) -> Projection:
    """A ``text_projection`` that is a bare parameter (``x @ P``) or an ``nn.Linear``."""
    if proj is None:
        raise ForgetpackError("this model's text tower has no projection (text_projection is None): nothing to patch")
    if _cls(proj) == "Linear":
        return Projection(f"{name}.weight", "out_in", kind, f"{name}.bias" if proj.bias is not None else None)
    return Projection(name, "in_out", kind)


def _hf_text(model: Any) -> Projection:
    """HF text tower: the pooled output goes through ``text.proj`` (``hf_proj_type: linear``)."""
    proj = model.text.proj
    kind = _cls(proj)
    if kind == "Linear":
        return Projection("text.proj.weight", "out_in", "hf-text", "text.proj.bias" if proj.bias is not None else None)
    if kind == "Sequential":
        raise ForgetpackError(
            "this model's HF text tower uses hf_proj_type 'mlp' (Linear-GELU-Linear): forgetpack patches a "
            "single linear projection only, and an MLP has none to adapt"
        )
    raise ForgetpackError(f"this model's HF text tower has no linear projection (text.proj is {kind}): nothing to patch")


# ---------------------------------------------------------------------------- image towers


def _vit(model: Any) -> Projection:
    if model.visual.proj is None:
        raise ForgetpackError("this model's ViT has no output projection (visual.proj is None)")
    return Projection("visual.proj", "in_out", "vit")


def _modified_resnet(model: Any) -> Projection:
    """ModifiedResNet ends in attention pooling whose output Linear ``c_proj`` is the projection.

    Supported: the weight, as an ``out_in`` matrix; its bias stays as it is (a patch is a
    matrix update, and the bias is a constant offset the solvers account for).
    """
    c_proj = model.visual.attnpool.c_proj
    return Projection("visual.attnpool.c_proj.weight", "out_in", "modified-resnet",
                      "visual.attnpool.c_proj.bias" if c_proj.bias is not None else None)


def _timm(model: Any) -> Projection:
    head = model.visual.head
    proj = getattr(head, "proj", None)
    if proj is None or _cls(proj) != "Linear":
        raise ForgetpackError(f"this timm image tower's head has no linear 'proj' (head is {[n for n, _ in head.named_children()]})")
    return Projection("visual.head.proj.weight", "out_in", "timm", "visual.head.proj.bias" if proj.bias is not None else None)


RULES: tuple[Rule, ...] = (
    Rule("openai-text", "text", lambda m: not hasattr(m, "text") and hasattr(m, "text_projection"), _openai_text),
    Rule("hf-text", "text", lambda m: _cls(getattr(m, "text", None)) == "HFTextEncoder", _hf_text),
    Rule("text-transformer", "text", lambda m: _cls(getattr(m, "text", None)) == "TextTransformer", _text_transformer),
    Rule("vit", "image", lambda m: _cls(getattr(m, "visual", None)) == "VisionTransformer", _vit),
    Rule("modified-resnet", "image", lambda m: _cls(getattr(m, "visual", None)) == "ModifiedResNet", _modified_resnet),
    Rule("timm", "image", lambda m: _cls(getattr(m, "visual", None)) == "TimmModel", _timm),
)


def find_projection(model: Any, side: str = "text") -> Projection:
    """The projection of the model's ``side`` tower ("text" or "image"), or a clear error."""
    if side not in ("text", "image"):
        raise ValueError(f"side must be 'text' or 'image', not {side!r}")
    located = getattr(model, "located_projections", None)  # a weights-only model (engine.weights) knows its own
    if isinstance(located, dict):
        if side not in located:
            raise ForgetpackError(f"this model was read without its {side} tower; load the full model")
        return located[side]
    for rule in RULES:
        if rule.side == side and rule.applies(model):
            proj = rule.locate(model)
            names = _parameter_names(model)
            for name in (proj.target, proj.bias):
                if name is not None and name not in names:
                    raise ForgetpackError(f"{rule.name} rule expected parameter {name!r}, which this model lacks")
            return proj
    tower = getattr(model, "text" if side == "text" else "visual", None)
    kind = _cls(tower) if tower is not None else _cls(model)
    known = ", ".join(r.name for r in RULES if r.side == side)
    raise ForgetpackError(f"unknown {side} tower {kind!r}: no registered projection (known: {known})")


def projection_matrix(model: Any, proj: Projection) -> np.ndarray:
    """A copy of the projection matrix as stored (its own dtype and layout)."""
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return state[proj.target].detach().cpu().numpy().copy()


def projection_bias(model: Any, proj: Projection) -> np.ndarray | None:
    if proj.bias is None:
        return None
    state = dict(model.named_parameters())
    return state[proj.bias].detach().cpu().numpy().astype(np.float64)
