"""Audit a patch set: every bypass family tried on the patched model against its base.

A patch is solved for the phrasings it was given. The audit asks what else still reaches the
forgotten class, three ways:

- **text space** (no images): each variant of each forget name (``forgetpack.engine.variants``)
  is recognised by the base model or not, and still reached after the patches' change or not
  (``forgetpack.engine.bypass``), over the retained classes: the model's own class names, the
  datasets' and the patches' preserve names, without the forget names and their aliases;
- **images** (``datasets``): for every variant the base model recognises on real images (at
  least ``MIN_RECOGNISED`` of the class's images when the class is labelled with the variant, the
  other classes with their own names, under the variant's template), the patched model's
  accuracy on that class: what the bypass recovers;
- **probes that read no text**: 1-nearest-neighbour over train-split image embeddings and a
  linear probe trained on them. A patch of the text projection leaves every image embedding as it
  was, so these are the same before and after it: reported, not something such a patch can stop.

Text prompts are encoded once each (cached features, ``forgetpack.engine.features``) and
projected through the base and the patched projection; image embeddings come from the cache
of ``forgetpack.evaluation.image_cache``. The library prints nothing: ``progress`` is called
while text is encoded.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.engine.bypass import Outcome, outcomes, prompts_needed, summarise
from forgetpack.engine.measure import TextSpace
from forgetpack.engine.preserve import unit_rows
from forgetpack.engine.variants import FamilyContext, Variant, available_families, generate
from forgetpack.evaluation.datasets import BUILTIN, LabeledImages, load_dataset
from forgetpack.evaluation.harness import check_forget, resolve_datasets
from forgetpack.evaluation.image_cache import encode_images, vision_fingerprint
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fit import apply_in_order, targets_of
from forgetpack.format.names import clean_names, normalize_name
from forgetpack.format.patch import Patch, display_name, read_patch

BUILTIN_FAMILIES = ("templates", "surface", "lexicon", "synonyms", "aliases")  # their order in reports; others follow, sorted
MIN_RECOGNISED = 0.5  # base accuracy on the class at which a variant counts as recognised on images
PROBE_FOLDS = 5  # cross-validation folds when a dataset has no separate train split (image folders)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageOutcome:
    """One variant on one dataset: accuracy on the forget name's images, base and patched."""

    dataset: str
    variant: Variant
    base: float
    patched: float

    @property
    def counted(self) -> bool:
        return self.base >= MIN_RECOGNISED

    def to_json(self) -> dict[str, Any]:
        return {**self.variant.to_json(), "dataset": self.dataset, "base": round(self.base, 4), "patched": round(self.patched, 4)}


@dataclass(frozen=True)
class Probe:
    """What image-only probes find of one forgotten class (recall on its test images)."""

    dataset: str
    name: str
    test_images: int
    nearest_neighbour: float  # 1-NN over the train split's image embeddings
    linear_probe: float  # logistic regression trained on the train split
    unchanged: bool  # the patches leave image embeddings alone: the same numbers before and after

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "name": self.name, "test_images": self.test_images,
                "nearest_neighbour": round(self.nearest_neighbour, 4), "linear_probe": round(self.linear_probe, 4),
                "unchanged_by_patches": self.unchanged}


