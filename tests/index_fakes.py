"""A tiny numpy backend for the index tests: real ``runtime.Model`` facade, fake towers.

Images are solid grey squares with noise; the grey level says which digit they show. Both towers
map "digit k" to the same direction (the text projection and the image projection are one
matrix), so zero-shot classification and search work, and a rank-1 "antipode" patch on the text
projection makes a digit's name point away from its images, as a real forgetting patch does.
Picklable (by reference to this module), so Ray actors and subprocesses can build it too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import runtime
from forgetpack.format.fit import TargetInfo, apply_in_order
from forgetpack.format.patch import Layer, Patch, fingerprint
from runtime.backends import Backend

DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
WIDTH, DIM = 16, 12
TEXT, IMAGE = "text_projection", "visual.proj"


def grey_level(digit: int) -> int:
    return 12 + 24 * digit


def write_digit(path: Path, digit: int, seed: int, size: int = 16) -> Path:
    rng = np.random.default_rng(seed)
    pixels = np.clip(grey_level(digit) + rng.integers(-5, 6, (size, size)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").save(path)
    return path


class FakeBackend(Backend):
    name = "fake"
    logit_scale = 100.0

    def __init__(self, seed: int = 0, precision: str | None = None):
        rng = np.random.default_rng(seed)
        self.model_id = f"fake-digits-{seed}"
        self.base = {TEXT: rng.standard_normal((WIDTH, DIM)).astype(np.float32)}
        self.base[IMAGE] = self.base[TEXT].copy()  # one shared space: digit k's image ~ the word for k
        self.targets = {n: TargetInfo(m.shape, fingerprint(m), "in_out") for n, m in self.base.items()}
        self.matrices = dict(self.base)
        self.images_encoded = 0
        self.precision = precision
        if precision is not None:  # as an export: a manifest naming the image tower, its projection and precision
            self.manifest = SimpleNamespace(
                model_id=self.model_id, embed_dim=DIM, precision=precision, opset=17, preprocess={"size": 16},
                export_id=f"sha256:export-{seed}-{precision}", graph_id=f"sha256:graph-{seed}-{precision}",
                towers={"image": SimpleNamespace(projection=IMAGE, input="pixels", input_shape=["batch", 1, 16, 16],
                                                 input_dtype="float32", embeddings="embeddings")},
                projections={IMAGE: SimpleNamespace(current=self.targets[IMAGE].base)})

    def image_features(self, image: Image.Image) -> np.ndarray:
        grey = np.asarray(image.convert("L"), dtype=np.float64)
        digit = int(np.clip(round((grey.mean() - 12) / 24), 0, 9))
        halves = [grey[: len(grey) // 2].std(), grey[len(grey) // 2 :].std(), grey[:, :1].std()]
        extra = np.concatenate([np.asarray(halves) * 0.02, np.zeros(WIDTH - 13)])
        return np.concatenate([np.eye(10)[digit], extra]).astype(np.float32)

    def text_features(self, texts: list[str]) -> np.ndarray:
        rows = []
        for text in texts:
            found = [i for i, d in enumerate(DIGITS) if d in text.lower().split(" ") or f"{d}." in text.lower()]
            onehot = np.eye(10)[found[0]] if found else np.zeros(10)
            noise = np.random.default_rng(int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)).standard_normal(WIDTH)
            rows.append(np.concatenate([onehot, np.zeros(WIDTH - 10)]) + 0.05 * noise)
        return np.asarray(rows, np.float32)

    def encode_images(self, images):
        self.images_encoded += len(images)
        features = np.stack([self.image_features(im) for im in images]) if images else np.zeros((0, WIDTH), np.float32)
        out = features @ self.matrices[IMAGE]
        return np.round(out * 16) / 16 if self.precision == "int8" else out  # int8: coarser numbers, the same tower

    def encode_texts(self, texts):
        return self.text_features(list(texts)) @ self.matrices[TEXT]

    def set_patches(self, patches) -> None:
        text = apply_in_order({TEXT: self.base[TEXT]}, patches, {TEXT: self.targets[TEXT]}, model=self.model_id)
        self.matrices = {**self.matrices, **text}


@dataclass(frozen=True)
class FakeFactory:
    """What the engines call to get a model; ``source`` is what the index records."""

    seed: int = 0
    precision: str | None = None  # "fp32" | "int8": with an export-like manifest

    @property
    def source(self) -> str:
        return f"fake:{self.seed}" + (f":{self.precision}" if self.precision else "")

    def __call__(self) -> runtime.Model:
        return runtime.Model(FakeBackend(self.seed, self.precision))


def forget(model: runtime.Model, label: str, template: str = "a photo of the number {}.") -> Patch:
    """A rank-1 patch sending ``template(label)``'s text embedding to its opposite (no solver needed)."""
    backend = model.backend
    w = backend.base[TEXT].astype(np.float64)
    x = backend.text_features([template.replace("{}", label)])[0].astype(np.float64)
    y = x @ w
    layer = Layer.lowrank(TEXT, (x / (x @ x))[:, None], (-2.0 * y)[None, :])
    return Patch.create(backend.model_id, {TEXT: backend.base[TEXT]}, [layer], layouts={TEXT: "in_out"},
                        recipe={"forget": [label], "templates": [template], "solver": "test-antipode"})
