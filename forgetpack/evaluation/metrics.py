"""Zero-shot metrics and the paper's forgetting score, computed from predictions alone.

For every dataset that holds a forgotten class we report the accuracy on the forgotten
class(es) and on the remaining classes, both while classifying over *all* the dataset's
classes (the forgotten ones included); every other dataset gets its full accuracy. The
aggregate (lower is better) is

    S = 1/5 * [acc_f'/acc_f + max(0, (r - r')/r) + sum_other max(0, (o - o')/o)]

with the paper's three other datasets making five terms. With fewer (or more) terms we
average over the terms present and say so in ``ForgetScore.note``.

Beside the aggregates, every dataset reports its worst retained class (``worst_class_drop``):
the one class, forgotten ones excepted, whose recall dropped most.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TASK = "zeroshot_classification"  # CLIP_benchmark's name for what we measure
PAPER_TERMS = 5  # forget + retain + three other datasets
TOP_K = 5  # acc5, measured (as CLIP_benchmark does) on sets of at least this many classes
RANK_ROWS = 4096  # images ranked at a time: bounded memory on a set of any size


def json_number(value: float | None) -> float | None:
    """JSON has no NaN: unmeasured values become null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), 6)


def rank_classes(image_features: np.ndarray, text_features: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """The ``k`` classes (text rows) most similar to each image, best first: ``[n, min(k, classes)]``.

    Column 0 is the prediction: on a tie the lower class index wins, as with ``argmax``."""
    n, classes = len(image_features), len(text_features)
    k = max(1, min(k, classes))
    out = np.zeros((n, k), dtype=np.int64)
    for start in range(0, n, RANK_ROWS):
        scores = image_features[start : start + RANK_ROWS] @ text_features.T
        if k == 1:
            out[start : start + RANK_ROWS, 0] = np.argmax(scores, axis=1)
        else:  # a stable sort keeps tied classes in index order, so column 0 is argmax's answer
            out[start : start + RANK_ROWS] = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return out


@dataclass
class DatasetResult:
    """Zero-shot predictions on one dataset, and the accuracies they imply."""

    dataset: str
    classnames: list[str]
    labels: np.ndarray
    predictions: np.ndarray
    templates: list[str] = field(default_factory=list)
    text_features: np.ndarray | None = field(default=None, repr=False)  # one unit row per class
    ranked: np.ndarray | None = field(default=None, repr=False)  # ``rank_classes``: best classes first

    @property
    def confusion(self) -> np.ndarray:
        """``confusion[true, predicted]`` counts."""
        return confusion_matrix(self.labels, self.predictions, len(self.classnames))

    @property
    def acc1(self) -> float:
        return float(np.mean(self.labels == self.predictions)) if len(self.labels) else math.nan

    @property
    def acc5(self) -> float:
        """Share of images whose class is among the model's five best, on a set of at least five classes
        (CLIP_benchmark's rule); NaN on a smaller set, and where the ranking was not kept."""
        if len(self.classnames) < TOP_K or self.ranked is None or not len(self.labels):
            return math.nan
        return float(np.mean(np.any(self.ranked[:, :TOP_K] == self.labels[:, None], axis=1)))

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

    def clip_benchmark_metrics(self) -> dict[str, float | None]:
        """The metrics CLIP_benchmark's ``zeroshot_classification`` reports, under its keys and in its
        order; what it writes as NaN (acc5 below five classes) is null here."""
        return {
            "acc1": json_number(self.acc1),
            "acc5": json_number(self.acc5),
            "mean_per_class_recall": json_number(self.mean_per_class_recall),
        }

    def metrics(self) -> dict[str, Any]:
        """CLIP_benchmark's metrics, plus the per-class recalls."""
        return {
            **self.clip_benchmark_metrics(),
            "per_class_recall": {c: json_number(r) for c, r in zip(self.classnames, self.per_class, strict=True)},
            "n": int(len(self.labels)),
        }


NEIGHBOURS_SHOWN = 6  # nearest retained classes shown beside each forgotten one


def nearest_classes(text_features: np.ndarray, forgotten: Sequence[int], k: int = NEIGHBOURS_SHOWN) -> list[int]:
    """The retained classes whose (base) text embeddings are nearest each forgotten class, ``k``
    per forgotten class, nearest first: the classes a user expects to survive, and the ones a
    forgetting patch is most likely to take with it (the paper's "semantically close" classes)."""
    gone = set(forgotten)
    out: list[int] = []
    for f in forgotten:
        order = np.argsort(-(text_features @ text_features[f]), kind="stable")
        out += [int(i) for i in order if int(i) not in gone and int(i) not in out][:k]
    return out


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, n_classes: int) -> np.ndarray:
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(labels, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def per_class_recall(confusion: np.ndarray) -> np.ndarray:
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(confusion) / np.maximum(support, 1), np.nan)


@dataclass(frozen=True)
class ClassDrop:
    """The retained class whose recall fell most, base -> patched, on one dataset: an aggregate
    over many classes can hide one class collapsing (forgetting "two" and "nine" once cost UCI
    "one" 14 pt while the retained digits' accuracy fell 1.5 pt)."""

    dataset: str
    classname: str
    base: float
    patched: float

    @property
    def drop_pt(self) -> float:
        """Recall lost, in percentage points (negative: the class gained)."""
        return 100 * (self.base - self.patched)

    def to_json(self) -> dict[str, Any]:
        return {"class": self.classname, "base": json_number(self.base), "patched": json_number(self.patched),
                "drop_pt": json_number(round(self.drop_pt, 4))}


def worst_class_drop(base: DatasetResult, patched: DatasetResult, forget: Sequence[str] = ()) -> ClassDrop | None:
    """The class of ``base`` (forgotten ones excepted, and those without images) whose per-class
    recall dropped most after the patches; the first such class on a tie, None if there is none."""
    before, after = base.per_class, patched.per_class
    worst: ClassDrop | None = None
    for i, name in enumerate(base.classnames):
        if name in forget or math.isnan(before[i]) or math.isnan(after[i]):
            continue
        if worst is None or before[i] - after[i] > worst.base - worst.patched:
            worst = ClassDrop(base.dataset, name, float(before[i]), float(after[i]))
    return worst


def worst_class_drops(base: dict[str, DatasetResult], patched: dict[str, DatasetResult] | None,
                      forget: Sequence[str]) -> dict[str, ClassDrop]:
    """``worst_class_drop`` of every dataset, those without forgotten classes included (empty without patches)."""
    if patched is None:
        return {}
    drops = {name: worst_class_drop(base[name], patched[name], forget) for name in base}
    return {name: d for name, d in drops.items() if d is not None}


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
        pair = lambda p: {"base": json_number(p[0]), "patched": json_number(p[1])}  # noqa: E731
        return {
            "forget_classes": self.forget,
            "forget_acc": pair(self.forget_acc),
            "retain_acc": pair(self.retain_acc),
            "other_datasets": {k: pair(v) for k, v in self.others.items()},
            "terms": {k: json_number(v) for k, v in self.terms.items()},
            "S": json_number(self.score),
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


def forget_scores(
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
