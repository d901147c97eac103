"""The paper's experiment: every forget request of its protocol, per solver, scored by its S.

Kravets & Namboodiri (TMLR 2025) forget three classes in each dataset, one at a time and all
three together, and measure after each patch the forgotten classes' accuracy and the retained
classes' accuracy on that dataset (classifying over all its classes) and the full accuracy of
every other dataset; S (lower is better, :func:`forgetpack.evaluation.metrics.forgetting_score`)
sums the forget ratio and the relative drops. :func:`run_benchmark` runs that protocol on any
list of :class:`~forgetpack.evaluation.paper_datasets.BenchmarkSet` (the four datasets read from
disk, or mini's built-in sets) for each solver side by side:

- ``paper``: the paper's method as published: its LoRA/Adam loop and its own stopping rule, its
  target (the empty string's embedding, unit norm), the dataset's own prompt as the only forget
  prompt (the paper forgets the prompt it classifies with), no text-space verification. On mini
  it forgets one request of eight (docs/benchmark.md); solved for the bare name only, as
  ``tools/bench_solvers.py``'s "paper as published" is, none;
- ``default``: forgetpack's defaults (closed form, mirror target, five templates, verified);
- any installed solver name: forgetpack's defaults with that solver.

Every request is solved by :func:`forgetpack.engine.solve.forget` with the datasets' class names
as extra candidates (they are what the patch must keep). Image embeddings are computed once per
dataset (and cached on disk by :mod:`forgetpack.evaluation.image_cache`); the class prompts'
pre-projection features once per model (:mod:`forgetpack.engine.features`). Only the text
projection differs between patches, so each patch costs one matrix product per dataset.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetpack.evaluation.harness import classify, load
from forgetpack.evaluation.image_cache import encode_images, vision_fingerprint
from forgetpack.evaluation.metrics import DatasetResult, ForgetScore, forget_scores, json_number
from forgetpack.evaluation.paper_datasets import BenchmarkSet
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import normalize_name

DATASET_TEMPLATES = "dataset"  # a request's forget prompts are its dataset's own classification prompts
# What each benchmark solver name asks of ``forget`` (ForgetRequest options).
SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "paper": {"solver": "paper", "target": "empty", "target_norm": "unit", "templates": DATASET_TEMPLATES, "verify": False},
    "default": {},
}
DEFAULT_SOLVERS = ("paper", "default")

Progress = Callable[[int, int], None]  # (steps done, steps in all): datasets embedded, then requests solved


def solver_options(name: str) -> dict[str, Any]:
    """The request options of a benchmark solver: ``paper``, ``default`` or an installed solver's name."""
    if name in SOLVER_OPTIONS:
        return dict(SOLVER_OPTIONS[name])
    from forgetpack.engine.solvers import find_solver

    find_solver(name)  # one line naming the installed ones if it is not
    return {"solver": name}


def requests_of(forget: Sequence[str]) -> list[tuple[str, ...]]:
    """The paper's requests for one dataset: each class alone, then all of them together."""
    singles = [(c,) for c in forget]
    return singles + [tuple(forget)] if len(forget) > 1 else singles


@dataclass
class RequestResult:
    """One patch: what it forgot, with which solver, how long it took, and its scores."""

    solver: str
    dataset: str
    forget: list[str]
    score: ForgetScore
    seconds: float  # making the patch (the whole ``forget`` call)
    rank: int

    @property
    def other_acc(self) -> tuple[float, float]:
        """Mean (base, patched) accuracy of the other datasets."""
        pairs = list(self.score.others.values())
        if not pairs:
            return math.nan, math.nan
        return float(np.mean([p[0] for p in pairs])), float(np.mean([p[1] for p in pairs]))

    def to_json(self) -> dict[str, Any]:
        return {"solver": self.solver, "dataset": self.dataset, "forget": self.forget, "seconds": round(self.seconds, 4),
                "rank": self.rank, **self.score.to_json()}  # fmt: skip


