"""open_clip's image transform as steps the torch-free runtime replays (runtime/preprocess.py)."""

from __future__ import annotations

from typing import Any

from forgetpack.format.errors import ForgetpackError


def preprocess_settings(transform: Any) -> dict[str, Any]:
    """open_clip's eval transform as replayable steps (runtime/preprocess.py) plus a summary.

    Read off the ``Compose`` the model was loaded with, so the export does what the torch
    model's own preprocess does; an unknown step is an error rather than a silent change.
    """
    steps = [_step(t) for t in getattr(transform, "transforms", [transform])]
    ops = [s["op"] for s in steps]
    if "to_tensor" not in ops or "normalize" not in ops:
        raise ForgetpackError(f"cannot export preprocessing {ops}: expected open_clip's eval transform")
    resize = next((s for s in steps if s["op"].startswith("resize")), None)
    crop = next((s for s in steps if s["op"] == "center_crop"), None)
    size = crop["size"] if crop else (resize["size"] if resize and isinstance(resize["size"], list) else [resize["size"]] * 2)
    norm = next(s for s in steps if s["op"] == "normalize")
    mode = {"resize_shortest": "shortest", "resize": "squash"}.get(resize["op"], None) if resize else None
    if resize and resize["op"] == "resize_keep_ratio":
        mode = "longest" if resize["longest"] >= 1 else "shortest"
    return {
        "size": [int(s) for s in size],
        "resize_mode": mode,
        "interpolation": resize["interpolation"] if resize else None,
        "crop": crop is not None,
        "fill": crop["fill"] if crop else 0,
        "mean": norm["mean"],
        "std": norm["std"],
        "steps": steps,
    }


def _step(t: Any) -> dict[str, Any]:
    """One transform as a runtime step; anything but open_clip's eval steps is refused."""
    kind = type(t).__name__
    if kind == "Resize":
        if getattr(t, "max_size", None) is not None:
            raise ForgetpackError("cannot export preprocessing: Resize with max_size")
        size = t.size
        interp = _interpolation(t.interpolation)
        if isinstance(size, int) or len(size) == 1:
            return {"op": "resize_shortest", "size": int(size if isinstance(size, int) else size[0]), "interpolation": interp}
        return {"op": "resize", "size": [int(s) for s in size], "interpolation": interp}
    if kind == "ResizeKeepRatio":
        if t.random_scale_prob or t.random_aspect_prob:
            raise ForgetpackError("cannot export preprocessing: ResizeKeepRatio with random scaling (a training transform)")
        return {"op": "resize_keep_ratio", "size": [int(s) for s in t.size], "longest": float(t.longest),
                "interpolation": _interpolation(t.interpolation)}
    if kind in ("CenterCrop", "CenterCropOrPad"):
        size = t.size if not isinstance(t.size, int) else (t.size, t.size)
        return {"op": "center_crop", "size": [int(s) for s in size], "fill": int(getattr(t, "fill", 0) or 0)}
    if kind == "MaybeConvertMode":
        return {"op": "convert", "mode": t.mode}
    if kind == "function" and getattr(t, "__name__", "") == "_convert_to_rgb":
        return {"op": "convert", "mode": "RGB"}
    if kind in ("ToTensor", "MaybeToTensor"):
        return {"op": "to_tensor"}
    if kind == "Normalize":
        return {"op": "normalize", "mean": [float(m) for m in t.mean], "std": [float(s) for s in t.std]}
    raise ForgetpackError(f"cannot export preprocessing step {kind} (only open_clip's eval transforms are supported)")


def _interpolation(mode: Any) -> str:
    value = getattr(mode, "value", mode)
    if value not in ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"):
        raise ForgetpackError(f"cannot export preprocessing: interpolation {mode!r}")
    return value
