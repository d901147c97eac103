"""A forgetting request, checked in one place, and the recipe and effect a patch records.

:class:`ForgetRequest` is everything ``forget`` can be asked; building one runs every check
and fills every default, so a bad request fails in one line before any model is loaded (the
CLI builds one from its options and checks nothing itself). :class:`Recipe` (everything needed
to solve again) and :class:`Effect` (what the patch does in text space) are what the patch
metadata carries: ``to_json`` gives exactly those dicts and ``from_json`` reads them back.

The text-space verdict for a forget name is *outranked*: with its original embedding standing
in for its images, some other candidate now ranks above it (the patch metadata's key).
Torch-free: the CLI imports this module to check its options.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from forgetpack.engine.preserve import DEFAULT_AUTO_K, DEFAULT_NEIGHBOURS
from forgetpack.engine.solvers import Weights, find_solver
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import FORGET_TEMPLATES, check_disjoint, check_templates, clean_names, normalize_name
from forgetpack.format.patch import Patch, display_name

ENGINE_VERSION = 1  # recorded in every recipe
DEFAULT_SOLVER = "closed-form"
TARGETS = ("mirror", "antipode", "empty")
TARGET_NORMS = ("original", "unit")
DEFAULT_TARGET = TARGETS[0]
DEFAULT_TARGET_NORM = TARGET_NORMS[0]
DEFAULT_BACKGROUND = 1.0  # weight of the whole-vocabulary preserve block, relative to the preserve set
# bypass families ``--harden`` solves against; the model-searching "aliases" family costs minutes, so it is opt-in
DEFAULT_HARDEN_FAMILIES = ("templates", "surface", "lexicon", "synonyms")
BUILTIN_VOCABULARY = "imagenet-1k"  # the name recipes give forgetpack.engine.vocabulary's built-in names


@dataclass(frozen=True)
class ForgetRequest:
    """What to forget and how; checked and normalised on creation (``dataclasses.replace`` checks again)."""

    forget: Sequence[str]
    preserve: Sequence[str] | None = None  # an explicit preserve list; None: the automatic one
    auto_preserve: int | None = None  # nearest vocabulary names preserved per forget name (None: DEFAULT_AUTO_K)
    vocabulary: Sequence[str] = ()  # extra candidate names, beside the built-in and the model's own
    solver: str = DEFAULT_SOLVER
    target: str = DEFAULT_TARGET
    target_norm: str = DEFAULT_TARGET_NORM
    templates: Sequence[str] | None = None  # None: FORGET_TEMPLATES
    rank: int | None = None  # None: the solver's (and the smallest that verifies as well, where it can tell)
    seed: int = 0
    weights: Weights | None = None  # None: the solver's defaults
    neighbours: int = DEFAULT_NEIGHBOURS  # vocabulary neighbours per forget name among the candidates
    background: float = DEFAULT_BACKGROUND
    verify: bool = True  # False: no strengthening loop (the effect is still measured)
    harden: Sequence[str] = ()  # bypass families to solve against until clean (forgetpack.engine.harden); () is off
    allow_unknown: bool = False  # forget names the model does not know (forgetpack.engine.known) instead of refusing

    def __post_init__(self) -> None:
        forget = clean_names(self.forget, "forget")
        if not forget:
            raise ForgetpackError("no forget names given")
        preserve = clean_names(self.preserve, "preserve") if self.preserve is not None else None
        if preserve is not None:
            check_disjoint(forget, preserve)
            if self.auto_preserve is not None:
                raise ForgetpackError("give either an explicit preserve list or --auto-preserve K, not both")
        elif self.auto_preserve is not None and self.auto_preserve < 0:
            raise ForgetpackError(f"--auto-preserve must be ≥ 0, got {self.auto_preserve}")
        if self.rank is not None and self.rank <= 0:
            raise ForgetpackError(f"rank must be a positive integer, got {self.rank}")
        if self.target not in TARGETS:
            raise ForgetpackError(f"unknown target {self.target!r} (choose from {', '.join(TARGETS)})")
        if self.target_norm not in TARGET_NORMS:
            raise ForgetpackError(f"unknown target norm {self.target_norm!r} (choose from {', '.join(TARGET_NORMS)})")
        templates = check_templates(self.templates, FORGET_TEMPLATES)
        find_solver(self.solver)
        if self.harden:
            from forgetpack.engine.variants import available_families

            unknown = sorted(set(self.harden) - set(available_families()))
            if unknown:
                raise ForgetpackError(f"unknown variant family {unknown[0]!r} (installed: {', '.join(sorted(available_families()))})")
        normalised = {
            "forget": tuple(forget),
            "preserve": tuple(preserve) if preserve is not None else None,
            "vocabulary": tuple(clean_names(self.vocabulary, "vocabulary")) if self.vocabulary else (),
            "templates": tuple(templates),
            "harden": tuple(dict.fromkeys(self.harden)),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)  # frozen: set once, here

    @property
    def auto_k(self) -> int:
        """Vocabulary names preserved per forget name when there is no explicit list."""
        return DEFAULT_AUTO_K if self.auto_preserve is None else self.auto_preserve

    @property
    def preserve_mode(self) -> str:
        return "explicit" if self.preserve is not None else f"auto:{self.auto_k}"

    @property
    def adaptive(self) -> bool:
        """Whether an automatic preserve set grows by the names a first solve moved most."""
        return self.preserve is None and self.verify and self.auto_k > 0

    @classmethod
    def from_recipes(cls, recipes: Sequence[Recipe], **overrides: Any) -> ForgetRequest:
        """The union of recorded requests (what ``compose`` solves): every forget name, every
        preserve name nobody forgets, every template; solver, target and seed of the first.
        ``overrides`` that are not None replace what the recipes say. Every recipe must record a
        request (``check_composable``)."""
        forget = _unique(n for r in recipes for n in r.forget)
        gone = {normalize_name(n) for n in forget}
        first = recipes[0]
        options: dict[str, Any] = {
            "preserve": _unique(n for r in recipes for n in r.preserve if normalize_name(n) not in gone),
            "vocabulary": list(dict.fromkeys(n for r in recipes for n in r.extra_vocabulary)),
            "solver": first.solver,
            "target": first.target,
            "target_norm": first.target_norm,
            "templates": list(dict.fromkeys(t for r in recipes for t in r.templates)),
            "seed": first.seed,
            "harden": list(dict.fromkeys(f for r in recipes for f in r.harden)),
        }
        options.update({k: v for k, v in overrides.items() if v is not None})
        return cls(forget, **options)


def check_composable(patches: Sequence[Patch]) -> list[Recipe]:
    """The recorded requests of ``patches``, or a one-line error: what the files alone can tell
    about ``compose`` before a model is loaded (each must record a forgetting recipe, not be a
    stack of patches, and all must be made for one model). Callers: ``engine.solve.compose`` and
    the CLI's ``compose``, before it loads the model."""
    if not patches:
        raise ForgetpackError("nothing to compose")
    for p in patches:
        where = f"{display_name(p)} (a patch for {p.model!r})"
        if p.components:
            raise ForgetpackError(f"{where}: is a stack of {len(p.components)} patches and records no forgetting recipe "
                                  "of its own; compose the patches it was stacked from")
        if not isinstance(p.recipe.get("forget"), list) or p.recipe.get("engine") is None:
            raise ForgetpackError(f"{where}: records no forgetting recipe, so there is nothing to solve again")
    first = patches[0]
    for p in patches[1:]:
        if p.model != first.model:
            raise ForgetpackError(f"{display_name(p)}: made for model {p.model!r}, but {display_name(first)} "
                                  f"for {first.model!r}: compose patches of one model")
    return [Recipe.from_json(p.recipe) for p in patches]


