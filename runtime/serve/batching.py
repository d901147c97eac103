"""Micro-batching of images across concurrent requests, with a bounded wait and a bounded queue.

The image tower dominates the cost of a request, and a batch of 32 runs much faster per image
than 32 batches of one. Requests put their (decoded) images here; one worker thread takes the
oldest request, waits at most ``max_wait_ms`` for others that share its image side (requests whose
patches leave the image projection alone all do, whatever their text patches), and encodes them
together; it does not wait when no other request is on its way, so a lone request pays nothing. The queue holds at most ``max_queue`` images and ``max_queue_pixels``
decoded pixels (what the memory of a queued image is): past either, ``submit`` raises
:class:`Overloaded` at once (the app answers 503 with Retry-After) instead of letting latency or memory grow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Overloaded(Exception):
    """The queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, queued: int, limit: int, retry_after: int = 1, what: str = "images"):
        super().__init__(f"the server is busy ({queued:,} {what} queued, at most {limit:,}): retry after {retry_after} s")
        self.retry_after = retry_after


class Closed(Exception):
    """The batcher is shutting down and accepts no new work."""


@dataclass
class _Job:
    images: list[Any]
    state: Any
    key: Hashable
    pixels: int = 0
    future: Future = field(default_factory=Future)
    since: float = field(default_factory=time.monotonic)


class ImageBatcher:
    """Group image-encoding jobs that share an image-side key into batches of at most ``max_batch`` images."""

    def __init__(self, encode: Callable[[list[Any], Any], np.ndarray], key: Callable[[Any], Hashable],
                 max_batch: int = 32, max_wait_ms: float = 5.0, max_queue: int = 512,
                 observe: Callable[[int, int], None] | None = None, arriving: Callable[[], int] | None = None,
                 max_queue_pixels: int | None = None):
        self._encode, self._key = encode, key
        # how many requests are on their way here (decoding their images); none: do not wait for company
        self._arriving = arriving or (lambda: 1)
        self.max_batch, self.max_wait, self.max_queue = max_batch, max_wait_ms / 1000.0, max_queue
        self._observe = observe or (lambda images, queued: None)  # (batch size, images still queued)
        self._pending: list[_Job] = []
        self.queued = 0
        self.max_queue_pixels, self.queued_pixels = max_queue_pixels, 0
        self._closed = False
        self._cond = threading.Condition()
        self._worker = threading.Thread(target=self._run, name="forgetpack-image-batcher", daemon=True)
        self._worker.start()

    def reserve(self, pixels: int) -> None:
        """Count ``pixels`` against the queue's pixel budget before they are decoded (or raise
        :class:`Overloaded`): images being decoded hold memory as queued ones do. Hand the
        reservation to ``submit(..., reserved=True)``, or give it back with :meth:`release`."""
        with self._cond:
            if self.max_queue_pixels is not None and self.queued_pixels + pixels > self.max_queue_pixels:
                raise Overloaded(self.queued_pixels, self.max_queue_pixels, what="pixels")
            self.queued_pixels += pixels

    def release(self, pixels: int) -> None:
        with self._cond:
            self.queued_pixels -= pixels

    def submit(self, images: Sequence[Any], state: Any, pixels: int = 0, reserved: bool = False) -> Future:
        """Queue ``images`` (``pixels`` decoded pixels in all, already counted when ``reserved``) to
        encode under ``state``; the future holds their ``[n, d]`` embeddings."""
        job = _Job(list(images), state, self._key(state), pixels)
        with self._cond:
            try:
                if self._closed:
                    raise Closed("the server is shutting down")
                if self.queued + len(job.images) > self.max_queue:
                    raise Overloaded(self.queued, self.max_queue)
                if not reserved and self.max_queue_pixels is not None and self.queued_pixels + pixels > self.max_queue_pixels:
                    raise Overloaded(self.queued_pixels, self.max_queue_pixels, what="pixels")
            except (Closed, Overloaded):
                if reserved:
                    self.queued_pixels -= pixels
                raise
            self._pending.append(job)
            self.queued += len(job.images)
            if not reserved:
                self.queued_pixels += pixels
            self._cond.notify()
        return job.future

    async def encode(self, images: Sequence[Any], state: Any, pixels: int = 0, reserved: bool = False) -> np.ndarray:
        return await asyncio.wrap_future(self.submit(images, state, pixels, reserved))

    def close(self, timeout: float = 30.0) -> None:
        """Accept nothing more, finish what was accepted, stop the worker."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._worker.join(timeout)

    # -- the worker ------------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        """The next batch: the oldest job and the jobs after it with the same key (lock held)."""
        while not self._pending:
            if self._closed:
                return None
            self._cond.wait()
        first = self._pending[0]
        deadline = first.since + self.max_wait
        while not self._closed:
            ready = sum(len(j.images) for j in self._pending if j.key == first.key)
            remaining = deadline - time.monotonic()
            if ready >= self.max_batch or remaining <= 0 or self._arriving() == 0:
                break
            self._cond.wait(remaining)
        batch, size = [], 0
        for job in self._pending:
            if job.key == first.key and (not batch or size + len(job.images) <= self.max_batch):
                batch.append(job)
                size += len(job.images)
        taken = {id(j) for j in batch}
        self._pending = [j for j in self._pending if id(j) not in taken]
        self.queued -= size
        self.queued_pixels -= sum(j.pixels for j in batch)
        return batch

    def _run(self) -> None:
        while True:
            with self._cond:
                batch = self._take()
            if batch is None:
                return
            images = [im for job in batch for im in job.images]
            self._observe(len(images), self.queued)
            try:
                embeddings = self._encode(images, batch[0].state)
            except BaseException as exc:  # every waiting request gets the error, the worker lives on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            start = 0
            for job in batch:
                job.future.set_result(embeddings[start : start + len(job.images)])
                start += len(job.images)