@dataclass
class AuditReport:
    """The bypass grid of one patch set (data only; ``forgetpack audit`` renders it)."""

    model: str
    patches: list[str]
    patch_digests: list[str]
    forget: list[str]
    families: list[str]
    retained: list[str]
    outcomes: list[Outcome]
    images: list[ImageOutcome] = field(default_factory=list)
    probes: list[Probe] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> dict[str, dict[str, int | float]]:
        """Per family: tried, recognised by the base model, bypasses, bypass share."""
        return summarise(self.outcomes)

    @property
    def bypasses(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.bypass]

    def image_summary(self) -> dict[str, dict[str, Any]]:
        """Per family: variants tried on images, counted (recognised by the base), the worst and mean recovered accuracy."""
        out: dict[str, dict[str, Any]] = {}
        for family in dict.fromkeys(r.variant.family for r in self.images):
            rows = [r for r in self.images if r.variant.family == family]
            counted = [r for r in rows if r.counted]
            worst = max(counted, key=lambda r: r.patched, default=None)
            out[family] = {
                "tried": len(rows), "counted": len(counted),
                "worst": round(worst.patched, 4) if worst else None,
                "mean": round(float(np.mean([r.patched for r in counted])), 4) if counted else None,
                "worst_variant": worst.to_json() if worst else None,
            }  # fmt: skip
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "patches": self.patches, "patch_digests": self.patch_digests, "forget": self.forget,
            "families": self.families, "retained": self.retained, "datasets": self.datasets,
            "text": {"summary": self.text, "bypasses": [o.to_json() for o in self.bypasses], "variants": len(self.outcomes)},
            "images": {"min_recognised": MIN_RECOGNISED, "summary": self.image_summary(),
                       "counted": [r.to_json() for r in self.images if r.counted]},
            "probes": [p.to_json() for p in self.probes],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }  # fmt: skip


def installed_families() -> list[str]:
    """Every installed variant family: the built-in ones in their order, then the others, sorted."""
    found = available_families()
    return [*(f for f in BUILTIN_FAMILIES if f in found), *sorted(f for f in found if f not in BUILTIN_FAMILIES)]


# ---------------------------------------------------------------------------- the audit