@dataclass
class BenchmarkReport:
    """Base zero-shot results and every request's scores, per solver."""

    model: str
    solvers: list[str]
    base: dict[str, DatasetResult]
    forget: dict[str, list[str]]  # dataset -> the classes its requests forget (absent: an "other" set only)
    sources: dict[str, str]
    results: list[RequestResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def rows(self, solver: str, dataset: str | None = None) -> list[RequestResult]:
        return [r for r in self.results if r.solver == solver and (dataset is None or r.dataset == dataset)]

    def mean_score(self, solver: str, dataset: str | None = None, size: int | None = None) -> float:
        """Mean S over a solver's requests (of one dataset, of one request size)."""
        values = [r.score.score for r in self.rows(solver, dataset) if size is None or len(r.forget) == size]
        values = [v for v in values if not math.isnan(v)]
        return float(np.mean(values)) if values else math.nan

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "solvers": {s: solver_options(s) for s in self.solvers},
            "datasets": {
                name: {"images": len(r.labels), "classes": len(r.classnames), "templates": r.templates,
                       "forget": self.forget.get(name, []), "source": self.sources.get(name, ""),
                       "base_acc": json_number(r.acc1)}
                for name, r in self.base.items()
            },  # fmt: skip
            "requests": [r.to_json() for r in self.results],
            "mean_S": {s: {"all": json_number(self.mean_score(s)),
                           **{d: json_number(self.mean_score(s, d)) for d in self.forget}} for s in self.solvers},
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }  # fmt: skip


# ----------------------------------------------------------------------------- class embeddings


@dataclass
class ClassPrompts:
    """Pre-projection features of every dataset's class prompts: a patch changes only the projection,
    so its class embeddings are one product away."""

    features: dict[str, list[np.ndarray]]  # dataset -> one [classes, width] array per template
    bias: np.ndarray | None

    def embeddings(self, M: np.ndarray) -> dict[str, np.ndarray]:
        """Per dataset, one L2-normalised embedding per class through ``y = x @ M (+ bias)``: the mean
        over templates, renormalised (CLIP's ensemble, as ``harness.encode_classnames``)."""
        out = {}
        for name, per_template in self.features.items():
            total = np.zeros((per_template[0].shape[0], M.shape[1]))
            for X in per_template:
                y = X.astype(np.float64) @ M + (self.bias if self.bias is not None else 0.0)
                total += y / np.linalg.norm(y, axis=1, keepdims=True)
            out[name] = (total / np.linalg.norm(total, axis=1, keepdims=True)).astype(np.float32)
        return out


def class_prompts(loaded: Any, sets: Sequence[BenchmarkSet]) -> ClassPrompts:
    from forgetpack.engine.features import text_features
    from forgetpack.engine.projections import find_projection, projection_bias

    proj = find_projection(loaded.model, "text")
    prompts = {s.name: [[t.format(c) for c in s.data.classnames] for t in s.data.templates] for s in sets}
    flat = [p for per in prompts.values() for group in per for p in group]
    feats = dict(zip(flat, text_features(loaded, flat), strict=True))
    features = {name: [np.stack([feats[p] for p in group]) for group in per] for name, per in prompts.items()}
    return ClassPrompts(features, projection_bias(loaded.model, proj))


# ----------------------------------------------------------------------------- the protocol


