"""Measure forgetting: zero-shot accuracy of a model before and after its patches.

Library entry point: :func:`evaluate`, which returns an :class:`EvalReport` (data only; the
``forgetpack eval`` command renders it). The metrics and the paper's score live in
:mod:`forgetpack.evaluation.metrics`, the image-embedding cache in
:mod:`forgetpack.evaluation.image_cache`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.evaluation.datasets import BUILTIN, LabeledImages, load_dataset
from forgetpack.evaluation.image_cache import encode_images, vision_fingerprint
from forgetpack.evaluation.metrics import (
    TASK,
    ClassDrop,
    DatasetResult,
    ForgetScore,
    forget_scores,
    json_number,
    nearest_classes,
    rank_classes,
    worst_class_drops,
)
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_templates
from forgetpack.format.patch import display_name

if TYPE_CHECKING:
    from forgetpack.format.patch import Patch


@dataclass
class EvalReport:
    """Base (and, with patches, patched) results on each dataset, and the forgetting scores."""

    model: str
    patches: list[str]
    forget: list[str]
    base: dict[str, DatasetResult]
    patched: dict[str, DatasetResult] | None
    scores: dict[str, ForgetScore]
    skipped: dict[str, int] = field(default_factory=dict)  # unreadable images per dataset
    patch_digests: list[str] = field(default_factory=list)  # content digests of ``patches``, in order
    # Per dataset holding a forgotten class: the retained classes nearest it in base text space.
    neighbours: dict[str, list[str]] = field(default_factory=dict)
    # With no forget names given: ``forget`` is what the patches record (``recorded_forget``), and
    # these are the recorded names no evaluated dataset holds.
    forget_from_patches: bool = False
    recorded_elsewhere: list[str] = field(default_factory=list)

    @property
    def datasets(self) -> list[str]:
        return list(self.base)

    @property
    def score(self) -> float:
        """Mean S over the datasets that hold forgotten classes (NaN without patches)."""
        values = [s.score for s in self.scores.values() if not math.isnan(s.score)]
        return float(np.mean(values)) if values else math.nan

    @property
    def worst_retained(self) -> dict[str, ClassDrop]:
        """Per dataset, the retained class whose recall dropped most (empty without patches)."""
        return worst_class_drops(self.base, self.patched, self.forget)

    def forgotten_indices(self, dataset: str) -> list[int]:
        names = self.base[dataset].classnames
        return [names.index(c) for c in self.forget if c in names]

    def to_json(self) -> dict[str, Any]:
        results = []
        for variant, table in (("base", self.base), ("patched", self.patched or {})):
            for name, result in table.items():
                results.append(
                    {
                        "dataset": name,
                        "model": self.model,
                        "task": TASK,
                        "variant": variant,
                        "patches": self.patches if variant == "patched" else [],
                        "templates": result.templates,
                        "metrics": result.metrics(),
                    }
                )
        return {
            "model": self.model,
            "task": TASK,
            "patches": self.patches,
            "patch_digests": self.patch_digests,
            "forget": self.forget,
            "forget_from": "patches" if self.forget_from_patches else "given",
            "results": results,
            "forgetting": {k: v.to_json() for k, v in self.scores.items()},
            "worst_retained_class": {k: v.to_json() for k, v in self.worst_retained.items()},
            "nearest_retained_classes": self.neighbours,
            "S": json_number(self.score),
            "skipped_images": self.skipped,
        }


# ----------------------------------------------------------------------------- models and prompts


@dataclass
class _Loaded:
    model: Any
    preprocess: Any
    tokenizer: Any
    model_id: str


def load(spec: str, device: str = "cpu") -> Any:
    """A model spec -> an object with ``model``, ``preprocess``, ``tokenizer`` and ``model_id``."""
    from forgetpack.engine.models import load_model

    return load_model(spec, device=device)


def _as_loaded(model: Any, device: str) -> tuple[Any, bool]:
    """Accept a spec, a LoadedModel-like object or a ``(model, preprocess, tokenizer)`` tuple.

    Returns the loaded model and whether we own it (may patch it in place).
    """
    if isinstance(model, str):
        return load(model, device), True
    if isinstance(model, tuple) and len(model) == 3:
        return _Loaded(model[0], model[1], model[2], getattr(model[0], "name", "model")), False
    if all(hasattr(model, a) for a in ("model", "preprocess", "tokenizer")):
        return model, False
    raise TypeError("model must be a spec string, a LoadedModel or a (model, preprocess, tokenizer) tuple")


def encode_classnames(
    loaded: Any, classnames: Sequence[str], templates: Sequence[str], *, device: str = "cpu"
) -> np.ndarray:
    """One L2-normalised text embedding per class: the mean over templates, renormalised (CLIP's ensemble)."""
    import torch

    model = loaded.model
    model.eval()
    with torch.no_grad():
        total = None
        for template in templates:
            tokens = loaded.tokenizer([template.format(c) for c in classnames]).to(device)
            features = model.encode_text(tokens, normalize=True).float()
            total = features if total is None else total + features
        total = torch.nn.functional.normalize(total, dim=-1)
    return total.cpu().numpy().astype(np.float32)


def classify(image_features: np.ndarray, text_features: np.ndarray) -> np.ndarray:
    """Index of the most similar class prompt for each image."""
    return rank_classes(image_features, text_features, k=1)[:, 0]


# ----------------------------------------------------------------------------- the harness


def resolve_datasets(datasets: Sequence[str | LabeledImages]) -> dict[str, LabeledImages]:
    """Load the named held-out sets (``test`` split); duplicates are an error."""
    out: dict[str, LabeledImages] = {}
    for d in datasets:
        data = d if isinstance(d, LabeledImages) else load_dataset(d, "test")
        if data.name in out:
            raise ForgetpackError(f"dataset {data.name!r} is given twice")
        out[data.name] = data
    if not out:
        raise ForgetpackError("no dataset to evaluate on")
    return out


def check_forget(forget: Sequence[str], data: dict[str, LabeledImages]) -> list[str]:
    """Every forgotten class must be a class of at least one evaluated dataset."""
    names = list(dict.fromkeys(c.strip() for c in forget if c.strip()))
    for c in names:
        if not any(c in d.classnames for d in data.values()):
            listing = "; ".join(f"{k}: {', '.join(d.classnames[:12])}{' ...' if len(d.classnames) > 12 else ''}"
                                for k, d in data.items())  # fmt: skip
            raise ForgetpackError(f"class {c!r} is not in any evaluated dataset ({listing})")
    return names


def recorded_forget(patches: Sequence[Patch]) -> list[str]:
    """The names the patches were made to forget, in order: each recipe's ``forget``, and a
    stacked patch's components' (``format.patch.stack`` keeps their recipes)."""
    names: list[str] = []
    for p in patches:
        for recipe in (p.recipe, *(c.get("recipe") or {} for c in p.components if isinstance(c, dict))):
            found = recipe.get("forget") if isinstance(recipe, dict) else None
            if isinstance(found, list):
                names.extend(str(n) for n in found)
    return list(dict.fromkeys(names))


def _read_patches(patches: Sequence[Any]) -> list[Patch]:
    from forgetpack.format.patch import Patch, read_patch

    return [p if isinstance(p, Patch) else read_patch(p) for p in patches]


def _predict_all(
    loaded: Any,
    data: dict[str, LabeledImages],
    templates: dict[str, list[str]],
    device: str,
    batch_size: int,
    fingerprint: str,
    encoded: Callable[[int], None] | None = None,
) -> dict[str, DatasetResult]:
    results = {}
    for name, d in data.items():
        image_features = encode_images(loaded, d, device=device, batch_size=batch_size, fingerprint=fingerprint,
                                       encoded=encoded)
        text_features = encode_classnames(loaded, d.classnames, templates[name], device=device)
        ranked = rank_classes(image_features, text_features)  # column 0 is ``classify``'s answer
        results[name] = DatasetResult(name, list(d.classnames), d.labels, ranked[:, 0],
                                      list(templates[name]), text_features, ranked)  # fmt: skip
    return results


def _neighbours(base: dict[str, DatasetResult], forget: Sequence[str]) -> dict[str, list[str]]:
    out = {}
    for name, result in base.items():
        forgotten = [result.classnames.index(c) for c in forget if c in result.classnames]
        if forgotten and result.text_features is not None:
            out[name] = [result.classnames[i] for i in nearest_classes(result.text_features, forgotten)]
    return out


def evaluate(
    model: Any,
    patches: Sequence[Any] = (),
    forget: Sequence[str] | None = None,
    datasets: Sequence[str | LabeledImages] = BUILTIN,
    templates: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    hand_over: bool = False,
) -> EvalReport:
    """Evaluate ``model`` (a spec such as ``"mini"``, or a loaded model) before and after ``patches``.

    ``patches`` are paths or :class:`forgetpack.format.patch.Patch` objects, applied in order.
    ``forget`` names the classes the patches are meant to remove (for the forgetting
    scores); None means the names the patches record, those an evaluated dataset holds (without
    them a forgotten class would be scored as a retained one). ``templates`` override each
    dataset's default prompt(s); several templates are ensembled. A loaded model passed in is
    never modified: patches go on a copy. Every patch is checked against the model (the fit
    rule) before any image is encoded. ``progress`` hears ``(images encoded, images to encode)``
    over the base and, with patches, the patched pass. ``hand_over=True`` gives a loaded model to
    the evaluation, which then patches it in place instead of a copy (as it does a spec's).
    """
    data = resolve_datasets(datasets)
    patch_objects = _read_patches(patches)
    elsewhere: list[str] = []
    forget_from_patches = forget is None
    if forget is None:
        recorded = recorded_forget(patch_objects)
        forget = [n for n in recorded if any(n in d.classnames for d in data.values())]
        elsewhere = [n for n in recorded if n not in forget]
    else:
        forget = check_forget(forget, data)
    if templates:
        chosen = check_templates(templates)
        per_dataset = {k: list(chosen) for k in data}
    else:
        per_dataset = {k: list(d.templates) for k, d in data.items()}
    loaded, owned = _as_loaded(model, device)
    owned = owned or hand_over
    model_id = str(getattr(loaded, "model_id", model if isinstance(model, str) else "model"))
    if patch_objects:  # a patch for another model is refused now, not after the base is evaluated
        from forgetpack.engine.torch_patch import patched_matrices

        patched_matrices(loaded.model, patch_objects, name=model_id)

    total = sum(len(d) for d in data.values()) * (2 if patch_objects else 1)
    done = 0

    def encoded(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total)

    fingerprint = vision_fingerprint(loaded.model, loaded.preprocess)
    base = _predict_all(loaded, data, per_dataset, device, batch_size, fingerprint, encoded)
    patched = None
    if patch_objects:
        from forgetpack.engine.torch_patch import apply_patches

        target = loaded if owned else _Loaded(copy.deepcopy(loaded.model), loaded.preprocess, loaded.tokenizer, model_id)
        apply_patches(target.model, patch_objects, name=model_id)
        touches_vision = any(t.startswith("visual.") for p in patch_objects for t in p.targets)
        patched_fp = vision_fingerprint(target.model, target.preprocess) if touches_vision else fingerprint
        patched = _predict_all(target, data, per_dataset, device, batch_size, patched_fp, encoded)

    return EvalReport(
        model=model_id,
        patches=[display_name(p) for p in patch_objects],
        forget=forget,
        base=base,
        patched=patched,
        scores=forget_scores(base, patched, forget),
        skipped={k: len(d.skipped) for k, d in data.items() if d.skipped},
        patch_digests=[p.digest for p in patch_objects],
        neighbours=_neighbours(base, forget),
        forget_from_patches=bool(patch_objects) and forget_from_patches,
        recorded_elsewhere=elsewhere,
    )
