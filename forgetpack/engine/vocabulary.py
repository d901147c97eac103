"""The built-in vocabulary: candidate class names for preserve sets and verification.

The built-in vocabulary is open_clip's 1,000 ImageNet class names
(``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``), copied to
``forgetpack/engine/data/imagenet_classes.txt`` so that reading it does not import open_clip.
Two of those names occur twice (``missile``, ``sunglasses``); the vocabulary keeps one of each.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

from forgetpack.format.names import normalize_name

DATA = Path(__file__).resolve().parent / "data"
IMAGENET_FILE = DATA / "imagenet_classes.txt"


@functools.lru_cache(maxsize=1)
def builtin_vocabulary() -> tuple[str, ...]:
    """The built-in candidate names (ImageNet-1k, de-duplicated, in their usual order)."""
    return tuple(dict.fromkeys(line.strip() for line in IMAGENET_FILE.read_text(encoding="utf-8").splitlines() if line.strip()))


def vocabulary(extra: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """The built-in vocabulary plus ``extra`` names, without ``exclude`` (compared normalised)."""
    banned = {normalize_name(n) for n in exclude}
    out: dict[str, str] = {}
    for name in (*builtin_vocabulary(), *extra):
        key = normalize_name(name)
        if key and key not in banned and key not in out:
            out[key] = name
    return list(out.values())
