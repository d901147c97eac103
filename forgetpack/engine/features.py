"""Pre-projection text features, fast on CPU: batched, context cut, cached.

The engine needs, for each prompt, the text tower's output just before its final projection
(OpenAI-style towers: ``ln_final`` at the end-of-text token; HF towers: the pooled output
before ``text.proj``). Three things make that cheap:

- **Context cutting.** Class names are a few tokens long but tokenizers pad to 77. With a
  causal mask (OpenAI-style) or an attention mask (HF), the padding never influences the
  pooled token, so each batch is cut to its longest prompt: same features, ~10x less work.
  Prompts are sorted by length first so that batches hold similar lengths.
- **A feature cache** per (text-tower fingerprint, prompt), in memory and on disk
  (``forgetpack.format.cache``: ``$FORGETPACK_CACHE/features``, default
  ``~/.cache/forgetpack/features``; ``off`` means memory only) as safetensors shards written by
  the project's atomic writer: no pickle, never a torn shard. The fingerprint covers the tower's
  weights *except* the projection, so features stay valid for every patched version of a model.
- ``torch.inference_mode`` and one tokenizer call per request.

The library prints nothing: progress goes to an optional ``progress(done, total)`` callback
and a cache that cannot be written is a logged warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.engine.projections import find_projection
from forgetpack.format.cache import cache_dir
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import RawTensor, save_safetensors

FEATURE_VERSION = "1"  # bump when the way features are computed changes
MAX_SHARDS = 32  # compact a model's cache directory beyond this many shard files
DEFAULT_BATCH = 128

class FeaturesNotCached(ForgetpackError):
    """A model that cannot encode (a warm run's weights-only model) met a prompt the cache lacks."""


_memory: dict[tuple[str, str], np.ndarray] = {}
_loaded_from_disk: dict[str, set[tuple[str, int, int]]] = {}  # fp -> shards read
_fingerprints: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], str]] = weakref.WeakKeyDictionary()
log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- cache plumbing


def clear_memory_cache() -> None:
    """Forget everything cached in this process (the disk cache stays)."""
    _memory.clear()
    _loaded_from_disk.clear()
    _fingerprints.clear()


def _text_parameters(model: Any) -> list[tuple[str, Any]]:
    """The parameters that determine pre-projection text features, in a fixed order."""
    proj = find_projection(model, "text")
    skip = {proj.target, proj.bias}
    out = []
    for name, p in sorted(model.named_parameters()):
        if name.startswith("visual.") or name.startswith("logit_") or name in skip:
            continue
        out.append((name, p))
    return out


def text_fingerprint(model: Any, tokenizer: Any) -> str:
    """sha256 of the text tower's weights (projection excluded) and the tokenizer's identity.

    Memoised per model object and invalidated when any parameter is modified in place
    (torch bumps a tensor's version counter on every in-place write). A model that knows
    its fingerprint (``forgetpack.engine.weights.WeightsOnlyModel``) answers for itself.
    """
    known = getattr(model, "text_fingerprint", None)
    if isinstance(known, str):
        return known
    params = _text_parameters(model)
    versions = tuple(p._version for _, p in params)
    memo = _fingerprints.get(model)
    if memo is not None and memo[0] == versions:
        return memo[1]
    h = hashlib.sha256(f"forgetpack.features.v{FEATURE_VERSION}|{_describe_tokenizer(tokenizer)}\n".encode())
    for name, p in params:
        array = np.ascontiguousarray(p.detach().cpu().numpy())
        h.update(f"{name}|{array.dtype.str}|{list(array.shape)}\n".encode())
        h.update(memoryview(array).cast("B"))  # no copy
    fp = "sha256:" + h.hexdigest()
    _fingerprints[model] = (versions, fp)
    return fp


def _describe_tokenizer(tokenizer: Any) -> str:
    inner = getattr(tokenizer, "tokenizer", None)
    name = getattr(inner, "name_or_path", "") if inner is not None else ""
    return f"{type(tokenizer).__name__}|{getattr(tokenizer, 'context_length', '')}|{Path(str(name)).name}"


def _shard_dir(fp: str) -> Path | None:
    """One model's folder of cache shards, or None when caching is off."""
    root = cache_dir("features")
    return None if root is None else root / fp.split(":")[-1][:32]


