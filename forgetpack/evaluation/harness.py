"""Measure forgetting: zero-shot accuracy of a model before and after its patches.

The protocol is the paper's. For every dataset that holds a forgotten class we report the
accuracy on the forgotten class(es) and on the remaining classes, both while classifying
over *all* the dataset's classes (the forgotten ones included); every other dataset gets
its full accuracy. The aggregate (lower is better) is

    S = 1/5 * [acc_f'/acc_f + max(0, (r - r')/r) + sum_other max(0, (o - o')/o)]

with the paper's three other datasets making five terms. With fewer (or more) terms we
average over the terms present and say so in ``ForgetScore.note``.

Image embeddings depend only on the vision tower, which forget patches leave alone, so
they are cached on disk per (vision-tower fingerprint, dataset fingerprint): evaluating
many patches of one model re-encodes only the class prompts. The cache lives in
``$FORGETPACK_CACHE`` (default ``~/.cache/forgetpack``); ``FORGETPACK_CACHE=off`` disables it.

Library entry point: :func:`evaluate`. ``forgetpack eval`` is a thin shell around it.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from forgetpack.evaluation.datasets import BUILTIN, LabeledImages, load_dataset
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import check_templates
from forgetpack.format.patch import display_name

if TYPE_CHECKING:
    import torch

    from forgetpack.format.patch import Patch

TASK = "zeroshot_classification"
PAPER_TERMS = 5  # forget + retain + three other datasets
CACHE_ENV = "FORGETPACK_CACHE"
_MEMORY_CACHE: dict[str, np.ndarray] = {}  # in-process copy of the disk cache


# ----------------------------------------------------------------------------- metrics


@dataclass
class DatasetResult:
    """Zero-shot predictions on one dataset, and the accuracies they imply."""

    dataset: str
    classnames: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    templates: list[str] = field(default_factory=list)

    @property
    def confusion(self) -> np.ndarray:
        """``confusion[true, predicted]`` counts."""
        return confusion_matrix(self.labels, self.predictions, len(self.classnames))

    @property
    def acc1(self) -> float:
        return float(np.mean(self.labels == self.predictions)) if len(self.labels) else math.nan

    @property
    def per_class(self) -> np.ndarray:
        """Recall of each class; NaN for a class without images."""
        return per_class_recall(self.confusion)

    @property
    def mean_per_class_recall(self) -> float:
        recall = self.per_class
        return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else math.nan

    def accuracy_over(self, classes: Sequence[int]) -> float:
        """Accuracy on the images whose true class is in ``classes`` (NaN if there are none)."""
        mask = np.isin(self.labels, np.asarray(list(classes), dtype=np.int64))
        return float(np.mean(self.predictions[mask] == self.labels[mask])) if mask.any() else math.nan

    def metrics(self) -> dict[str, Any]:
        """CLIP_benchmark-style metrics, plus the per-class recalls."""
        return {
            "acc1": _num(self.acc1),
            "mean_per_class_recall": _num(self.mean_per_class_recall),
            "per_class_recall": {c: _num(r) for c, r in zip(self.classnames, self.per_class, strict=True)},
            "n": int(len(self.labels)),
        }


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


@dataclass
class ForgetScore:
    """The paper's forgetting measures for one dataset that holds forgotten classes."""

    dataset: str
    forget: list[str]
    forget_acc: tuple[float, float]  # (base, patched)
    retain_acc: tuple[float, float]
    others: dict[str, tuple[float, float]]  # full accuracy of each dataset without forgotten classes
    terms: dict[str, float]
    score: float
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        pair = lambda p: {"base": _num(p[0]), "patched": _num(p[1])}  # noqa: E731
        return {
            "forget_classes": self.forget,
            "forget_acc": pair(self.forget_acc),
            "retain_acc": pair(self.retain_acc),
            "other_datasets": {k: pair(v) for k, v in self.others.items()},
            "terms": {k: _num(v) for k, v in self.terms.items()},
            "S": _num(self.score),
            "n_terms": len(self.terms),
            "note": self.note,
        }


