"""forgetpack: make CLIP models forget classes, shipped as small verifiable patches.

The public API, one import away::

    import forgetpack
    patch = forgetpack.read_patch("seven.fpatch.safetensors")      # torch-free
    model = forgetpack.load_model("mini")                            # imports torch, open_clip
    result = forgetpack.forget(model, forgetpack.ForgetRequest(["seven"]))

Names are resolved lazily (PEP 562), so ``import forgetpack`` stays torch-free and fast: a
serving machine with only numpy and safetensors can read, verify and apply patches.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it ("module:attr" where the names differ) (layers: format < engine < evaluation/export)
_API: dict[str, str] = {
    # the patch format (torch-free)
    "ForgetpackError": "forgetpack.format.errors",
    "PatchError": "forgetpack.format.errors",
    "CheckpointError": "forgetpack.format.errors",
    "SignatureError": "forgetpack.format.errors",
    "Patch": "forgetpack.format.patch",
    "Layer": "forgetpack.format.patch",
    "fingerprint": "forgetpack.format.patch",
    "read_patch": "forgetpack.format.patch",
    "stack": "forgetpack.format.patch",
    "check_fit": "forgetpack.format.fit",
    "apply_to_file": "forgetpack.format.checkpoint",
    "revert_file": "forgetpack.format.checkpoint",
    "generate_keypair": "forgetpack.format.signing",
    "sign": "forgetpack.format.signing",
    "verify_signature": "forgetpack.format.signing",
    # the engine (torch)
    "load_model": "forgetpack.engine.models",
    "apply_patches": "forgetpack.engine.torch_patch",
    "forget": "forgetpack.engine.solve",
    "compose": "forgetpack.engine.solve",
    "ForgetRequest": "forgetpack.engine.request",
    # evaluation and export (torch)
    "evaluate": "forgetpack.evaluation.harness",
    # ``forgetpack.export`` is the export subpackage; its main function is public as ``export_model``
    "export_model": "forgetpack.export:export",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'forgetpack' has no attribute {name!r}")
    module, _, attr = module.partition(":")
    value = getattr(importlib.import_module(module), attr or name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
