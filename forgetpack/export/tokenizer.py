"""The model's tokenizer as a ``tokenizer.json`` for the ``tokenizers`` library, plus its manifest settings.

The runtime (runtime/tokenizer.py) loads the file and adds open_clip's cleaning, start/end
tokens, truncation and padding from the settings. open_clip and tokenizers are imported
inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetpack.format.errors import ForgetpackError

if TYPE_CHECKING:
    from forgetpack.engine.models import LoadedModel

# open_clip's SimpleTokenizer split, in the ``tokenizers`` regex dialect.
CLIP_PATTERN = r"""(?i)<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def export_tokenizer(loaded: LoadedModel, out: Path) -> dict[str, Any]:
    """Write ``out/tokenizer.json`` and return the manifest's tokenizer settings."""
    from open_clip import tokenizer as oc

    tok = loaded.tokenizer
    cleans = {oc._clean_lower: "lower", oc._clean_whitespace: "whitespace", oc._clean_canonicalize: "canonicalize"}
    clean = cleans.get(getattr(tok, "clean_fn", None))
    if clean is None:
        raise ForgetpackError(f"cannot export tokenizer {type(tok).__name__}: unknown text cleaning")
    context = int(tok.context_length)
    if isinstance(tok, oc.SimpleTokenizer):
        if tok.reduction_fn is not None:
            raise ForgetpackError("cannot export a tokenizer with a random reduction mask (training-only behaviour)")
        merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.get)
        special = [t for t, i in sorted(tok.encoder.items(), key=lambda kv: kv[1]) if i in tok.all_special_ids]
        clip_bpe_tokenizer(tok.encoder, merges, special).save(str(out / "tokenizer.json"))
        return {"kind": "clip_bpe", "file": "tokenizer.json", "context_length": context, "clean": clean,
                "sot_id": int(tok.sot_token_id), "eot_id": int(tok.eot_token_id), "pad_id": 0}
    if isinstance(tok, oc.HFTokenizer):
        if tok.tokenizer_mode:
            raise ForgetpackError(f"cannot export an HF tokenizer in mode {tok.tokenizer_mode!r}")
        hf = tok.tokenizer
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise ForgetpackError(f"cannot export HF tokenizer {type(hf).__name__}: it is not a fast (tokenizers-backed) tokenizer")
        (out / "tokenizer.json").write_text(backend.to_str(), encoding="utf-8")
        return {"kind": "hf", "file": "tokenizer.json", "context_length": context, "clean": clean,
                "pad_id": int(hf.pad_token_id), "pad_token": str(hf.pad_token),
                "sep_id": int(hf.sep_token_id) if hf.sep_token_id is not None else None,
                "strip_sep_token": bool(tok.strip_sep_token),
                "truncation_side": getattr(hf, "truncation_side", "right"), "padding_side": getattr(hf, "padding_side", "right")}
    raise ForgetpackError(f"cannot export tokenizer {type(tok).__name__} (supported: open_clip SimpleTokenizer, HFTokenizer)")


def clip_bpe_tokenizer(encoder: dict[str, int], merges: Sequence[tuple[str, str]], special: Sequence[str]) -> Any:
    """A ``tokenizers.Tokenizer`` equal to open_clip's SimpleTokenizer after text cleaning.

    Same pre-tokenizer regex and byte-level mapping as Hugging Face's CLIPTokenizerFast, so
    the runtime needs only ``tokenizers``, never open_clip.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    bpe = models.BPE(vocab=dict(encoder), merges=[tuple(m) for m in merges], end_of_word_suffix="</w>")
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return tokenizer
