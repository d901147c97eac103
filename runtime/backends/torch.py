"""The torch backend: the same interface over an open_clip model (the reference for parity).

``source`` is a model spec (``mini``, ``ViT-B-32:none``, ...; see forgetpack.engine.models) or an
export directory without baked-in patches (its manifest names the model). Patches are
applied with forgetpack.engine.torch_patch, always from the base matrices, so removing one is exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import TargetInfo, apply_in_order, targets_of
from forgetpack.format.patch import Patch
from runtime.backends import Backend, check_threads

BATCH = 64


class TorchBackend(Backend):
    name = "torch"

    def __init__(self, source: str | os.PathLike[str], providers: Sequence[Any] | str | None = None,
                 device: str | None = None, threads: int | None = None, **options: Any):
        if options:
            raise ForgetpackError(f"unknown option(s) for the torch backend: {', '.join(sorted(options))}")
        import torch

        from forgetpack.engine.models import load_model
        from forgetpack.engine.projections import find_projection
        from forgetpack.engine.torch_patch import read_matrices

        if all(hasattr(source, a) for a in ("model", "preprocess", "tokenizer", "model_id")):
            loaded = source  # an already loaded forgetpack.engine.models.LoadedModel (shared: patches change it)
        else:
            loaded = load_model(_spec(source), device=device or _device(providers))
        if check_threads(threads):
            torch.set_num_threads(threads)
        self.device = str(next(loaded.model.parameters()).device)
        self.model_id = loaded.model_id
        self.model = loaded.model.eval()
        self.preprocess = loaded.preprocess
        self.tokenizer = loaded.tokenizer
        self.logit_scale = float(self.model.logit_scale.exp().item())
        projections = [find_projection(self.model, side) for side in ("text", "image")]
        self._base = read_matrices(self.model, [p.target for p in projections])
        self.targets: dict[str, TargetInfo] = targets_of(self._base, layouts={p.target: p.layout for p in projections})
        self.baked = ()

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), BATCH):
                batch = torch.stack([self.preprocess(im) for im in images[i : i + BATCH]]).to(self.device)
                out.append(self.model.encode_image(batch).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(texts), BATCH):
                ids = self.tokenizer(list(texts[i : i + BATCH])).to(self.device)
                out.append(self.model.encode_text(ids).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def set_patches(self, patches: Sequence[Patch]) -> None:
        from forgetpack.engine.torch_patch import write_matrices

        matrices = apply_in_order(self._base, patches, self.targets, model=self.model_id)  # the model is untouched if it raises
        write_matrices(self.model, matrices)


def _spec(source: str | os.PathLike[str]) -> str:
    """The model spec for ``source``: itself, or the model an export directory was made from."""
    spec = str(source)
    if not Path(spec).is_dir():
        return spec
    from forgetpack.format.manifest import Manifest

    manifest = Manifest.read(spec)
    if manifest.patches:
        raise ForgetpackError(
            f"{spec}: has patches baked in, which the torch backend cannot reproduce from the export; "
            f"load the model spec {manifest.model_id!r} and pass the patches instead"
        )
    return manifest.model_id


def _device(providers: Sequence[Any] | str | None) -> str:
    """Map onnxruntime-style provider names onto a torch device."""
    import torch

    names = [providers] if isinstance(providers, str) else [p if isinstance(p, str) else p[0] for p in providers or []]
    names = [n.lower() for n in names]
    if any(n in ("cuda", "cudaexecutionprovider") for n in names):
        if not torch.cuda.is_available():
            raise ForgetpackError("CUDA was requested but torch sees no CUDA device")
        return "cuda"
    unknown = [n for n in names if n not in ("cpu", "cpuexecutionprovider")]
    if unknown:
        raise ForgetpackError(f"the torch backend runs on cpu or cuda, not {unknown[0]!r}")
    return "cpu"