def _load_disk(fp: str) -> None:
    """Read the cache shards of one model that this process has not read yet into memory.

    Looked at again whenever prompts are missing, so that processes sharing a cache (a service
    and a CLI, parallel test workers, a sweep's runs) use what the others wrote meanwhile; a
    shard is known by its name, size and modification time (compaction rewrites one in place)."""
    folder = _shard_dir(fp)
    if folder is None or not folder.is_dir():
        return
    from safetensors import safe_open

    seen = _loaded_from_disk.setdefault(fp, set())
    for path in sorted(folder.glob("*.safetensors")):
        try:
            stat = path.stat()
        except OSError:
            continue
        known = (path.name, stat.st_size, stat.st_mtime_ns)
        if known in seen:
            continue
        seen.add(known)
        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                if meta.get("fingerprint") != fp:
                    continue
                prompts = json.loads(meta["prompts"])
                feats = f.get_tensor("features")
        except Exception:  # a torn or foreign file is only a cache miss
            continue
        if feats.ndim != 2 or feats.shape[0] != len(prompts):
            continue
        for prompt, row in zip(prompts, feats, strict=True):
            _memory[(fp, prompt)] = row


def _save_disk(fp: str, prompts: Sequence[str], feats: np.ndarray) -> None:
    """Write one shard; compact the folder when it holds too many shards. Nothing when caching is off."""
    folder = _shard_dir(fp)
    if folder is None:
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
        _write_shard(folder / f"{name}.safetensors", prompts, feats, fp)
        _read_already(fp, folder / f"{name}.safetensors")
        shards = sorted(folder.glob("*.safetensors"))
        if len(shards) > MAX_SHARDS:
            known = sorted(p for (f, p) in _memory if f == fp)
            _write_shard(folder / "compact.safetensors", known, np.stack([_memory[(fp, p)] for p in known]), fp)
            _read_already(fp, folder / "compact.safetensors")
            for shard in shards:
                if shard.name != "compact.safetensors":
                    shard.unlink(missing_ok=True)
    except (OSError, ForgetpackError) as exc:  # a read-only or full disk must not stop forgetting
        log.warning("feature cache not written (%s)", exc)


def _read_already(fp: str, path: Path) -> None:
    """A shard this process wrote holds nothing it lacks: ``_load_disk`` need not read it."""
    stat = path.stat()
    _loaded_from_disk.setdefault(fp, set()).add((path.name, stat.st_size, stat.st_mtime_ns))


def _write_shard(path: Path, prompts: Sequence[str], feats: np.ndarray, fp: str) -> None:
    meta = {"fingerprint": fp, "prompts": json.dumps(list(prompts), ensure_ascii=False), "version": FEATURE_VERSION}
    save_safetensors(path, {"features": RawTensor.from_array(np.asarray(feats, dtype=np.float32))}, meta)


# ---------------------------------------------------------------------------- encoding


def text_features(
    loaded: Any,
    prompts: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    batch_size: int = DEFAULT_BATCH,
    use_cache: bool = True,
) -> np.ndarray:
    """Pre-projection features ``[len(prompts), width]`` (float32), from cache where possible.

    ``progress(done, total)`` is called after each batch of the prompts that need encoding."""
    prompts = list(prompts)
    if not prompts:
        return np.zeros((0, text_width(loaded.model)), dtype=np.float32)
    fp = text_fingerprint(loaded.model, loaded.tokenizer)
    missing = list(dict.fromkeys(p for p in prompts if (fp, p) not in _memory)) if use_cache else list(dict.fromkeys(prompts))
    if use_cache and missing:
        _load_disk(fp)  # shards written since the last look (by this or another process)
        missing = [p for p in missing if (fp, p) not in _memory]
    if missing and not getattr(loaded.model, "can_encode", True):
        raise FeaturesNotCached(f"{len(missing)} prompt(s) are not in the feature cache and this model cannot encode")
    if missing:
        feats = encode(loaded, missing, progress=progress, batch_size=batch_size)
        for prompt, row in zip(missing, feats, strict=True):
            _memory[(fp, prompt)] = row
        if use_cache:
            _save_disk(fp, missing, feats)
    out = np.stack([_memory[(fp, p)] for p in prompts])
    if not use_cache:
        for p in missing:
            _memory.pop((fp, p), None)
    return out


def text_width(model: Any) -> int:
    proj = find_projection(model, "text")
    state = dict(model.named_parameters())
    shape = state[proj.target].shape
    return int(shape[0] if proj.layout == "in_out" else shape[1])


