"""Image loading and open_clip's eval preprocessing with PIL and numpy only (no torch).

The export records open_clip's eval transform as a list of steps (``forgetpack.export``
reads them off the model's own torchvision ``Compose``); this module replays them with the
very PIL calls torchvision makes on PIL images (``Image.resize``, ``Image.crop``,
``ImageOps.expand``), then ``to_tensor`` and ``normalize`` in float32. The result equals
open_clip's preprocess bit for bit (tests/test_runtime.py checks it).
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from forgetpack.format.errors import ForgetpackError, one_line
from forgetpack.format.fileio import check_input_file

ImageInput = str | os.PathLike | bytes | Image.Image | np.ndarray

# The pixel budget: an image larger than this is refused from its header, before decoding, and
# so is one whose resize for the model would exceed it (a 2,000,000 x 1 strip). 40 megapixels
# takes a 6000 x 6000 photo; pass ``max_pixels`` to ``runtime.load`` to change it.
MAX_PIXELS = 40_000_000
MAX_ASPECT = 100  # a panorama is 10:1; resizing a 100:1 strip's short side to 224 already makes 5 megapixels

# The image formats decoded, and only these: PIL's other plugins (EPS through Ghostscript, PSD,
# ICNS, the scientific formats…) are never reached, whatever bytes arrive. TIFF is left out on
# purpose: photos come as JPEG, PNG or WebP, and TIFF's decoders are PIL's largest attack surface.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"


class ImageTooLarge(ForgetpackError):
    """An image over the pixel budget or too elongated, known from its header (HTTP 413 in the service)."""


class UnsupportedImage(ForgetpackError):
    """Bytes that are not an image in one of :data:`IMAGE_FORMATS` (HTTP 415 in the service)."""

_PIL_MODES = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "box": Image.BOX,
              "hamming": Image.HAMMING, "lanczos": Image.LANCZOS}


def check_pixel_budget(max_pixels: int) -> int:
    if type(max_pixels) is not int or max_pixels < 1:
        raise ForgetpackError(f"max_pixels must be a positive whole number, not {max_pixels!r}")
    return max_pixels


def _check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    if width < 1 or height < 1:
        raise ForgetpackError(f"{name}: an image of {width}x{height} pixels has nothing to classify")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{name}: {width}x{height} pixels is over the budget of {max_pixels:,} (max_pixels)")
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise ImageTooLarge(f"{name}: a {width}x{height} image is too elongated to resize (aspect ratio over {MAX_ASPECT})")


def open_image(handle: Any, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The one place images are opened: the header only, in :data:`IMAGE_FORMATS` only, size checked."""
    try:
        image = Image.open(handle, formats=IMAGE_FORMATS)  # reads the header only
    except Image.DecompressionBombError:  # PIL's own ceiling, for headers far over any budget
        raise ImageTooLarge(f"{name}: image refused: its header declares far more than {max_pixels:,} pixels") from None
    except UnidentifiedImageError:
        raise UnsupportedImage(f"{name}: cannot decode image: not an image in a format this runtime reads ({FORMAT_NAMES})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # a header that breaks off, an unreadable file
        raise ForgetpackError(f"{name}: cannot decode image ({one_line(exc, 200)})") from None
    try:
        _check_size(name, image.width, image.height, max_pixels)
    except ForgetpackError:
        image.close()
        raise
    return image


def load_image(source: ImageInput, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A decoded PIL image from a path, bytes, a PIL image or an HWC uint8 array.

    Its size is checked against ``max_pixels`` from the header, before any pixel is decoded."""
    if isinstance(source, Image.Image):
        _check_size("image", source.width, source.height, max_pixels)
        return source
    if isinstance(source, np.ndarray):
        if source.ndim not in (2, 3) or 0 in source.shape[:2]:
            raise ForgetpackError(f"array of shape {list(source.shape)} is not an image (expected H x W or H x W x C, not empty)")
        _check_size("array", source.shape[1], source.shape[0], max_pixels)
        try:
            return Image.fromarray(source)
        except (TypeError, ValueError) as exc:
            raise ForgetpackError(f"array of shape {list(source.shape)} and dtype {source.dtype} is not an image ({exc})") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        name, handle = "<bytes>", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        name = str(source)
        handle = check_input_file(source, "image")
    else:
        raise ForgetpackError(f"cannot read an image from a {type(source).__name__}")
    return decode_image(open_image(handle, name, max_pixels), name)


def decode_image(image: Image.Image, name: str) -> Image.Image:
    """Decode an image :func:`open_image` opened, now, so a truncated or corrupt file fails here, not
    mid-batch (the service checks every image's header first, then decodes the same objects)."""
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ForgetpackError(f"{name}: image refused ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise ForgetpackError(f"{name}: cannot decode image ({one_line(exc, 200)})") from None
    return image


# ---------------------------------------------------------------------------- the steps


def _resize_shortest(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """torchvision ``Resize(int)``: the shorter edge becomes ``size``, the longer is truncated."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return image
    return image.resize((new_w, new_h), _PIL_MODES[interpolation])


def _resize_exact(image: Image.Image, size: Sequence[int], interpolation: str) -> Image.Image:
    """torchvision ``Resize((h, w))``."""
    h, w = size
    if image.size == (w, h):
        return image
    return image.resize((w, h), _PIL_MODES[interpolation])


def _resize_keep_ratio(image: Image.Image, size: Sequence[int], longest: float, interpolation: str) -> Image.Image:
    """open_clip's ``ResizeKeepRatio`` (eval: no random scale or aspect)."""
    source = image.size[::-1]  # h, w
    ratio_h, ratio_w = source[0] / size[0], source[1] / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    target = [round(x * 1.0 / ratio) for x in source]
    return _resize_exact(image, target, interpolation)


def _pad(image: Image.Image, ltrb: Sequence[int], fill: int) -> Image.Image:
    """torchvision's PIL ``pad`` in constant mode."""
    bands = len(image.getbands())
    value: int | tuple[int, ...] = (int(fill),) * bands if bands > 1 else int(fill)
    if image.mode == "P":
        palette = image.getpalette()
        out = ImageOps.expand(image, border=tuple(ltrb), fill=value)
        out.putpalette(palette)
        return out
    return ImageOps.expand(image, border=tuple(ltrb), fill=value)


def _center_crop(image: Image.Image, size: Sequence[int], fill: int = 0) -> Image.Image:
    """torchvision ``center_crop`` / open_clip ``center_crop_or_pad`` on a PIL image."""
    crop_h, crop_w = size
    w, h = image.size
    if crop_w > w or crop_h > h:
        ltrb = [
            (crop_w - w) // 2 if crop_w > w else 0,
            (crop_h - h) // 2 if crop_h > h else 0,
            (crop_w - w + 1) // 2 if crop_w > w else 0,
            (crop_h - h + 1) // 2 if crop_h > h else 0,
        ]
        image = _pad(image, ltrb, fill)
        w, h = image.size
        if (crop_w, crop_h) == (w, h):
            return image
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return image.crop((left, top, left + crop_w, top + crop_h))


class Preprocessor:
    """Replays an export's preprocessing steps: PIL image in, float32 CHW array out."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.steps: list[dict[str, Any]] = list(settings["steps"])
        known = {"resize_shortest", "resize", "resize_keep_ratio", "center_crop", "convert", "to_tensor", "normalize"}
        for step in self.steps:
            if step.get("op") not in known:
                raise ForgetpackError(f"unknown preprocessing step {step.get('op')!r} in the manifest")
            if "interpolation" in step and step["interpolation"] not in _PIL_MODES:
                raise ForgetpackError(f"unknown interpolation {step['interpolation']!r} in the manifest")

    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.settings["size"])  # type: ignore[return-value]

    def __call__(self, image: Image.Image) -> np.ndarray:
        try:
            return self._apply(image)
        except (ValueError, OSError) as exc:  # e.g. a 1-pixel-high image that resizes to height 0
            raise ForgetpackError(f"cannot preprocess a {image.size[0]}x{image.size[1]} {image.mode} image ({one_line(exc, 200)})") from None

    def _apply(self, image: Image.Image) -> np.ndarray:
        data: Any = image
        for step in self.steps:
            op = step["op"]
            if op == "resize_shortest":
                data = _resize_shortest(data, int(step["size"]), step["interpolation"])
            elif op == "resize":
                data = _resize_exact(data, step["size"], step["interpolation"])
            elif op == "resize_keep_ratio":
                data = _resize_keep_ratio(data, step["size"], float(step["longest"]), step["interpolation"])
            elif op == "center_crop":
                data = _center_crop(data, step["size"], int(step.get("fill", 0)))
            elif op == "convert":
                data = data.convert(step["mode"])
            elif op == "to_tensor":
                data = _to_tensor(data)
            elif op == "normalize":
                mean = np.asarray(step["mean"], dtype=np.float32)[:, None, None]
                std = np.asarray(step["std"], dtype=np.float32)[:, None, None]
                data = (data - mean) / std
        if not isinstance(data, np.ndarray):
            raise ForgetpackError("the manifest's preprocessing never converts the image to an array")
        return data

    def batch(self, images: Sequence[ImageInput]) -> np.ndarray:
        """Load and preprocess a batch into one ``[N, 3, H, W]`` float32 array."""
        return np.stack([self(load_image(img)) for img in images]).astype(np.float32, copy=False)


def _to_tensor(image: Image.Image) -> np.ndarray:
    """torchvision ``to_tensor`` for the 8-bit RGB image the pipeline has made by then."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return (array.astype(np.float32) / np.float32(255)).transpose(2, 0, 1)