def audit(loaded: Any, patches: Sequence[Patch | str], forget: Sequence[str], datasets: Sequence[str | LabeledImages] = (),
          families: Sequence[str] | None = None, lexicon: Mapping[str, tuple[str, ...]] | None = None,
          progress: Progress | None = None, max_tokens: int | None = None, probes: bool = True) -> AuditReport:
    """The bypass grid of ``patches`` (paths or patches, applied in order) on ``loaded`` for the ``forget`` names.

    ``families`` default to every installed one; ``lexicon`` adds variants (normalised name ->
    variants, as ``forgetpack.engine.variants.read_lexicon`` reads them); ``max_tokens`` caps the
    aliases family's vocabulary search; ``probes=False`` skips the image-side probes (the same for
    every text patch, and the slow part of a sweep). ``loaded`` is never modified.
    """
    from forgetpack.engine.features import text_features
    from forgetpack.engine.projections import find_projection, projection_bias, projection_matrix

    timings: dict[str, float] = {}
    started = time.perf_counter()
    patch_list, forget, data = check_request(patches, forget, datasets)
    families = list(families) if families is not None else installed_families()
    proj = find_projection(loaded.model, "text")
    M_base = proj.feature_form(projection_matrix(loaded.model, proj))
    stored, image_model = _apply(loaded, patch_list, proj.target)
    M_patched = proj.feature_form(stored)

    retained = retained_classes(loaded, patch_list, forget, data)
    context = FamilyContext(lexicon=dict(lexicon or {}), loaded=loaded, candidates=(*forget, *retained), max_tokens=max_tokens)
    if "aliases" in families:
        from forgetpack.engine.aliases import search_tokens

        t0 = time.perf_counter()
        text_features(loaded, search_tokens(loaded.tokenizer, max_tokens), progress=progress)  # the family's one encoding
        timings["alias_tokens"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    variants = generate(forget, families, context)
    timings["variants"] = time.perf_counter() - t0
    found = {normalize_name(v.label) for v in variants if v.family == "aliases"}
    retained = [c for c in retained if normalize_name(c) not in found]

    t0 = time.perf_counter()
    prompts = list(dict.fromkeys([*prompts_needed(variants, retained), *_image_prompts(variants, data)]))
    space = TextSpace(dict(zip(prompts, text_features(loaded, prompts, progress=progress), strict=True)), M_base,
                      projection_bias(loaded.model, proj))
    timings["encode"] = time.perf_counter() - t0
    results = outcomes(space, M_patched, variants, retained)

    images, found_by_probes = [], []
    if data:
        t0 = time.perf_counter()
        images = _on_images(loaded, image_model, space, M_patched, variants, data)
        timings["images"] = time.perf_counter() - t0
    if data and probes:
        t0 = time.perf_counter()
        found_by_probes = image_probes(image_model or loaded, data, forget, unchanged=image_model is None)
        timings["probes"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return AuditReport(model=str(loaded.model_id), patches=[display_name(p) for p in patch_list],
                       patch_digests=[p.digest for p in patch_list], forget=forget, families=families, retained=retained,
                       outcomes=results, images=images, probes=found_by_probes, datasets=list(data), timings=timings)


def check_request(patches: Sequence[Patch | str], forget: Sequence[str], datasets: Sequence[str | LabeledImages] = (),
                  ) -> tuple[list[Patch], list[str], dict[str, LabeledImages]]:
    """The patches and test sets read, the names checked: every mistake is one line, before any model work.
    Each name must be one the patches record forgetting (when they record any) and, with datasets,
    a class of one of them."""
    patch_list = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    if not patch_list:
        raise ForgetpackError("nothing to audit: give at least one patch")
    names = clean_names(forget, "forget")
    if not names:
        raise ForgetpackError("no forget name to audit")
    recorded = [n for p in patch_list for n in p.recipe.get("forget", [])]
    known = {normalize_name(n) for n in recorded}
    for name in names:
        if known and normalize_name(name) not in known:
            raise ForgetpackError(f"the patches do not forget {name!r} (they forget: {', '.join(dict.fromkeys(recorded))})")
    data = resolve_datasets(datasets) if datasets else {}
    if data:
        check_forget(names, data)
    return patch_list, names, data


def retained_classes(loaded: Any, patches: Sequence[Patch], forget: Sequence[str], data: Mapping[str, LabeledImages]) -> list[str]:
    """The classes a variant competes with: the model's own class names, the datasets' and the
    patches' preserve names, less the forget names and the aliases the patches recorded."""
    pool = [*getattr(loaded, "vocabulary", ()), *(c for d in data.values() for c in d.classnames),
            *(n for p in patches for n in p.recipe.get("preserve", []))]
    aliases = [a for p in patches for names in p.effect.get("aliases", {}).values() for a in names]
    banned = {normalize_name(n) for n in (*forget, *aliases)}
    out: dict[str, str] = {}
    for name in pool:
        key = normalize_name(name)
        if key not in banned:
            out.setdefault(key, name)
    return list(out.values())


@dataclass
class _ImageModel:
    model: Any
    preprocess: Any


def _apply(loaded: Any, patches: Sequence[Patch], text_target: str) -> tuple[np.ndarray, _ImageModel | None]:
    """The patched text projection (as stored) and, when the patches change the vision tower, a
    patched copy of the model for images (None: image embeddings are the base model's)."""
    from forgetpack.engine.torch_patch import read_matrices, write_matrices

    names = sorted({n for p in patches for n in p.targets} | {text_target})
    for p in patches:
        other = [n for n in p.targets if n != text_target and not n.startswith("visual.")]
        if other:
            raise ForgetpackError(f"{display_name(p)}: changes {other[0]!r}; the audit measures changes of the "
                                  f"text projection {text_target!r} and of the vision tower")
    base = read_matrices(loaded.model, names)
    current = apply_in_order(base, patches, targets_of(base), model=str(loaded.model_id))
    vision = {n: m for n, m in current.items() if n.startswith("visual.")}
    if not vision:
        return current[text_target], None
    model = copy.deepcopy(loaded.model)
    write_matrices(model, vision)
    return current[text_target], _ImageModel(model, loaded.preprocess)


# ---------------------------------------------------------------------------- images


def _labelled(variant: Variant, classnames: Sequence[str]) -> list[str]:
    """The dataset's prompts with the variant's name labelled by the variant, in its template."""
    return [variant.template.format(variant.label if c == variant.name else c) for c in classnames]


def _image_prompts(variants: Sequence[Variant], data: Mapping[str, LabeledImages]) -> list[str]:
    return [p for d in data.values() for v in variants if v.name in d.classnames for p in _labelled(v, d.classnames)]


def _on_images(loaded: Any, image_model: _ImageModel | None, space: TextSpace, M_patched: np.ndarray,
               variants: Sequence[Variant], data: Mapping[str, LabeledImages]) -> list[ImageOutcome]:
    """Every variant on every dataset, with the base and (when the patches change them) patched image embeddings."""
    base_fp = vision_fingerprint(loaded.model, loaded.preprocess)
    patched_fp = base_fp if image_model is None else vision_fingerprint(image_model.model, image_model.preprocess)
    out = []
    for d in data.values():
        before = encode_images(loaded, d, fingerprint=base_fp)
        after = before if image_model is None else encode_images(image_model, d, fingerprint=patched_fp)
        out += image_outcomes(space, M_patched, variants, d, before, after)
    return out


def image_outcomes(space: TextSpace, M_patched: np.ndarray, variants: Sequence[Variant], data: LabeledImages,
                   before: np.ndarray, after: np.ndarray) -> list[ImageOutcome]:
    """Each variant of a name of ``data``: accuracy on that name's images, base and patched."""
    out = []
    for v in variants:
        if v.name not in data.classnames:
            continue
        index = data.classnames.index(v.name)
        mask = np.asarray(data.labels) == index
        if not mask.any():
            continue
        prompts = _labelled(v, data.classnames)
        base = _accuracy(before[mask], unit_rows(space.embed(prompts)), index)
        patched = _accuracy(after[mask], unit_rows(space.embed(prompts, M_patched)), index)
        out.append(ImageOutcome(data.name, v, base, patched))
    return out


def _accuracy(images: np.ndarray, classes: np.ndarray, index: int) -> float:
    return float(np.mean(np.argmax(images @ classes.T, axis=1) == index))


def image_probes(model: Any, data: Mapping[str, LabeledImages], forget: Sequence[str], *, unchanged: bool) -> list[Probe]:
    """1-NN and linear-probe recall of each forgotten class, from image embeddings alone."""
    out = []
    for name, test in data.items():
        indices = [test.classnames.index(f) for f in forget if f in test.classnames]
        if not indices:
            continue
        X_test, y_test = encode_images(model, test), np.asarray(test.labels)
        train = load_dataset(name, "train") if name in BUILTIN else None  # an image folder is one split
        if train is None or train.classnames != test.classnames:
            nn_pred, probe_pred = _held_out_predictions(X_test, y_test)
        else:
            X_train, y_train = encode_images(model, train), np.asarray(train.labels)
            nn_pred = y_train[np.argmax(X_test @ X_train.T, axis=1)]
            probe_pred = _probe().fit(X_train, y_train).predict(X_test)
        for i in indices:
            mask = y_test == i
            out.append(Probe(name, test.classnames[i], int(mask.sum()), float(np.mean(nn_pred[mask] == i)),
                             float(np.mean(probe_pred[mask] == i)), unchanged))
    return out


def _probe() -> Any:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def _held_out_predictions(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Without a separate train split: leave-one-out 1-NN and a cross-validated probe."""
    from sklearn.model_selection import cross_val_predict

    similarity = X @ X.T
    np.fill_diagonal(similarity, -np.inf)
    nn_pred = y[np.argmax(similarity, axis=1)]
    folds = min(PROBE_FOLDS, int(np.unique(y, return_counts=True)[1].min()))
    probe_pred = cross_val_predict(_probe(), X, y, cv=folds) if folds >= 2 else np.full_like(y, -1)
    return nn_pred, probe_pred
