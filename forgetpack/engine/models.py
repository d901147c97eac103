"""Load a CLIP model from a model spec, in one place.

Specs (``forgetpack forget MODEL``):

- ``mini``: the embedded model (``forgetpack.mini``), loads offline.
- ``ARCH:TAG``: an open_clip architecture with a pretrained tag (``ViT-B-32:openai``); open_clip
  downloads the weights when online, and we fail with one clear line when offline and not cached.
- ``ARCH:none``: the architecture with random weights from a fixed seed, so the same spec always
  gives byte-identical weights and patches made on it stay applicable.
- ``ARCH:PATH``: a local checkpoint, as open_clip's own ``pretrained`` argument accepts a file.
  ``.safetensors`` is read by safetensors; ``.pt``/``.bin`` go through open_clip's loader with
  ``weights_only=True``, so no arbitrary pickle is ever executed.
- ``hf-hub:ORG/REPO``: an open_clip model on the Hugging Face hub.

open_clip is imported inside the functions: importing it costs seconds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetpack.format.errors import ForgetpackError, one_line

RANDOM_INIT_SEED = 0  # the seed of every ``ARCH:none`` model; changing it changes every base fingerprint
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".npz")
MINI_NAMES = ("mini", "forgetpack-mini")  # the embedded model's spec and its open_clip name (mini.MINI_ARCH)

ACCEPTED = (
    "accepted: 'mini', 'ARCH:TAG' (e.g. ViT-B-32:openai), 'ARCH:none' (random init), "
    "'ARCH:PATH' (local checkpoint; 'mini:PATH' for mini's weights patched by 'forgetpack apply'), 'hf-hub:ORG/REPO'"
)


@dataclass
class LoadedModel:
    """A model ready for feature capture: eval mode, with its preprocess and tokenizer."""

    model: Any  # torch.nn.Module (open_clip CLIP or CustomTextCLIP)
    preprocess: Any
    tokenizer: Any
    model_id: str  # canonical spec, recorded in patches
    arch: str
    # Class names the model was built for. They join the built-in vocabulary as candidates for
    # automatic preserve sets: ImageNet's names know nothing of, say, mini's digits and letters.
    vocabulary: tuple[str, ...] = ()
    # Prompt templates the model is meant to be used with. Hardening's grid adds them to open_clip's
    # 80 and the engine's own: on mini, a "one + seven" patch checked under those alone cost the
    # nines 6 points under mini's own "a photo of the number {}.".
    templates: tuple[str, ...] = ()


def load_model(spec: str, device: str = "cpu") -> LoadedModel:
    """Load the model a spec names; any user mistake is a one-line ``ForgetpackError``."""
    spec = (spec or "").strip()
    if not spec:
        raise ForgetpackError(f"empty model spec; {ACCEPTED}")
    if spec == "mini":
        return _load_mini(device)
    if spec.startswith("hf-hub:"):
        return _load_hf_hub(spec, device)
    if ":" not in spec:
        raise ForgetpackError(f"unknown model spec {spec!r}; {ACCEPTED}")
    arch, _, rest = spec.partition(":")
    if not rest:
        raise ForgetpackError(f"model spec {spec!r} lacks weights after ':'; {ACCEPTED}")
    if arch in MINI_NAMES and rest != "none":  # a patched or applied copy of mini's weights
        return _load_mini(device, Path(rest).expanduser())
    arch = _check_arch(arch.replace("/", "-"), spec)
    if rest == "none":
        return _load_random(arch, device)
    if _is_tag(arch, rest):
        return _load_tagged(arch, rest, device)
    path = Path(rest).expanduser()
    if path.is_file():
        return _load_checkpoint(arch, path, device)
    if path.suffix in CHECKPOINT_SUFFIXES or "/" in rest or "\\" in rest:
        raise ForgetpackError(f"model spec {spec!r}: checkpoint {path} does not exist")
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(arch)
    known = ", ".join(tags) if tags else "none known"
    raise ForgetpackError(f"model spec {spec!r}: {rest!r} is neither a pretrained tag of {arch} ({known}), 'none', nor a file")


# ---------------------------------------------------------------------------- the kinds of spec


def _load_mini(device: str, weights: Path | None = None) -> LoadedModel:
    """The embedded model, or (``mini:PATH``, ``forgetpack-mini:PATH``) its architecture with
    weights from PATH, e.g. a copy written by ``forgetpack apply``: the same classes and templates."""
    try:
        from forgetpack import mini
    except ModuleNotFoundError as exc:
        raise ForgetpackError("the embedded 'mini' model is not part of this install") from exc
    if weights is None:
        model, preprocess, tokenizer = mini.load_mini(device=device)
        model_id = "mini"
    else:
        if weights.suffix != ".safetensors":
            raise ForgetpackError(f"{weights}: mini's weights are a .safetensors file (as 'forgetpack apply' writes them)")
        model, preprocess, tokenizer = mini.load_mini(device=device, weights=weights)
        model_id = f"{mini.MINI_ARCH}:{weights.resolve()}"
    return LoadedModel(model.eval(), preprocess, tokenizer, model_id, mini.MINI_ARCH, mini.CLASS_NAMES, mini.TEMPLATES)


def _load_random(arch: str, device: str) -> LoadedModel:
    """Random init under a fixed seed, without disturbing the caller's RNG state."""
    import open_clip
    import torch

    with torch.random.fork_rng(devices=[]), _quiet_open_clip():
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, pretrained_text=False)
        except Exception as exc:  # e.g. an HF text tower whose config must be downloaded
            raise ForgetpackError(f"cannot build {arch} with random weights: {one_line(exc)}") from exc
    return _finish(model, preprocess, open_clip.get_tokenizer(arch), f"{arch}:none", arch, device)


