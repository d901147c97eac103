"""Reading a request's text fields and binary framing: the rules the routes share (multipart fields
and the binary route's query alike), each in one function. Errors are ``HTTPError``s: the status
and message the client gets."""

from __future__ import annotations

import re
from collections.abc import Sequence

TOP_K_RE = re.compile(r"[0-9]{1,4}")
LENGTHS_RE = re.compile(r"[0-9]{1,10}(?: *, *[0-9]{1,10})*")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def top_k_of(values: Sequence[str] | None) -> int:
    """``top_k`` from text fields (multipart, query): one value, ASCII digits, 1 to 1000; 5 when absent."""
    values = values or ["5"]
    if len(values) != 1 or not TOP_K_RE.fullmatch(values[0]) or not 1 <= int(values[0]) <= 1000:
        raise HTTPError(422, "top_k: a whole number from 1 to 1000")  # ASCII digits: '²'.isdigit() is True
    return int(values[0])


def patch_ids(values: Sequence[str] | None) -> list[str] | None:
    """Patch ids from text fields (multipart, query): none given means the default set, one empty
    value (``patches=``) means no patches at all (JSON's ``[]``), else the ids in order."""
    if values is None:
        return None
    return [] if list(values) == [""] else list(values)


def split_images(body: bytes, framing: list[str], max_images: int) -> list[bytes]:
    """The images of a binary body: the whole body, or the pieces the one ``X-Image-Lengths`` header
    gives (byte counts in order, none zero, adding up to the body's length)."""
    if not body:
        raise HTTPError(422, "no image: the body is empty (send the image file's bytes)")
    if not framing:
        return [body]
    text = framing[0].strip()
    if len(framing) > 1 or len(text) > 12 * (max_images + 1) or not LENGTHS_RE.fullmatch(text):
        raise HTTPError(400, "X-Image-Lengths: one header of byte counts separated by commas, e.g. '1234,5678'")
    lengths = [int(n) for n in text.split(",")]
    if len(lengths) > max_images:
        raise HTTPError(413, f"{len(lengths)} images in one request (at most {max_images})")
    if 0 in lengths or sum(lengths) != len(body):
        raise HTTPError(400, f"X-Image-Lengths: {len(lengths)} images of {sum(lengths)} bytes in all, none empty, "
                             f"but the body has {len(body)} bytes")
    out, start = [], 0
    for n in lengths:
        out.append(body[start : start + n])
        start += n
    return out