def run_benchmark(
    model: Any,
    sets: Sequence[BenchmarkSet],
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    *,
    device: str = "cpu",
    batch_size: int = 64,
    progress: Progress | None = None,
) -> BenchmarkReport:
    """Base zero-shot accuracy on every set, then every request of every set with forget classes,
    per solver, each patch evaluated on every set. ``model`` is a spec or a loaded model."""
    from forgetpack.engine.projections import find_projection, projection_matrix
    from forgetpack.engine.request import ForgetRequest
    from forgetpack.engine.solve import forget

    solvers = list(dict.fromkeys(solvers))
    options = {s: solver_options(s) for s in solvers}
    if not sets:
        raise ForgetpackError("no dataset to benchmark on")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise ForgetpackError(f"a dataset is given twice ({', '.join(names)})")
    requests = [(s.name, r) for s in sets for r in requests_of(s.forget)]
    if not requests:
        raise ForgetpackError("no dataset names classes to forget")
    vocabulary = _vocabulary(sets)
    templates = {s.name: list(s.data.templates) for s in sets}
    # the forget names are the data sets' own classes, whatever the model declares: known by construction
    planned = [(solver, dataset, ForgetRequest(list(names_), vocabulary=_without(vocabulary, names_), allow_unknown=True,
                                               **_options(options[solver], templates[dataset])))
               for solver in solvers for dataset, names_ in requests]  # every request checked before any model work
    loaded = load(model, device) if isinstance(model, str) else model
    total, done = len(sets) + len(planned), 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    timings: dict[str, float] = {}
    fingerprint = vision_fingerprint(loaded.model, loaded.preprocess)
    images = {}
    for s in sets:
        t0 = time.perf_counter()
        images[s.name] = encode_images(loaded, s.data, device=device, batch_size=batch_size, fingerprint=fingerprint)
        timings[f"embed_images:{s.name}"] = time.perf_counter() - t0
        step()
    t0 = time.perf_counter()
    prompts = class_prompts(loaded, sets)
    timings["encode_class_prompts"] = time.perf_counter() - t0
    proj = find_projection(loaded.model, "text")
    W = projection_matrix(loaded.model, proj)
    base = _predict(sets, images, prompts.embeddings(proj.feature_form(W)))
    report = BenchmarkReport(str(getattr(loaded, "model_id", model)), solvers, base,
                             {s.name: list(s.forget) for s in sets if s.forget}, {s.name: s.source for s in sets},
                             timings=timings)  # fmt: skip
    for solver, dataset, request in planned:
        t0 = time.perf_counter()
        made = forget(loaded, request)
        seconds = time.perf_counter() - t0
        patched_W = made.patch.apply({proj.target: W})[proj.target]
        patched = _predict(sets, images, prompts.embeddings(proj.feature_form(patched_W)))
        score = score_request(base, patched, dataset, request.forget)
        report.results.append(RequestResult(solver, dataset, list(request.forget), score, seconds, made.patch.rank))
        step()
    return report


def score_request(base: dict[str, DatasetResult], patched: dict[str, DatasetResult], dataset: str,
                  forget: Sequence[str]) -> ForgetScore:
    """S of one request on the dataset it forgets in: the other datasets are those holding none of
    its classes (the paper's three, when all four datasets are evaluated)."""
    return forget_scores(base, patched, list(forget))[dataset]


def _predict(sets: Sequence[BenchmarkSet], images: dict[str, np.ndarray],
             classes: dict[str, np.ndarray]) -> dict[str, DatasetResult]:
    return {s.name: DatasetResult(s.name, list(s.data.classnames), s.data.labels, classify(images[s.name], classes[s.name]),
                                  list(s.data.templates)) for s in sets}  # fmt: skip


def _vocabulary(sets: Sequence[BenchmarkSet]) -> list[str]:
    """Every set's class names, once each (names that differ only in case or punctuation are one name)."""
    seen: dict[str, str] = {}
    for s in sets:
        for c in s.data.classnames:
            seen.setdefault(normalize_name(c), c)
    return list(seen.values())


def _without(names: Sequence[str], forget: Sequence[str]) -> list[str]:
    gone = {normalize_name(n) for n in forget}
    return [n for n in names if normalize_name(n) not in gone]


def _options(options: dict[str, Any], templates: list[str]) -> dict[str, Any]:
    return {**options, "templates": templates} if options.get("templates") == DATASET_TEMPLATES else options