def _load_tagged(arch: str, tag: str, device: str) -> LoadedModel:
    import open_clip

    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag, weights_only=True)
    except Exception as exc:
        raise ForgetpackError(
            f"cannot load {arch}:{tag}: the weights are not cached and could not be downloaded "
            f"(offline?): {one_line(exc)}"
        ) from exc
    return _finish(model, preprocess, open_clip.get_tokenizer(arch), f"{arch}:{tag}", arch, device)


def _load_checkpoint(arch: str, path: Path, device: str) -> LoadedModel:
    import open_clip

    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise ForgetpackError(f"{path}: unsupported checkpoint type {path.suffix!r} (use {', '.join(CHECKPOINT_SUFFIXES)})")
    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=str(path), weights_only=True, pretrained_text=False
            )
    except Exception as exc:  # wrong architecture, truncated file, refused pickle, ...
        raise ForgetpackError(f"cannot load checkpoint {path} as {arch}: {one_line(exc)}") from exc
    return _finish(model, preprocess, open_clip.get_tokenizer(arch), f"{arch}:{path.resolve()}", arch, device)


def _load_hf_hub(spec: str, device: str) -> LoadedModel:
    import open_clip

    if not spec[len("hf-hub:"):].strip("/"):
        raise ForgetpackError(f"model spec {spec!r} names no repository; {ACCEPTED}")
    try:
        with _quiet_open_clip():
            model, _, preprocess = open_clip.create_model_and_transforms(spec, weights_only=True)
            tokenizer = open_clip.get_tokenizer(spec)
    except Exception as exc:
        raise ForgetpackError(f"cannot load {spec}: not cached and could not be downloaded (offline?): {one_line(exc)}") from exc
    return _finish(model, preprocess, tokenizer, spec, spec, device)


# ---------------------------------------------------------------------------- helpers


def _check_arch(arch: str, spec: str) -> str:
    import open_clip

    if arch in MINI_NAMES:  # known to open_clip once registered
        from forgetpack import mini

        mini.register()
        return mini.MINI_ARCH
    models = open_clip.list_models()
    if arch in models:
        return arch
    close = [m for m in models if m.lower() == arch.lower()]
    hint = f" (did you mean {close[0]}?)" if close else " (see open_clip.list_models())"
    raise ForgetpackError(f"model spec {spec!r}: unknown architecture {arch!r}{hint}; {ACCEPTED}")


def _is_tag(arch: str, tag: str) -> bool:
    import open_clip

    return tag in open_clip.list_pretrained_tags_by_model(arch)


def _finish(model: Any, preprocess: Any, tokenizer: Any, model_id: str, arch: str, device: str) -> LoadedModel:
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return LoadedModel(model, preprocess, tokenizer, model_id, arch)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's log lines ('No pretrained weights loaded', download errors): what matters
    is reported by our own one-line error or was asked for (random init)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)

