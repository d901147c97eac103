"""What a ``forgetpack serve`` instance is given, and its limits: one frozen object every part reads."""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_input_file

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True)
class Limits:
    """Per-request bounds: a request over one is refused whole (413 or 422) before any model work."""

    max_body_bytes: int = 32 * 1024 * 1024  # the whole request: images, base64 included
    max_image_bytes: int = 16 * 1024 * 1024  # one encoded image
    max_pixels: int = 16_000_000  # one decoded image (checked from its header, before decoding)
    max_request_pixels: int = 64_000_000  # all the images of one request, decoded (about 200 MB as RGB)
    max_images: int = 64
    max_labels: int = 1000
    max_templates: int = 32
    max_texts: int = 256
    max_text_chars: int = 1000
    max_patches: int = 32  # patches in one request's set
    max_top_k: int = 1000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if type(value) is not int or value < 1:
                raise ForgetpackError(f"serve limit {name} must be a positive whole number, not {value!r}")


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``create_app`` needs; the CLI and the Ray deployment both build one."""

    source: str  # an export directory (served with the onnx backend)
    patches_dir: str | None = None  # the registry folder; None keeps uploads in memory only
    default_patches: tuple[str, ...] = ()  # registry ids or patch files, applied when a request names none
    trusted_keys: tuple[str, ...] | None = None  # public key files; when set, only signed patches are accepted
    admin_token: str | None = field(default=None, repr=False)  # None: the write routes are disabled
    max_batch: int = 32  # images per micro-batch
    max_wait_ms: float = 5.0  # how long the first image of a batch waits for company
    max_queue: int = 512  # images waiting; beyond this, 503 with Retry-After
    max_queue_pixels: int = 256_000_000  # decoded pixels waiting (about 800 MB as RGB); beyond this, 503
    max_states: int = 256  # patch states kept in memory (LRU)
    threads: int | None = None  # onnxruntime intra-op threads
    providers: tuple[Any, ...] | None = None
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_queue_pixels", "max_states"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ForgetpackError(f"{name} must be a positive whole number, not {value!r}")
        # a queue smaller than one allowed request would answer that request 503 for ever
        if self.max_queue < self.limits.max_images:
            raise ForgetpackError(f"max_queue ({self.max_queue}) is below the images one request may send "
                                  f"({self.limits.max_images}): such a request could never be queued")
        if self.max_queue_pixels < self.limits.max_request_pixels:
            raise ForgetpackError(f"max_queue_pixels ({self.max_queue_pixels:,}) is below the pixels one request may send "
                                  f"({self.limits.max_request_pixels:,}): such a request could never be queued")
        if not 0 <= float(self.max_wait_ms) <= 1000:
            raise ForgetpackError(f"max_wait_ms must be from 0 to 1000, not {self.max_wait_ms!r}")
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ForgetpackError("the admin token is too short: use at least 16 characters (e.g. `openssl rand -hex 32`)")


def read_admin_token(path: str | os.PathLike[str]) -> str:
    """The admin token from a file (first line, stripped); a missing or short one is an error."""
    check_input_file(path, "admin token file")  # a FIFO or device would block the start for ever
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ForgetpackError(f"{path}: cannot read the admin token ({getattr(exc, 'strerror', None) or exc})") from None
    if len(token) < 16:
        raise ForgetpackError(f"{path}: the admin token is too short: use at least 16 characters")
    return token


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison, so response times do not leak how much of a guess was right."""
    return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))
