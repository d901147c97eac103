"""Serve a (patched) CLIP for zero-shot classification, with or without torch.

    import runtime
    model = runtime.load("export-dir")                 # onnxruntime, CPU; no torch imported
    model = runtime.load("export-dir", providers=["cuda"])
    model = runtime.load("mini", backend="torch")      # open_clip, the reference
    preds = model.classify(["cat.jpg"], ["cat", "dog"], templates=["a photo of a {}."])
    model.apply_patch("forget-cat.fpatch.safetensors")  # hot-swap: no re-export, no file written
    model.remove_patch(model.patches[0])

Backends are found through the ``forgetpack.runtime_backends`` entry points (see
runtime/backends/__init__.py for the interface); ``onnx`` and ``torch`` ship with forgetpack.
This module imports neither torch nor onnxruntime itself.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from forgetpack.format.errors import ForgetpackError, PatchError
from forgetpack.format.names import CLASSIFY_TEMPLATES, check_labels, check_templates
from forgetpack.format.patch import Patch, read_patch
from forgetpack.format.signing import load_public_keys, require_signed
from runtime.backends import Backend, backend_class, discover
from runtime.preprocess import MAX_PIXELS, ImageInput, check_pixel_budget, load_image

__all__ = ["Model", "PatchState", "Prediction", "load", "available_backends", "DEFAULT_TEMPLATES"]

DEFAULT_TEMPLATES = CLASSIFY_TEMPLATES
T = TypeVar("T")


@dataclass(frozen=True)
class Prediction:
    """The zero-shot result for one image."""

    label: str
    index: int
    score: float  # softmax probability over the labels (logit scale applied)
    probs: np.ndarray  # [n_labels]
    similarity: np.ndarray  # [n_labels] cosine similarities

    def top(self, labels: Sequence[str], k: int = 5) -> list[tuple[str, float]]:
        order = np.argsort(-self.probs, kind="stable")[:k]
        return [(labels[i], float(self.probs[i])) for i in order]


@dataclass(frozen=True)
class PatchState:
    """A patch set resolved once, for per-request use (``Model.patch_state``): immutable, so a request
    holding it never sees another request's patches or a half-made change."""

    patches: tuple[Patch, ...]
    digests: tuple[str, ...]  # each patch's digest, in order (computed once: a digest hashes the whole patch)
    digest: str  # names the ordered patch set: sha256 over the patch digests, in order
    backend_state: Any  # the backend's own immutable state (matrices) for these patches


def state_digest(digests: Sequence[str]) -> str:
    """The id of an ordered patch set (the empty set has one too)."""
    return "sha256:" + hashlib.sha256("\n".join(digests).encode()).hexdigest()


def available_backends() -> list[str]:
    return sorted(discover())


def load(
    source: str | os.PathLike[str],
    backend: str | None = None,
    providers: Sequence[Any] | str | None = None,
    trusted_keys: Sequence[Any] | None = None,
    **options: Any,
) -> Model:
    """Load an export directory or a model spec with a backend.

    ``backend=None`` picks ``onnx`` for an export directory and ``torch`` otherwise.
    ``trusted_keys`` (a public key path or loaded ed25519 key, or a list of them): accept only
    patches signed by one of them; an empty list trusts nobody. ``max_pixels`` bounds the images
    accepted (checked before decoding). Other keyword options go to the backend (``threads=2``).
    """
    max_pixels = options.pop("max_pixels", MAX_PIXELS)
    is_path = isinstance(source, (str, os.PathLike))
    if backend is None:
        backend = "onnx" if is_path and Path(source).is_dir() else "torch"
    cls = backend_class(backend)
    if backend == "onnx" and not (is_path and Path(source).is_dir()):
        raise ForgetpackError(f"{source}: not an export directory; the onnx backend serves the output of 'forgetpack export' (or use --backend torch)")
    return Model(cls(source, providers=providers, **options), trusted_keys=trusted_keys, max_pixels=max_pixels)


