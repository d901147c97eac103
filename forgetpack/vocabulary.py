"""Names: the built-in vocabulary, name files, and the checks every list of names gets.

The built-in vocabulary is open_clip's 1,000 ImageNet class names
(``open_clip.zero_shot_metadata.IMAGENET_CLASSNAMES``), copied to
``forgetpack/data/imagenet_classes.txt`` so that reading it does not import open_clip.
Two of those names occur twice (``missile``, ``sunglasses``); the vocabulary keeps one of each.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from forgetpack.errors import ForgetpackError

DATA = Path(__file__).resolve().parent / "data"
IMAGENET_FILE = DATA / "imagenet_classes.txt"
MAX_NAME_CHARS = 200


@functools.lru_cache(maxsize=1)
def builtin_vocabulary() -> tuple[str, ...]:
    """The built-in candidate names (ImageNet-1k, de-duplicated, in their usual order)."""
    return tuple(dict.fromkeys(line.strip() for line in IMAGENET_FILE.read_text(encoding="utf-8").splitlines() if line.strip()))


def normalize_name(name: str) -> str:
    """A name's identity for duplicate and alias checks: case, spacing and punctuation ignored."""
    folded = " ".join(name.casefold().split())
    return " ".join(re.sub(r"[^\w\s]", " ", folded).split()) or folded


def clean_names(names: Iterable[str], what: str) -> list[str]:
    """Strip names and reject empty, over-long and duplicate ones (one clear line each)."""
    out: list[str] = []
    seen: dict[str, str] = {}
    for raw in names:
        if not isinstance(raw, str):
            raise ForgetpackError(f"{what} name {raw!r} is not text")
        name = " ".join(raw.split())
        if not name:
            raise ForgetpackError(f"empty {what} name {raw!r}")
        if len(name) > MAX_NAME_CHARS:
            raise ForgetpackError(f"{what} name {name[:40]!r}... is longer than {MAX_NAME_CHARS} characters")
        key = normalize_name(name)
        if key in seen:
            raise ForgetpackError(f"duplicate {what} name {name!r} (same as {seen[key]!r})")
        seen[key] = name
        out.append(name)
    return out


def check_disjoint(forget: Sequence[str], preserve: Sequence[str]) -> None:
    keys = {normalize_name(n): n for n in forget}
    for name in preserve:
        if normalize_name(name) in keys:
            raise ForgetpackError(f"{name!r} is both a forget name and a preserve name")


def read_names_file(path: str | Path, what: str = "preserve") -> list[str]:
    """Names from a UTF-8 text file: one per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise ForgetpackError(f"{what} file {path} does not exist")
    try:
        data = path.read_bytes()
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ForgetpackError(f"{what} file {path} is not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ForgetpackError(f"cannot read {what} file {path}: {exc.strerror}") from exc
    if "\x00" in text:
        raise ForgetpackError(f"{what} file {path} is not text (it contains NUL bytes)")
    names = [line.strip() for line in text.splitlines()]
    names = [n for n in names if n and not n.startswith("#")]
    if not names:
        raise ForgetpackError(f"{what} file {path} lists no names")
    return clean_names(names, what)


def vocabulary(extra: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[str]:
    """The built-in vocabulary plus ``extra`` names, without ``exclude`` (compared normalised)."""
    banned = {normalize_name(n) for n in exclude}
    out: dict[str, str] = {}
    for name in (*builtin_vocabulary(), *extra):
        key = normalize_name(name)
        if key and key not in banned and key not in out:
            out[key] = name
    return list(out.values())
