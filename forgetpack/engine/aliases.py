"""The model's own aliases of a forget name: the vocabulary tokens it classifies as that name.

A user who wants a forgotten class back need not guess the lexicon: the model's tokenizer lists
every word it learned, and its text tower says which of them it treats as the same class.
:class:`AliasFamily` encodes each whole-word token once, bare, and keeps those whose base
embedding is classified as the forget name among the competitors: the request's candidates, the
name, and the built-in vocabulary's thousand everyday class names. The built-in names are there
because a small candidate set says little: on ``mini``, among its 20 digits and letters alone,
547 of MiniLM's 23,502 whole-word tokens land nearest "seven" ("discussion", "coalition"); with
the thousand names added, 29 do ("7", "seventh", "sevens", "7th", "1965", "week", …). What counts
as the same class is then the base model's business, in whatever language it learned.

Features are cached on disk by ``forgetpack.engine.features``: the first search of a model costs
one encoding of its vocabulary (MiniLM's 23,502 tokens: 27-38 s on a shared 2-core CPU), later
ones a look-up and 1.6 s of search. ``FamilyContext.max_tokens`` caps the search to the first
tokens in vocabulary order (most frequent first for BERT's WordPiece and CLIP's BPE).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from forgetpack.engine.preserve import unit_rows
from forgetpack.engine.variants import MAX_PER_FAMILY, FamilyContext, Variant, case_forms
from forgetpack.engine.vocabulary import builtin_vocabulary
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import normalize_name

WORD_START_MARKS = ("\u2581", "\u0120")  # sentencepiece's '▁' and byte-level BPE's 'Ġ' begin a word
END_OF_WORD = "</w>"  # open_clip's SimpleTokenizer ends a word's last piece with it


class AliasFamily:
    """Whole-word tokens of the model's vocabulary that its base text tower classifies as the name."""

    name = "aliases"
    needs_model = True

    def variants(self, name: str, context: FamilyContext) -> list[Variant]:
        labels = find_aliases(context.loaded, name, context.candidates, context.max_tokens)
        out = [Variant(self.name, name, label, t, "token") for label in labels for t in context.label_templates]
        return out[:MAX_PER_FAMILY]


def find_aliases(loaded: Any, name: str, candidates: Sequence[str] = (), max_tokens: int | None = None) -> list[str]:
    """The tokens whose bare base embedding is nearest ``name`` among the competitors (``name``,
    ``candidates`` and the built-in vocabulary), most similar first; never the name, its case
    forms or a competitor itself."""
    from forgetpack.engine.features import text_features

    by_key: dict[str, str] = {}
    for c in (name, *candidates, *builtin_vocabulary()):
        by_key.setdefault(normalize_name(c), c)
    competitors = list(by_key.values())  # the name first
    taken = {*by_key, *(normalize_name(f) for f in case_forms(name))}
    tokens = [t for t in search_tokens(loaded.tokenizer, max_tokens) if normalize_name(t) not in taken]
    if not tokens:
        return []
    embed = _base_embedder(loaded)
    C = unit_rows(embed(text_features(loaded, competitors)))
    E = unit_rows(embed(text_features(loaded, tokens)))
    scores = E @ C.T
    hits = np.flatnonzero(np.argmax(scores, axis=1) == 0)
    order = sorted(hits, key=lambda i: (-scores[i, 0], i))  # most similar first, ties in vocabulary order
    return [tokens[i] for i in order]


def search_tokens(tokenizer: Any, max_tokens: int | None = None) -> list[str]:
    """The tokenizer's whole-word tokens made of letters and digits, in vocabulary order, at most ``max_tokens``."""
    if max_tokens is not None and max_tokens < 0:
        raise ForgetpackError(f"max_tokens must be at least 0, not {max_tokens}")
    words = [w for w in dict.fromkeys(_whole_words(tokenizer)) if w.isalnum()]
    return words if max_tokens is None else words[:max_tokens]


def _whole_words(tokenizer: Any) -> list[str]:
    """Tokens that stand for a whole word (or a word's start) as text, in token-id order."""
    encoder = getattr(tokenizer, "encoder", None)
    if isinstance(encoder, dict) and hasattr(tokenizer, "byte_decoder"):  # open_clip's SimpleTokenizer
        decode = tokenizer.byte_decoder
        ends = sorted((i, t[: -len(END_OF_WORD)]) for t, i in encoder.items() if t.endswith(END_OF_WORD))
        words = [bytes(decode[c] for c in t).decode("utf-8", errors="replace") for _, t in ends]
        return [w for w in words if w == w.lower()]  # it lowercases its input: upper-case tokens never occur
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's HFTokenizer wraps a transformers one
    if not hasattr(inner, "get_vocab"):
        raise ForgetpackError(f"cannot list the vocabulary of tokenizer {type(tokenizer).__name__!r}")
    special = set(getattr(inner, "all_special_tokens", ()))
    vocab = [t for t, _ in sorted(inner.get_vocab().items(), key=lambda kv: kv[1]) if t not in special]
    for mark in WORD_START_MARKS:
        if sum(t.startswith(mark) for t in vocab) > len(vocab) // 10:  # this vocabulary marks word starts
            return [t[len(mark) :] for t in vocab if t.startswith(mark)]
    return [t for t in vocab if not t.startswith("##")]  # WordPiece marks continuations instead


def _base_embedder(loaded: Any) -> Any:
    """Features -> embeddings through the model's base text projection."""
    from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix

    proj = find_projection(loaded.model, "text")
    M = proj.feature_form(projection_matrix(loaded.model, proj))
    bias = projection_bias(loaded.model, proj)

    def embed(features: np.ndarray) -> np.ndarray:
        y = features.astype(np.float64) @ M
        return y + bias if bias is not None else y

    return embed