class Model:
    """One small interface over any backend: encode, classify, and patch control."""

    def __init__(self, backend: Backend, trusted_keys: Sequence[Any] | None = None, max_pixels: int = MAX_PIXELS):
        self.backend = backend
        self._patches: tuple[Patch, ...] = ()
        self._keys = load_public_keys(trusted_keys)
        self.max_pixels = check_pixel_budget(max_pixels)
        # Patch changes are serialised by a lock and bracketed by a sequence number (odd while a
        # change is under way), so a reader can tell it saw one patch state from start to end.
        self._writer = threading.Lock()
        self._sequence = 0

    @property
    def model_id(self) -> str:
        return self.backend.model_id

    # -- encoding --------------------------------------------------------------------

    def encode_image(self, images: ImageInput | Sequence[ImageInput], state: PatchState | None = None) -> np.ndarray:
        """L2-normalised image embeddings ``[n, d]`` (paths, bytes, PIL images or arrays).

        ``state`` (from :meth:`patch_state`): encode under that patch set instead of the model's own."""
        images = [load_image(im, self.max_pixels) for im in _as_list(images)]
        if state is None:
            return _normalise(self.backend.encode_images(images))
        return _normalise(self.backend.encode_images(images, state=state.backend_state))

    def encode_text(self, texts: str | Sequence[str], state: PatchState | None = None) -> np.ndarray:
        """L2-normalised text embeddings ``[n, d]`` (under ``state`` when given)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if state is None:
            return _normalise(self.backend.encode_texts(texts))
        return _normalise(self.backend.encode_texts(texts, state=state.backend_state))

    def classifier(self, labels: Sequence[str], templates: Sequence[str] | None = None,
                   state: PatchState | None = None) -> np.ndarray:
        """Zero-shot class weights ``[d, n_labels]``: each label's template embeddings averaged, as open_clip does."""
        labels = check_labels(labels)
        templates = check_templates(templates)
        texts = [t.replace("{}", label) for label in labels for t in templates]
        emb = self.encode_text(texts, state).reshape(len(labels), len(templates), -1).mean(axis=1)
        return _normalise(emb).T

    def classify(
        self, images: ImageInput | Sequence[ImageInput], labels: Sequence[str], templates: Sequence[str] | None = None,
        state: PatchState | None = None,
    ) -> list[Prediction]:
        """Zero-shot classification of ``images`` over ``labels``, all under one patch state
        (the model's own, or ``state`` from :meth:`patch_state`)."""
        labels = check_labels(labels)
        images = [load_image(im, self.max_pixels) for im in _as_list(images)]
        if state is not None:
            return self.predict(self.encode_image(images, state) @ self.classifier(labels, templates, state), labels)
        return self.predict(self.consistently(lambda: self.encode_image(images) @ self.classifier(labels, templates)), labels)

    def predict(self, similarity: np.ndarray, labels: Sequence[str]) -> list[Prediction]:
        """Predictions from cosine similarities ``[n_images, n_labels]`` (the logit scale and softmax applied)."""
        logits = self.backend.logit_scale * similarity
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        out = []
        for sim, p in zip(similarity, probs, strict=True):
            i = int(np.argmax(sim))
            out.append(Prediction(labels[i], i, float(p[i]), p, sim))
        return out

    # -- patches ---------------------------------------------------------------------

    def consistently(self, compute: Callable[[], T]) -> T:
        """Run ``compute`` until no patch change overlapped it: its result belongs to one patch state.

        Readers never wait for each other; a patch change during a read costs that read a retry."""
        while True:
            before = self._sequence
            if before % 2 == 0:
                result = compute()
                if self._sequence == before:
                    return result
            time.sleep(0)

    @property
    def patches(self) -> tuple[Patch, ...]:
        """The hot-applied patches, in order (patches baked in at export are in ``baked``)."""
        return self._patches

    @property
    def baked(self) -> tuple[str, ...]:
        return tuple(self.backend.baked)

    def apply_patch(self, patch: Patch | str | os.PathLike[str]) -> Patch:
        """Apply a patch on top of the current ones, after verifying it fits this model's base."""
        patch = _as_patch(patch)
        require_signed([patch], self._keys)
        with self._writer:  # the backend checks the fit of every patch, in order (format.fit.apply_in_order)
            self._switch((*self._patches, patch))
        return patch

    def set_patches(self, patches: Sequence[Patch | str | os.PathLike[str]]) -> tuple[Patch, ...]:
        """Replace the hot-applied patches with ``patches`` (in order) in one step."""
        loaded = tuple(_as_patch(p) for p in _as_sequence(patches))
        require_signed(list(loaded), self._keys)
        with self._writer:
            self._switch(loaded)
        return loaded

    def _switch(self, patches: tuple[Patch, ...]) -> None:
        """Move the backend and the bookkeeping to ``patches`` as one change (writer lock held)."""
        self._sequence += 1
        try:
            self.backend.set_patches(list(patches))  # checks every patch; unchanged if it raises
            self._patches = patches
        finally:
            self._sequence += 1

    def patch_state(self, patches: Sequence[Patch | str | os.PathLike[str]]) -> PatchState:
        """``patches`` (in order, on the base) resolved to an immutable :class:`PatchState` for
        ``encode_*``/``classify(..., state=)``; the model's own patches are left alone. Checked as
        :meth:`set_patches` checks them (signatures, then the fit of each in order)."""
        loaded = tuple(_as_patch(p) for p in _as_sequence(patches))
        require_signed(list(loaded), self._keys)
        state_for = getattr(self.backend, "state_for", None)
        if state_for is None:
            raise ForgetpackError(f"the {self.backend.name} backend has no per-request patch states (the onnx backend has)")
        digests = tuple(p.digest for p in loaded)
        return PatchState(loaded, digests, state_digest(digests), state_for(list(loaded)))

    def remove_patch(self, patch: Patch | str | os.PathLike[str]) -> Patch:
        """Remove an applied patch (by Patch, digest or file); the rest are re-applied from the base, exactly."""
        digest = _digest_of(patch)
        if digest in self.backend.baked:
            raise PatchError(f"{digest[:23]}…: is baked into the export; re-export without it to remove it")
        with self._writer:
            matches = [p for p in self._patches if p.digest == digest]
            if not matches:
                applied = ", ".join(p.digest[:15] for p in self._patches) or "none"
                raise PatchError(f"{digest[:23]}…: is not applied (applied: {applied})")
            self._switch(tuple(p for p in self._patches if p.digest != digest))
        return matches[0]


