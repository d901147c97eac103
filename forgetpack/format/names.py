"""Names, labels and prompt templates: the checks every list of them gets, and the defaults.

One place for rules that the engine (forget names, preserve names), evaluation (class names,
templates), the runtime (labels, templates) and the CLI (comma-separated options) all apply.
Torch-free, so the runtime can use it.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_input_file

MAX_NAME_CHARS = 200

# The phrasings a forget patch is solved and verified under (several at once: a patch must
# hold for the ways users classify).
FORGET_TEMPLATES = ("{}", "a photo of a {}.", "a photo of the {}.", "an image of a {}.", "a {}.")
# What zero-shot classification uses when nobody says otherwise (CLIP's own default prompt).
CLASSIFY_TEMPLATES = ("a photo of a {}.",)


def split_names(values: Iterable[str]) -> list[str]:
    """``--forget seven --forget three`` and ``--forget seven,three`` mean the same, in every
    command. Empty parts are kept, so that the name checks can reject them by name."""
    return [part.strip() for value in values for part in value.split(",")]


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


def check_labels(labels: str | Sequence[str]) -> list[str]:
    """Labels to classify over: at least one, none empty, none repeated (exactly as written)."""
    labels = [labels] if isinstance(labels, str) else list(labels)
    labels = [str(label).strip() for label in labels]
    if not labels or not any(labels):
        raise ForgetpackError("no labels given: classification needs at least one label")
    if any(not label for label in labels):
        raise ForgetpackError("empty label in the label list")
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ForgetpackError(f"duplicate label(s): {', '.join(duplicates)}")
    return labels


def check_template(template: object) -> str:
    """One prompt template: text with ``{}`` exactly once, where the name goes, and no other braces.

    Inspected with ``string.Formatter().parse``, never formatted: a format spec, conversion, field
    name or escaped brace (``{:>999999999}``, ``{!r}``, ``{0}``, ``{{``) is refused, so every consumer
    may fill it with ``template.replace("{}", name)`` or ``template.format(name)`` alike.
    """
    if not isinstance(template, str):
        raise ForgetpackError(f"template {template!r} is not text")
    shown = template if len(template) <= 80 else template[:80] + "..."
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError:
        parts = None  # unbalanced braces
    fields = [] if parts is None else [p for p in parts if p[1] is not None]
    plain = template.count("{") == template.count("}") == template.count("{}") == 1  # '{:}', '{{' and the like
    if parts is None or not plain or len(fields) != 1 or fields[0][1:] != ("", "", None):
        raise ForgetpackError(f"template {shown!r} must contain '{{}}' exactly once (where the name goes) "
                              "and no other braces, format specs or conversions")
    return template


def check_templates(templates: str | Sequence[str] | None, default: Sequence[str] = CLASSIFY_TEMPLATES) -> list[str]:
    """Prompt templates, each checked by :func:`check_template`.

    ``None`` means ``default``; repeats are dropped (keeping order); an empty list is an error.
    """
    templates = list(default if templates is None else ([templates] if isinstance(templates, str) else templates))
    for t in templates:
        check_template(t)
    out = list(dict.fromkeys(templates))
    if not out:
        raise ForgetpackError("no templates given")
    return out


def read_names_file(path: str | Path, what: str = "preserve") -> list[str]:
    """Names from a UTF-8 text file: one per line; blank lines and ``#`` comments skipped."""
    path = check_input_file(path, f"{what} file")  # missing, a folder, a FIFO: named as such
    try:
        text = path.read_bytes().decode("utf-8-sig")
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