def forgetting_score(
    forget_acc: tuple[float, float],
    retain_acc: tuple[float, float],
    others: dict[str, tuple[float, float]],
) -> tuple[float, dict[str, float], str]:
    """The paper's S (lower is better) from (base, patched) accuracy pairs.

    Returns ``(S, terms, note)``. A term whose base accuracy is 0 (or unmeasured) is
    undefined and left out; S is the mean of the terms present, which equals the paper's
    1/5 * sum when there are exactly five.
    """
    terms: dict[str, float] = {}
    dropped: list[str] = []

    def add(name: str, base: float, value: float) -> None:
        if not (base > 0) or math.isnan(value):
            dropped.append(name)
        else:
            terms[name] = value

    f, f2 = forget_acc
    add("forget", f, f2 / f if f > 0 else math.nan)
    r, r2 = retain_acc
    add("retain", r, max(0.0, (r - r2) / r) if r > 0 else math.nan)
    for name, (o, o2) in others.items():
        add(f"other:{name}", o, max(0.0, (o - o2) / o) if o > 0 else math.nan)
    score = float(np.mean(list(terms.values()))) if terms else math.nan
    notes = []
    if len(terms) != PAPER_TERMS:
        notes.append(f"averaged over {len(terms)} terms (the paper's S has {PAPER_TERMS})")
    if dropped:
        notes.append(f"left out (base accuracy 0 or unmeasured): {', '.join(dropped)}")
    return score, terms, "; ".join(notes)


def _num(value: float) -> float | None:
    """JSON has no NaN: unmeasured values become null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


# ----------------------------------------------------------------------------- report


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

    @property
    def datasets(self) -> list[str]:
        return list(self.base)

    @property
    def score(self) -> float:
        """Mean S over the datasets that hold forgotten classes (NaN without patches)."""
        values = [s.score for s in self.scores.values() if not math.isnan(s.score)]
        return float(np.mean(values)) if values else math.nan

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
            "forget": self.forget,
            "results": results,
            "forgetting": {k: v.to_json() for k, v in self.scores.items()},
            "S": _num(self.score),
            "skipped_images": self.skipped,
        }


# ----------------------------------------------------------------------------- encoding


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


def vision_fingerprint(model: torch.nn.Module, preprocess: Any) -> str:
    """A hash of everything that decides an image embedding: vision weights and preprocess."""
    import torch

    h = hashlib.sha256(repr(preprocess).encode())
    visual = getattr(model, "visual", model)
    with torch.no_grad():
        for name, tensor in sorted(visual.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cache_dir() -> Path | None:
    """Where image embeddings are cached, or None when caching is off."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "forgetpack"


def encode_images(
    loaded: Any, data: LabeledImages, *, device: str = "cpu", batch_size: int = 256, fingerprint: str | None = None
) -> np.ndarray:
    """L2-normalised image embeddings of ``data`` (float32, one row per image), cached."""
    import torch

    model = loaded.model
    fingerprint = fingerprint or vision_fingerprint(model, loaded.preprocess)
    key = hashlib.sha256(f"{fingerprint}:{data.fingerprint()}".encode()).hexdigest()[:40]
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key]
    root = cache_dir()
    path = root / "image-embeddings" / f"{key}.npy" if root else None
    if path is not None and path.is_file():
        try:
            features = np.load(path, allow_pickle=False)
            if features.shape[0] == len(data):
                _MEMORY_CACHE[key] = features
                return features
        except (OSError, ValueError):
            pass  # a damaged cache entry is recomputed
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = torch.stack([loaded.preprocess(im) for im in data.images[start : start + batch_size]])
            chunks.append(model.encode_image(batch.to(device), normalize=True).float().cpu().numpy())
    features = np.concatenate(chunks).astype(np.float32)
    _MEMORY_CACHE[key] = features
    if path is not None:
        try:  # atomic write, so concurrent evaluations never read half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npy", delete=False) as tmp:
                np.save(tmp, features)
            os.replace(tmp.name, path)
        except OSError:
            pass  # caching is an optimisation; a read-only home must not fail the evaluation
    return features


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
    return np.argmax(image_features @ text_features.T, axis=1)


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
) -> dict[str, DatasetResult]:
    results = {}
    for name, d in data.items():
        image_features = encode_images(loaded, d, device=device, batch_size=batch_size, fingerprint=fingerprint)
        text_features = encode_classnames(loaded, d.classnames, templates[name], device=device)
        results[name] = DatasetResult(name, list(d.classnames), d.labels, classify(image_features, text_features),
                                      list(templates[name]))  # fmt: skip
    return results


