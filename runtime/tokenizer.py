"""Tokenization that matches open_clip's, with the ``tokenizers`` library instead of torch.

Two kinds, recorded in the manifest under ``tokenizer.kind``:

- ``clip_bpe``: open_clip's ``SimpleTokenizer`` (OpenAI-style towers). The exporter
  (``forgetpack.export.tokenizer``) writes its BPE vocabulary and merges as a ``tokenizer.json``
  whose pre-tokenizer is the same regex and byte-level mapping (as Hugging Face's
  CLIPTokenizerFast does); here we add open_clip's text cleaning,
  ``<start_of_text>``/``<end_of_text>``, truncation (last token forced to end-of-text) and zero
  padding to the context length.
- ``hf``: open_clip's ``HFTokenizer``: the Hugging Face fast tokenizer's own
  ``tokenizer.json``, with open_clip's cleaning, ``max_length`` truncation and padding.

Text cleaning uses ``ftfy`` when it is installed, exactly as open_clip does. Without it a
small subset of ``ftfy.fix_text`` runs (NFC, curly quotes, ligatures, full-width forms):
identical for ordinary text; ``ftfy`` additionally repairs mojibake. Install ``ftfy`` for
byte-exact tokens on broken text.
"""

from __future__ import annotations

import html
import string
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201a": "'", "\u201b": "'", "\u2032": "'",
                         "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u201f": '"', "\u2033": '"'})
_LIGATURES = str.maketrans({"\ufb00": "ff", "\ufb01": "fi", "\ufb02": "fl", "\ufb03": "ffi", "\ufb04": "ffl",
                            "\ufb05": "ſt", "\ufb06": "st", "\u0132": "IJ", "\u0133": "ij", "\u01c7": "LJ",
                            "\u01c8": "Lj", "\u01c9": "lj", "\u01ca": "NJ", "\u01cb": "Nj", "\u01cc": "nj"})


def _fix_text_fallback(text: str) -> str:
    """The parts of ``ftfy.fix_text`` that matter for text that is not mojibake."""
    text = text.translate(_LIGATURES).translate(_QUOTES)
    text = "".join(unicodedata.normalize("NFKC", c) if 0xFF01 <= ord(c) <= 0xFF5E or c == "\u3000" else c for c in text)
    return unicodedata.normalize("NFC", text)


try:
    import ftfy

    _fix_text: Callable[[str], str] = ftfy.fix_text
    EXACT_CLEANING = True
except ImportError:  # pragma: no cover - exercised only where ftfy is absent
    _fix_text = _fix_text_fallback
    EXACT_CLEANING = False


def basic_clean(text: str) -> str:
    return html.unescape(html.unescape(_fix_text(text))).strip()


def whitespace_clean(text: str) -> str:
    return " ".join(text.split()).strip()


def canonicalize(text: str) -> str:
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split()).strip()


CLEANERS: dict[str, Callable[[str], str]] = {
    "lower": lambda t: whitespace_clean(basic_clean(t)).lower(),
    "whitespace": lambda t: whitespace_clean(basic_clean(t)),
    "canonicalize": lambda t: canonicalize(basic_clean(t)),
}


class TextTokenizer:
    """Texts in, ``[N, context_length]`` int64 token ids out, as open_clip's tokenizer gives."""

    def __init__(self, directory: str | Path, settings: dict[str, Any]):
        from tokenizers import Tokenizer

        self.settings = settings
        self.kind = settings.get("kind")
        if self.kind not in ("clip_bpe", "hf"):
            raise ForgetpackError(f"unknown tokenizer kind {self.kind!r} in the manifest")
        clean = settings.get("clean", "lower")
        if clean not in CLEANERS:
            raise ForgetpackError(f"unknown text cleaning {clean!r} in the manifest")
        self.clean = CLEANERS[clean]
        self.context_length = int(settings["context_length"])
        path = Path(directory) / settings["file"]
        try:
            self.backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises plain Exceptions for missing or bad files
            raise ForgetpackError(f"{path}: cannot load tokenizer ({str(exc)[:200]})") from None
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_id = int(settings.get("pad_id", 0))
        self.pad_left = settings.get("padding_side", "right") == "left"
        if self.kind == "hf":
            self.backend.enable_truncation(
                max_length=self.context_length,
                strategy=settings.get("truncation_strategy", "longest_first"),
                direction=settings.get("truncation_side", "right"),
            )

    @property
    def cuts(self) -> bool:
        """Whether padding after the last token can be left out (right padding): see ``pad``."""
        return not self.pad_left

    def __call__(self, texts: Sequence[str], length: int | None = None) -> np.ndarray:
        """``[N, length]`` token ids, padded to ``length`` (default: the context), as open_clip's tokenizer gives."""
        return self.pad(self.token_ids(texts), length)

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with start/end tokens and truncation, unpadded: ``len`` is the tokens a prompt needs."""
        cleaned = [self.clean(t) for t in texts]
        if self.kind == "hf":
            out = [list(e.ids) for e in self.backend.encode_batch(cleaned)]
            if self.settings.get("strip_sep_token"):
                sep = int(self.settings["sep_id"])
                out = [[0 if i == sep else i for i in ids] for ids in out]
            return out
        sot, eot = int(self.settings["sot_id"]), int(self.settings["eot_id"])
        out = []
        for encoding in self.backend.encode_batch(cleaned, add_special_tokens=False):
            tokens = [sot, *encoding.ids, eot]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = eot
            out.append(tokens)
        return out

    def pad(self, ids: Sequence[Sequence[int]], length: int | None = None) -> np.ndarray:
        """``[N, length]`` int64 from ``token_ids`` output: padded with the pad id on the tokenizer's
        side. ``length`` below the context suits graphs with a dynamic sequence axis: for them,
        the padding after a prompt changes nothing, so a batch needs only its longest prompt."""
        length = self.context_length if length is None else int(length)
        longest = max((len(t) for t in ids), default=0)
        if not longest <= length <= self.context_length:
            raise ValueError(f"cannot pad {longest} tokens to {length} (context {self.context_length})")
        out = np.full((len(ids), length), self.pad_id, dtype=np.int64)
        for i, tokens in enumerate(ids):
            if self.pad_left:
                out[i, length - len(tokens) :] = tokens
            else:
                out[i, : len(tokens)] = tokens
        return out