def encode(loaded: Any, prompts: Sequence[str], *, progress: Callable[[int, int], None] | None = None,
           batch_size: int = DEFAULT_BATCH, cut: bool = True) -> np.ndarray:
    """Encode prompts (no cache): sorted by length, batched, each batch cut to its longest prompt.

    On CPU the thread count is chosen by measurement: the first batch runs with torch's
    threads, the second with one, and the rest with whichever was faster per token. On a
    machine whose cores are busy with other work, torch's threads wait on each other and one
    thread is 2-4x faster (measured on a shared 2-core box); on an idle one, all threads win.
    """
    import torch

    model, tokenizer = loaded.model, loaded.tokenizer
    tower = TowerRunner(model)
    tokens = tokenizer(list(prompts))
    if not isinstance(tokens, torch.Tensor):
        tokens = torch.as_tensor(tokens)
    device = next(model.parameters()).device
    lengths = tower.lengths(tokens)
    order = torch.argsort(lengths, stable=True)
    out = torch.empty((len(prompts), tower.width), dtype=torch.float32)
    starts = list(range(0, len(prompts), batch_size))
    threads = torch.get_num_threads()
    tune = device.type == "cpu" and threads > 1 and len(starts) >= 4
    per_token: list[float] = []
    done = 0
    try:
        with torch.inference_mode():
            for i, start in enumerate(starts):
                idx = order[start : start + batch_size]
                batch = tokens[idx]
                if cut and tower.can_cut:
                    batch = batch[:, : int(lengths[idx].max())]
                if tune and i == 1:
                    torch.set_num_threads(1)
                t0 = time.perf_counter()
                out[idx] = tower(batch.to(device)).float().cpu()
                if tune and i < 2:
                    per_token.append((time.perf_counter() - t0) / batch.numel())
                    if i == 1:
                        torch.set_num_threads(1 if per_token[1] < per_token[0] else threads)
                done += len(idx)
                if progress is not None:
                    progress(done, len(prompts))
    finally:
        torch.set_num_threads(threads)
    return out.numpy()


class TowerRunner:
    """Runs one text tower up to (not including) its projection; ``can_cut`` says whether the
    padding after a prompt may be left out (the export's dynamic text axis relies on it too)."""

    def __init__(self, model: Any) -> None:
        text = getattr(model, "text", None)
        kind = type(text).__name__ if text is not None else None
        self.model = model
        if kind == "HFTextEncoder":
            self.kind = "hf"
            self.tower = text
            self.pad_id = text.config.pad_token_id
            self.can_cut = type(text.pooler).__name__ in ("MeanPooler", "ClsPooler", "ClsLastHiddenStatePooler")
            self.width = int(text.config.hidden_size)
        elif kind == "TextTransformer" or (text is None and hasattr(model, "ln_final")):
            self.kind = "openai"
            self.tower = text if text is not None else model
            if getattr(self.tower, "cls_emb", None) is not None:
                raise ForgetpackError("text towers with an appended CLS embedding (CoCa) are not supported")
            self.pool = self.tower.text_pool_type if text is None else self.tower.pool_type
            self.eos_id = self.tower.text_eos_id if text is None else self.tower.eos_id
            causal = self.tower.attn_mask is not None
            if self.pool not in ("argmax", "eos", "first"):
                raise ForgetpackError(f"text pool type {self.pool!r} is not supported")
            if not causal and getattr(self.tower, "use_pad_mask", False):
                raise ForgetpackError("bidirectional text towers with a padding mask are not supported")
            self.can_cut = causal  # without a causal mask every token sees the padding
            self.width = int(self.tower.ln_final.weight.shape[0])
        else:
            raise ForgetpackError(f"unknown text tower {kind or type(model).__name__!r}: cannot capture its features")

    def lengths(self, tokens: Any) -> Any:
        """Tokens each prompt needs: up to its pooled token (openai) or its last non-pad token (hf)."""
        import torch

        if self.kind == "hf":
            return (tokens != self.pad_id).long().sum(-1).clamp(min=1)
        return self._pool_index(tokens) + 1 if self.pool != "first" else torch.ones(tokens.shape[0], dtype=torch.long)

    def _pool_index(self, tokens: Any) -> Any:
        if self.pool == "eos":
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)

    def __call__(self, tokens: Any) -> Any:
        import torch

        if self.kind == "hf":
            mask = (tokens != self.pad_id).long()
            out = self.tower.transformer(input_ids=tokens, attention_mask=mask)
            return self.tower.pooler(out, mask)
        t = self.tower
        n = tokens.shape[1]
        cast = t.transformer.get_cast_dtype()
        x = t.token_embedding(tokens).to(cast) + t.positional_embedding[:n].to(cast)
        mask = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        x = t.ln_final(t.transformer(x, attn_mask=mask))
        if self.pool == "first":
            return x[:, 0]
        return x[torch.arange(x.shape[0], device=x.device), self._pool_index(tokens)]