def evaluate(
    model: Any,
    patches: Sequence[Any] = (),
    forget: Sequence[str] = (),
    datasets: Sequence[str | LabeledImages] = BUILTIN,
    templates: Sequence[str] | None = None,
    *,
    device: str = "cpu",
    batch_size: int = 256,
) -> EvalReport:
    """Evaluate ``model`` (a spec such as ``"mini"``, or a loaded model) before and after ``patches``.

    ``patches`` are paths or :class:`forgetpack.format.patch.Patch` objects, applied in order.
    ``forget`` names the classes the patches are meant to remove (for the forgetting
    scores). ``templates`` override each dataset's default prompt(s); several templates
    are ensembled. A loaded model passed in is never modified: patches go on a copy.
    """
    data = resolve_datasets(datasets)
    forget = check_forget(forget, data)
    if templates:
        chosen = check_templates(templates)
        per_dataset = {k: list(chosen) for k in data}
    else:
        per_dataset = {k: list(d.templates) for k, d in data.items()}
    patch_objects = _read_patches(patches)
    loaded, owned = _as_loaded(model, device)
    model_id = str(getattr(loaded, "model_id", model if isinstance(model, str) else "model"))

    fingerprint = vision_fingerprint(loaded.model, loaded.preprocess)
    base = _predict_all(loaded, data, per_dataset, device, batch_size, fingerprint)
    patched = None
    if patch_objects:
        from forgetpack.engine.torch_patch import apply_patches

        target = loaded if owned else _Loaded(copy.deepcopy(loaded.model), loaded.preprocess, loaded.tokenizer, model_id)
        apply_patches(target.model, patch_objects)
        touches_vision = any(t.startswith("visual.") for p in patch_objects for t in p.targets)
        patched_fp = vision_fingerprint(target.model, target.preprocess) if touches_vision else fingerprint
        patched = _predict_all(target, data, per_dataset, device, batch_size, patched_fp)

    scores = _scores(base, patched, forget)
    return EvalReport(
        model=model_id,
        patches=[display_name(p) for p in patch_objects],
        forget=forget,
        base=base,
        patched=patched,
        scores=scores,
        skipped={k: len(d.skipped) for k, d in data.items() if d.skipped},
    )


def _scores(
    base: dict[str, DatasetResult], patched: dict[str, DatasetResult] | None, forget: list[str]
) -> dict[str, ForgetScore]:
    """A ForgetScore for each dataset holding a forgotten class; the others are its "other datasets"."""
    after = patched or base
    holding = {k for k, r in base.items() if any(c in r.classnames for c in forget)}
    others = {k: (base[k].acc1, after[k].acc1 if patched else math.nan) for k in base if k not in holding}
    scores = {}
    for name in base:
        if name not in holding:
            continue
        b, a = base[name], after[name]
        forgotten = [b.classnames.index(c) for c in forget if c in b.classnames]
        kept = [i for i in range(len(b.classnames)) if i not in forgotten]
        f = (b.accuracy_over(forgotten), a.accuracy_over(forgotten) if patched else math.nan)
        r = (b.accuracy_over(kept), a.accuracy_over(kept) if patched else math.nan)
        if patched:
            s, terms, note = forgetting_score(f, r, others)
        else:
            s, terms, note = math.nan, {}, "no patches: base accuracies only"
        scores[name] = ForgetScore(name, [b.classnames[i] for i in forgotten], f, r, dict(others), terms, s, note)
    return scores


# ----------------------------------------------------------------------------- output


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def _delta(base: float, after: float) -> str:
    if math.isnan(base) or math.isnan(after):
        return ""
    d = 100 * (after - base)
    return f"{d:+.1f}"