# ---------------------------------------------------------------------------- helpers


def _as_list(images: Any) -> list[Any]:
    if isinstance(images, (str, os.PathLike, bytes)) or not isinstance(images, Sequence):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        return [images]
    return list(images)


def _normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows; a backend answer that is not finite is an error, never a silent NaN."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ForgetpackError("the model produced embeddings that are not finite (NaN or Inf): its weights or a patch are broken")
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, np.float32(1e-12))


def _as_patch(patch: Any) -> Patch:
    """A Patch as given, or read from its file; anything else is a ``PatchError``, never a ``TypeError``."""
    if isinstance(patch, Patch):
        return patch
    if isinstance(patch, (str, os.PathLike)):
        return read_patch(patch)
    raise PatchError(f"{_shown(patch)} is not a patch: give a Patch or a patch file")


def _as_sequence(patches: Any) -> Sequence[Any]:
    if isinstance(patches, (str, bytes, os.PathLike, Patch)) or not isinstance(patches, Sequence):
        raise PatchError(f"{_shown(patches)} is not a list of patches")
    return patches


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _digest_of(patch: Patch | str | os.PathLike[str]) -> str:
    if isinstance(patch, str) and patch.startswith("sha256:") and not Path(patch).exists():
        return patch
    return _as_patch(patch).digest
