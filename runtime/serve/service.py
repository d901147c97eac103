"""What the HTTP routes (and the Ray deployment's handle methods) do, without HTTP.

One ``Service`` per process or replica: the model (onnx backend, its own patches never touched),
the registry, the patch-state LRU, the image micro-batcher and the metrics. Every request
resolves its patch set once (the ids it names, or the default set as it is at that moment) to an
immutable state and uses only that state, so a default switch mid-request cannot tear it.

What a request costs beyond inference is kept small (issue 25): a small request's images are
decoded on the event loop (a thread hop costs more than decoding a thumbnail; a large one goes to
a worker thread), a cached classifier is looked up without a thread, checked label sets are
remembered, and the answer is built from one array conversion.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

import runtime
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_labels, check_templates
from forgetpack.format.patch import Patch
from forgetpack.format.signing import load_public_keys
from runtime import Model, PatchState
from runtime.preprocess import ImageTooLarge, decode_image, open_image
from runtime.serve.batching import ImageBatcher
from runtime.serve.config import ServeConfig
from runtime.serve.memory import keep_freed_buffers
from runtime.serve.metrics import ServeMetrics
from runtime.serve.registry import DIGEST_RE, PatchRegistry
from runtime.serve.states import PatchStates

CLASSIFIER_CACHE = 1024  # zero-shot weight matrices kept, by patch state, labels and templates
CHECKED_CACHE = 1024  # label and template lists already checked, as sent
# A request whose images total at most INLINE_BYTES is checked from its headers on the event loop, and
# decoded there too when they total at most INLINE_PIXELS (a few ms of decoding at most); any other
# request is checked and decoded on a worker thread, so a large image never stalls the other requests.
INLINE_BYTES = 256 * 1024
INLINE_PIXELS = 512 * 512


class TooLarge(ForgetpackError):
    """A request over a size limit (HTTP 413)."""


class Unsupported(ForgetpackError):
    """Content the server cannot read: a media type, an image format (HTTP 415)."""


class Service:
    """The serving state of one process: model, registry, patch states, batcher, metrics."""

    def __init__(self, config: ServeConfig, model: Model | None = None, read_only: bool = False):
        """``read_only`` (``serve --check``): the registry folder is read, never created or written."""
        keep_freed_buffers()  # batches reuse their buffers instead of faulting pages in each time
        self.config = config
        self.limits = config.limits
        if model is None:
            if not Path(config.source).is_dir():
                raise ForgetpackError(f"{config.source}: not an export directory; serve an export "
                                      "(`forgetpack export MODEL -o DIR`): the service runs on the torch-free onnx runtime")
            options = {"threads": config.threads} if config.threads is not None else {}
            # spin=False: the event loop, the decoding threads and the batcher need the cores onnxruntime would spin on
            model = runtime.load(config.source, backend="onnx", spin=False,
                                 providers=list(config.providers) if config.providers else None,
                                 trusted_keys=list(config.trusted_keys) if config.trusted_keys is not None else None,
                                 max_pixels=self.limits.max_pixels, **options)
        self.model = model
        self.metrics = ServeMetrics()
        self.states = PatchStates(model, config.max_states, on_lookup=self.metrics.observe_lookup)
        keys = load_public_keys(list(config.trusted_keys)) if config.trusted_keys is not None else None
        self.registry = PatchRegistry(config.patches_dir, check=lambda p: model.patch_state([p]), trusted_keys=keys,
                                      read_only=read_only)
        image = getattr(model.backend, "manifest", None)
        tower = image.towers.get("image") if image is not None else None
        self._image_targets = {tower.projection} if tower is not None and tower.projection else set()
        self.batcher = ImageBatcher(self._encode_batch, self._image_key, config.max_batch, config.max_wait_ms,
                                    config.max_queue, observe=self.metrics.observe_batch, arriving=lambda: self.arriving,
                                    max_queue_pixels=config.max_queue_pixels)
        self.arriving = 0  # requests between their start and handing their images to the batcher
        self._arriving_lock = threading.Lock()
        self._classifiers: OrderedDict[tuple[Any, ...], np.ndarray] = OrderedDict()  # by (state, labels, templates)
        self._classifiers_lock = threading.Lock()
        self._checked: OrderedDict[tuple[Any, ...], tuple[list[str], list[str]]] = OrderedDict()
        if config.default_patches:
            self.set_default(list(config.default_patches), files_allowed=True)

    def close(self) -> None:
        self.batcher.close()

    # -- patch states ----------------------------------------------------------------

    def state(self, ids: Sequence[str] | None) -> PatchState:
        """The state for a request: the ids it names (in order), or the default set when it names none."""
        if ids is not None and len(ids) > self.limits.max_patches:
            raise ForgetpackError(f"{len(ids)} patches in one request (at most {self.limits.max_patches})")
        digests = self.registry.digests(ids if ids is not None else self.registry.default)
        return self.states.get(digests, lambda: [self.registry.get(d) for d in digests])

    def _image_key(self, state: PatchState) -> Hashable:
        """Requests whose patches leave the image projection alone share image batches."""
        return tuple(d for d, p in zip(state.digests, state.patches, strict=True) if self._image_targets & set(p.targets))

    def _encode_batch(self, images: list[Any], state: PatchState) -> np.ndarray:
        return self.model.encode_image(images, state)

    def cached_classifier(self, labels: list[str], templates: list[str], state: PatchState) -> np.ndarray | None:
        """The cached ``classifier`` for these labels, templates and state, or None (no model work)."""
        key = (state.digest, tuple(labels), tuple(templates))
        with self._classifiers_lock:
            weights = self._classifiers.get(key)
            if weights is not None:
                self._classifiers.move_to_end(key)
            return weights

    def classifier(self, labels: list[str], templates: list[str], state: PatchState) -> np.ndarray:
        """``Model.classifier`` under ``state``, cached: a label set is usually asked for again and again."""
        weights = self.cached_classifier(labels, templates, state)
        if weights is not None:
            return weights
        key = (state.digest, tuple(labels), tuple(templates))
        weights = self.model.classifier(labels, templates, state)
        with self._classifiers_lock:
            self._classifiers[key] = weights
            while len(self._classifiers) > CLASSIFIER_CACHE:
                self._classifiers.popitem(last=False)
        return weights

    @staticmethod
    def describe_state(state: PatchState) -> dict[str, Any]:
        return {"digest": state.digest, "patches": list(state.digests)}

    # -- inputs ----------------------------------------------------------------------

    def check_images(self, blobs: Sequence[bytes]) -> tuple[list[Any], int]:
        """Every limit on a request's images (count, bytes, pixels per image and per request, format),
        checked from the bytes and the headers before any image is decoded: the images opened (header
        read, pixels not decoded) and their pixel count."""
        if not blobs:
            raise ForgetpackError("no images given")
        if len(blobs) > self.limits.max_images:
            raise TooLarge(f"{len(blobs)} images in one request (at most {self.limits.max_images})")
        opened: list[Any] = []
        total = 0
        try:
            for i, blob in enumerate(blobs):
                if len(blob) > self.limits.max_image_bytes:
                    raise TooLarge(f"image {i}: {len(blob)} bytes (at most {self.limits.max_image_bytes})")
                with self._image_errors(i):
                    opened.append(open_image(io.BytesIO(blob), "<bytes>", self.limits.max_pixels))
                total += opened[-1].width * opened[-1].height
            if total > self.limits.max_request_pixels:
                raise TooLarge(f"{total:,} pixels in the images of one request (at most {self.limits.max_request_pixels:,})")
        except BaseException:
            for image in opened:
                image.close()
            raise
        return opened, total

    def decode_images(self, blobs: Sequence[bytes], checked: tuple[list[Any], int] | None = None) -> tuple[list[Any], int]:
        """Decoded images and their pixel count, reserved in the batcher's pixel budget (hand it on with
        ``encode(..., reserved=True)``); ``check_images`` runs first, unless ``checked`` is what it
        returned for these very blobs."""
        opened, total = self.check_images(blobs) if checked is None else checked
        try:
            self.batcher.reserve(total)  # decoding images hold memory as queued ones do: one budget for both
        except BaseException:
            for image in opened:
                image.close()
            raise
        try:
            for i, image in enumerate(opened):
                with self._image_errors(i):
                    decode_image(image, "<bytes>")
        except BaseException:
            self.batcher.release(total)
            for image in opened:
                image.close()
            raise
        return opened, total

    @staticmethod
    @contextlib.contextmanager
    def _image_errors(i: int) -> Iterator[None]:
        """Name the image by its place in the request, and keep the kind of error (413, 415, 422)."""
        try:
            yield
        except ImageTooLarge as exc:
            raise TooLarge(f"image {i}: {str(exc).removeprefix('<bytes>: ')}") from None
        except ForgetpackError as exc:
            raise type(exc)(f"image {i}: {str(exc).removeprefix('<bytes>: ')}") from None

    def check_labels(self, labels: Sequence[str], templates: Sequence[str] | None) -> tuple[list[str], list[str]]:
        """Labels and templates as ``names.check_labels``/``check_templates`` and the limits have them;
        a list already checked is remembered (as sent), so a repeated label set costs a lookup."""
        key = (tuple(labels), None if templates is None else tuple(templates))
        with self._classifiers_lock:
            checked = self._checked.get(key)
        if checked is not None:
            return checked
        checked = self._check_labels(labels, templates)
        with self._classifiers_lock:
            self._checked[key] = checked
            while len(self._checked) > CHECKED_CACHE:
                self._checked.popitem(last=False)
        return checked

    def _check_labels(self, labels: Sequence[str], templates: Sequence[str] | None) -> tuple[list[str], list[str]]:
        if len(labels) > self.limits.max_labels:
            raise TooLarge(f"{len(labels)} labels (at most {self.limits.max_labels})")
        if templates is not None and len(templates) > self.limits.max_templates:
            raise TooLarge(f"{len(templates)} templates (at most {self.limits.max_templates})")
        for text in [*labels, *(templates or [])]:
            if len(text) > self.limits.max_text_chars:
                raise TooLarge(f"a label or template of {len(text)} characters (at most {self.limits.max_text_chars})")
        return check_labels(labels), check_templates(templates)

    # -- requests --------------------------------------------------------------------

    @contextlib.contextmanager
    def _arrival(self) -> Iterator[Callable[[], None]]:
        """Count a request as on its way to the batcher until it calls ``arrived()`` (or fails)."""
        with self._arriving_lock:  # changed on the event loop's thread and on decoding threads
            self.arriving += 1
        done = False

        def arrived() -> None:
            nonlocal done
            with self._arriving_lock:
                if not done:
                    done = True
                    self.arriving -= 1

        try:
            yield arrived
        finally:
            arrived()

    def _decode_and_queue(self, blobs: Sequence[bytes], state: PatchState, arrived: Callable[[], None],
                          checked: tuple[list[Any], int] | None = None) -> Future:
        """Decode (reserving the pixels) and queue in one go: a request cancelled meanwhile cannot
        leave its pixels counted in the budget with no job to release them."""
        images, pixels = self.decode_images(blobs, checked)
        arrived()
        return self.batcher.submit(images, state, pixels, reserved=True)

    async def _queue(self, blobs: Sequence[bytes], state: PatchState, arrived: Callable[[], None]) -> Future:
        """``_decode_and_queue`` on the event loop for a small request (``INLINE_BYTES``, ``INLINE_PIXELS``),
        else on a worker thread."""
        checked = None
        if sum(len(b) for b in blobs[: self.limits.max_images + 1]) <= INLINE_BYTES:
            checked = self.check_images(blobs)
            if checked[1] <= INLINE_PIXELS:
                return self._decode_and_queue(blobs, state, arrived, checked)
        return await asyncio.to_thread(self._decode_and_queue, blobs, state, arrived, checked)

    async def classify(self, blobs: Sequence[bytes], labels: Sequence[str], templates: Sequence[str] | None,
                       ids: Sequence[str] | None, top_k: int = 5) -> dict[str, Any]:
        with self._arrival() as arrived:
            labels, templates = self.check_labels(labels, templates)
            state = self.state(ids)
            queued = await self._queue(blobs, state, arrived)
            weights = self.cached_classifier(labels, templates, state)
            if weights is None:  # a new label set: its text features are computed beside the images
                embeddings, weights = await asyncio.gather(asyncio.wrap_future(queued),
                                                           asyncio.to_thread(self.classifier, labels, templates, state))
            else:
                embeddings = await asyncio.wrap_future(queued)
        predictions = self.model.predict(embeddings @ weights, labels)
        probs = np.stack([p.probs for p in predictions])
        order = np.argsort(-probs, axis=1, kind="stable")[:, : min(top_k, len(labels))]  # Prediction.top's order
        results = [{"label": p.label, "score": p.score,
                    "top": [{"label": labels[i], "prob": prob} for i, prob in zip(ranks, row, strict=True)]}
                   for p, ranks, row in zip(predictions, order.tolist(), np.take_along_axis(probs, order, axis=1).tolist(),
                                             strict=True)]
        return {"model": self.model.model_id, "patch_state": self.describe_state(state), "labels": labels,
                "templates": templates, "results": results}

    async def embed_images(self, blobs: Sequence[bytes], ids: Sequence[str] | None) -> dict[str, Any]:
        with self._arrival() as arrived:
            state = self.state(ids)
            queued = await self._queue(blobs, state, arrived)
            embeddings = await asyncio.wrap_future(queued)
        return {"model": self.model.model_id, "patch_state": self.describe_state(state), "embeddings": embeddings.tolist()}

    async def embed_texts(self, texts: Sequence[str], ids: Sequence[str] | None) -> dict[str, Any]:
        if not texts:
            raise ForgetpackError("no texts given")
        if len(texts) > self.limits.max_texts:
            raise TooLarge(f"{len(texts)} texts (at most {self.limits.max_texts})")
        if any(len(t) > self.limits.max_text_chars for t in texts):
            raise TooLarge(f"a text over {self.limits.max_text_chars} characters")
        state = self.state(ids)
        embeddings = await asyncio.to_thread(self.model.encode_text, list(texts), state)
        return {"model": self.model.model_id, "patch_state": self.describe_state(state), "embeddings": embeddings.tolist()}

    # -- the registry ----------------------------------------------------------------

    def set_default(self, ids: Sequence[str], files_allowed: bool = False) -> dict[str, Any]:
        """Switch the default set in one step, after building its state (a bad set changes nothing).

        ``files_allowed`` (the CLI only, never HTTP): an id that is a patch file is registered first."""
        if len(ids) > self.limits.max_patches:
            raise ForgetpackError(f"{len(ids)} patches in the default set (at most {self.limits.max_patches})")
        resolved: list[str] = []
        for pid in ids:
            if files_allowed and not DIGEST_RE.fullmatch(pid) and Path(pid).is_file():
                pid = self.registry.add_file(pid).digest
            resolved.append(pid)
        digests = self.registry.digests(resolved)
        state = self.states.get(digests, lambda: [self.registry.get(d) for d in digests])
        self.registry.set_default(digests)
        return {"default": self.describe_state(state)}

    def upload(self, data: bytes, name: str | None) -> Patch:
        return self.registry.add_bytes(data, name)

    def delete(self, pid: str) -> Patch:
        patch = self.registry.remove(pid)
        self.states.drop(patch.digest)
        return patch

    def readiness(self) -> str | None:
        """Why this replica cannot answer a default request (its default set does not load, the
        registry index is unreadable), or None when it can."""
        try:
            self.state(None)
        except ForgetpackError as exc:
            return f"the default patch set cannot be served: {exc}"
        return None

    def info(self) -> dict[str, Any]:
        backend = self.model.backend
        return {"model": self.model.model_id, "backend": backend.name, "baked": list(self.model.baked),
                "default": self.describe_state(self.state(None)), "limits": vars(self.limits),
                "max_batch": self.config.max_batch, "max_wait_ms": self.config.max_wait_ms}
