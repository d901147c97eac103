"""Shared set-up for the ``forgetpack serve`` tests: the mini export, real forget patches, real digits."""

from __future__ import annotations

import base64
import io
import socket
from pathlib import Path

from PIL import Image

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def serve_export(tmp_path_factory) -> Path:
    """The mini export, shared with test_runtime.py and the others through the session temp dir."""
    from test_runtime import cached_export

    return cached_export(tmp_path_factory, "mini")


def forget_patches(tmp_path_factory, names=("seven", "three")) -> dict[str, Path]:
    """Real patches, as ``forgetpack forget mini --forget NAME`` makes them (made once per test run and
    shared by pytest-xdist's workers: tests/run_shared.py)."""
    from run_shared import build_once

    def build(folder: Path) -> None:
        from forgetpack.engine.models import load_model
        from forgetpack.engine.solve import forget

        folder.mkdir(parents=True, exist_ok=True)
        loaded = load_model("mini")
        for name in names:
            if not (folder / f"{name}.fpatch.safetensors").is_file():
                forget(loaded, [name]).patch.save(folder / f"{name}.fpatch.safetensors")

    folder = build_once(tmp_path_factory, "serve-patches", lambda f: all((f / f"{n}.fpatch.safetensors").is_file() for n in names),
                        build)
    return {name: folder / f"{name}.fpatch.safetensors" for name in names}


def digits(label: str, count: int) -> list[Image.Image]:
    """Held-out MNIST images of ``label`` (mini's built-in test set)."""
    from forgetpack.evaluation.datasets import load_dataset

    data = load_dataset("mnist")
    return [im for im, i in zip(data.images, data.labels, strict=True) if data.classnames[i] == label][:count]


def digit_names() -> list[str]:
    from forgetpack.evaluation.datasets import load_dataset

    return list(load_dataset("mnist").classnames)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