def _unique(names: Iterable[str]) -> list[str]:
    """Names in first-seen order, without repeats (compared normalised)."""
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(normalize_name(n), n)
    return list(out.values())


@dataclass(frozen=True)
class Recipe:
    """Everything needed to solve a patch again, as its metadata records it."""

    forget: list[str]
    preserve: list[str]
    preserve_mode: str
    preserve_added: list[str]  # names the adaptive round added to an automatic preserve set
    model_vocabulary: list[str]  # the model's own class names among the candidates
    extra_vocabulary: list[str]  # the request's extra candidate names
    solver: str
    target: str
    target_norm: str
    templates: list[str]
    weights: Weights | None  # the final weights, after any strengthening
    rank: int | None
    seed: int
    background: float
    projection: str
    engine: int | None = ENGINE_VERSION
    harden: list[str] = field(default_factory=list)  # bypass families it was hardened against (none: not hardened)

    def to_json(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "forget": list(self.forget),
            "preserve": list(self.preserve),
            "preserve_mode": self.preserve_mode,
            "preserve_added": list(self.preserve_added),
            "vocabulary": {"builtin": BUILTIN_VOCABULARY, "model": list(self.model_vocabulary), "extra": list(self.extra_vocabulary)},
            "solver": self.solver,
            "target": self.target,
            "target_norm": self.target_norm,
            "templates": list(self.templates),
            "weights": self.weights.to_json() if self.weights is not None else None,
            "rank": self.rank,
            "seed": self.seed,
            "background": self.background,
            "projection": self.projection,
            **({"harden": list(self.harden)} if self.harden else {}),  # absent when off: older patches read the same
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Recipe:
        """A recorded recipe; keys an older or hand-made recipe lacks take the defaults."""
        vocabulary = data.get("vocabulary") or {}
        weights = data.get("weights")
        return cls(
            forget=list(data["forget"]),
            preserve=list(data.get("preserve", [])),
            preserve_mode=data.get("preserve_mode", "explicit"),
            preserve_added=list(data.get("preserve_added", [])),
            model_vocabulary=list(vocabulary.get("model", [])),
            extra_vocabulary=list(vocabulary.get("extra", [])),
            solver=data.get("solver", DEFAULT_SOLVER),
            target=data.get("target", DEFAULT_TARGET),
            target_norm=data.get("target_norm", DEFAULT_TARGET_NORM),
            templates=list(data.get("templates", FORGET_TEMPLATES)),
            weights=Weights.from_json(weights) if weights is not None else None,
            rank=data.get("rank"),
            seed=data.get("seed", 0),
            background=data.get("background", DEFAULT_BACKGROUND),
            projection=data.get("projection", ""),
            engine=data.get("engine"),
            harden=list(data.get("harden", [])),
        )


@dataclass(frozen=True)
class NameEffect:
    """One forget name's text-space result."""

    self_similarity: float  # cosine of its patched to its original embedding, mean over templates
    outranked: bool  # another candidate ranks above it for its own original embedding, for every template
    predicted: dict[str, str]  # template -> the candidate its original embedding is now classified as


@dataclass(frozen=True)
class Effect:
    """The measured text-space effect of a patch on its candidates (see ``forgetpack.engine.measure``)."""

    forget: dict[str, NameEffect]
    retained: float  # share of the other candidates that keep their class, mean over templates
    retained_min: float  # the same, worst template
    vocabulary_retained: float  # share of the whole vocabulary (bare names) that keeps its class
    preserve_drift: float  # mean cosine drift of the preserve prompts
    candidates: int
    aliases: dict[str, list[str]] = field(default_factory=dict)  # forget name -> aliases (never preserved)
    dropped_preserve: list[str] = field(default_factory=list)  # explicit preserve names dropped as aliases
    # retained candidate -> the templates (the request's and held-out probes) under which it lost its class;
    # a verified solve repairs these, so the patch records any it could not
    lost: dict[str, list[str]] = field(default_factory=dict)
    # hardened patches: the last look through the bypass grid (per family: tried, recognised, bypasses)
    audit: dict[str, Any] = field(default_factory=dict)
    # measured, reported, not recorded in the patch:
    retained_by_template: dict[str, float] = field(default_factory=dict)

    @property
    def all_outranked(self) -> bool:
        return all(e.outranked for e in self.forget.values())

    def to_json(self) -> dict[str, Any]:
        """The effect as the patch metadata records it."""
        return {
            "forget": {
                f: {"self_similarity": e.self_similarity, "outranked": e.outranked, "predicted": dict(e.predicted)}
                for f, e in self.forget.items()
            },
            "preserve_drift": self.preserve_drift,
            "retained": self.retained,
            "retained_min": self.retained_min,
            "vocabulary_retained": self.vocabulary_retained,
            "candidates": self.candidates,
            "aliases": {f: list(a) for f, a in self.aliases.items()},
            "dropped_preserve": list(self.dropped_preserve),
            "lost": {c: list(t) for c, t in self.lost.items()},
            **({"audit": dict(self.audit)} if self.audit else {}),
        }

    def report(self) -> dict[str, Any]:
        """Everything measured, as JSON (``forgetpack forget --json`` prints it)."""
        return {**self.to_json(), "all_outranked": self.all_outranked,
                "retained_by_template": dict(self.retained_by_template)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Effect:
        return cls(
            forget={f: NameEffect(e["self_similarity"], e["outranked"], dict(e["predicted"])) for f, e in data["forget"].items()},
            retained=data["retained"],
            retained_min=data["retained_min"],
            vocabulary_retained=data["vocabulary_retained"],
            preserve_drift=data["preserve_drift"],
            candidates=data["candidates"],
            aliases={f: list(a) for f, a in data.get("aliases", {}).items()},
            dropped_preserve=list(data.get("dropped_preserve", [])),
            retained_by_template=dict(data.get("retained_by_template", {})),
            lost={c: list(t) for c, t in data.get("lost", {}).items()},
            audit=dict(data.get("audit", {})),
        )