def render_table(report: EvalReport, console: Any = None, per_class: bool | None = None) -> None:
    """Print the before/after summary (and per-class accuracy) as rich tables.

    ``per_class=None`` shows per-class rows for datasets of up to 20 classes and only the
    forgotten classes for larger ones.
    """
    from rich.table import Table

    from forgetpack.cli.render import console as verbatim_console

    console = console or verbatim_console()
    has_patch = report.patched is not None
    after = report.patched or {}
    title = f"{report.model}"
    if report.patches:
        title += f" + {len(report.patches)} patch{'es' if len(report.patches) > 1 else ''}"
    if report.forget:
        title += f", forgetting {', '.join(report.forget)}"
    summary = Table(title=title, title_justify="left")
    summary.add_column("dataset")
    summary.add_column("measure")
    summary.add_column("base %", justify="right")
    if has_patch:
        summary.add_column("patched %", justify="right")
        summary.add_column("Δ pt", justify="right")

    def row(dataset: str, measure: str, base: float, patched: float) -> None:
        cells = [dataset, measure, _pct(base)]
        if has_patch:
            cells += [_pct(patched), _delta(base, patched)]
        summary.add_row(*cells)

    for name, b in report.base.items():
        a = after.get(name)
        score = report.scores.get(name)
        if score is not None:
            row(name, f"forget ({', '.join(score.forget)})", *score.forget_acc)
            row("", f"retain ({len(b.classnames) - len(score.forget)} classes)", *score.retain_acc)
            row("", "all classes", b.acc1, a.acc1 if a else math.nan)
        else:
            row(name, "all classes", b.acc1, a.acc1 if a else math.nan)
        summary.add_section()
    console.print(summary)

    for name, score in report.scores.items():
        if not math.isnan(score.score):
            terms = ", ".join(f"{k} {v:.3f}" for k, v in score.terms.items())
            console.print(f"S[{name}] = {score.score:.4f}  ({terms}){'; ' + score.note if score.note else ''}")
    if len(report.scores) > 1 and not math.isnan(report.score):
        console.print(f"S = {report.score:.4f} (mean over {len(report.scores)} datasets holding forgotten classes)")

    for name, b in report.base.items():
        forgotten = set(report.forgotten_indices(name))
        show = per_class if per_class is not None else len(b.classnames) <= 20
        rows = range(len(b.classnames)) if show else sorted(forgotten)
        if not rows:
            continue
        table = Table(title=f"{name}: per-class accuracy", title_justify="left")
        table.add_column("class")
        table.add_column("n", justify="right")
        table.add_column("base %", justify="right")
        if has_patch:
            table.add_column("patched %", justify="right")
            table.add_column("Δ pt", justify="right")
        counts = np.bincount(b.labels, minlength=len(b.classnames))
        base_recall = b.per_class
        after_recall = after[name].per_class if has_patch else None
        for i in rows:
            label = f"{b.classnames[i]} (forgotten)" if i in forgotten else b.classnames[i]
            cells = [label, str(counts[i]), _pct(base_recall[i])]
            if after_recall is not None:
                cells += [_pct(after_recall[i]), _delta(base_recall[i], after_recall[i])]
            table.add_row(*cells)
        console.print(table)


def plot_report(report: EvalReport, path: str | os.PathLike[str]) -> Path:
    """A PNG of per-class accuracy before (and after) the patches, one panel per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report.base)
    fig, axes = plt.subplots(len(names), 1, figsize=(10, 2.8 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        b = report.base[name]
        x = np.arange(len(b.classnames))
        width = 0.4 if report.patched else 0.8
        ax.bar(x - (width / 2 if report.patched else 0), 100 * np.nan_to_num(b.per_class), width, label="base",
               color="#4c72b0")  # fmt: skip
        if report.patched:
            ax.bar(x + width / 2, 100 * np.nan_to_num(report.patched[name].per_class), width, label="patched",
                   color="#dd8452")  # fmt: skip
        ax.set_ylim(0, 105)
        ax.set_ylabel("accuracy %")
        ax.set_title(name, loc="left")
        if len(b.classnames) <= 60:
            ax.set_xticks(x, b.classnames, rotation=0 if len(b.classnames) <= 12 else 90)
            forgotten = set(report.forgotten_indices(name))
            for i, tick in enumerate(ax.get_xticklabels()):
                if i in forgotten:
                    tick.set_color("#c44e52")
                    tick.set_fontweight("bold")
        ax.legend(loc="lower right", fontsize="small")
    title = report.model + (f" + {len(report.patches)} patch(es)" if report.patches else "")
    if report.forget:
        title += f", forgetting {', '.join(report.forget)}"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise ForgetpackError(f"cannot write plot {out}: {exc}") from exc
    finally:
        plt.close(fig)
    return out
