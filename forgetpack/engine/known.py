"""Is a forget name one the model knows? The one rule, checked before anything is solved.

A patch for a name the model does not know (a typo, "sevn"; a person mini never saw, "Obama")
verifies in text space, since that name's own prompts do move, and yet forgets no class. So
:func:`check_known` holds every forget name against the names the model is known to classify:

- the classes it declares (``LoadedModel.vocabulary``: ``mini``'s digits, letters, Fashion-MNIST
  and QuickDraw names); a model that declares none (an open_clip model) is checked against the
  built-in vocabulary (``forgetpack.engine.vocabulary``, the 1,000 ImageNet names); either way
  with the request's own extra vocabulary, which the user declared;
- a name is *known* if it equals one of those (compared by ``normalize_name``) or is an alias of
  one: a centred cosine of at least ``preserve.ALIAS_THRESHOLD`` in the model's own text space,
  the measure the preserve set uses ("7" for "seven" on mini: 0.90; "sevens" 0.84 is not);
- for a name that is not, the verdict gives its nearest known names in that space and, since a
  typo and its word rarely sit near each other in a tokenizer's space ("sevn" is nearest "van"
  on mini), the known names nearest in spelling (``difflib``) for the "did you mean" hint.

Features come from the engine's cache: the forget and vocabulary names are the ones ``forget``
encodes bare anyway, so the check costs one matrix product. Callers: ``engine.solve.forget``
(and so ``compose``, which solves its recipes' union through it); the CLI's ``forget`` and
``compose`` turn the refusal into one line, and ``--allow-unknown`` into ``allow_unknown``.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from forgetpack.engine.preserve import ALIAS_THRESHOLD, unit_rows
from forgetpack.engine.vocabulary import builtin_vocabulary
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.names import normalize_name

NEAREST = 3  # nearest known names shown per unknown name
SPELLING_CUTOFF = 0.6  # difflib's default similarity for a close spelling

Features = Callable[[Sequence[str]], np.ndarray]  # names -> bare pre-projection features


@dataclass(frozen=True)
class UnknownName:
    """A forget name the model does not know, and what it may have meant."""

    name: str
    nearest: tuple[tuple[str, float], ...]  # nearest known names in text space (centred cosine), nearest first
    spelled_like: tuple[str, ...]  # known names close in spelling, closest first

    def describe(self, model: str) -> str:
        near = ", ".join(f"{n} ({s:.2f})" for n, s in self.nearest)
        hint = f"; did you mean {self.spelled_like[0]!r}?" if self.spelled_like else ""
        return f"{self.name!r} is not a class {model} recognises; nearest in its text space: {near}{hint}"


@dataclass(frozen=True)
class Recognition:
    """The verdict on a request's forget names: what was checked, which names it did not know."""

    model: str
    checked: str  # what the names were checked against, in words
    unknown: tuple[UnknownName, ...] = ()
    aliases: tuple[tuple[str, str, float], ...] = ()  # (forget name, the known name it is an alias of, cosine)

    @property
    def ok(self) -> bool:
        return not self.unknown

    def message(self) -> str:
        """One line: each unknown name with its nearest names, what was checked, and the way out."""
        names = "; ".join(u.describe(self.model) for u in self.unknown)
        them = "it" if len(self.unknown) == 1 else "them"
        return f"{names}; checked {self.checked}; pass --allow-unknown to forget {them} anyway"

    def to_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "unknown": [{"name": u.name, "nearest": [list(p) for p in u.nearest], "spelled_like": list(u.spelled_like)}
                        for u in self.unknown],
            "aliases": [list(a) for a in self.aliases],
        }


def known_names(loaded: Any, extra: Sequence[str] = ()) -> tuple[list[str], str]:
    """The names a model is known to classify, and how to say what they are."""
    declared = list(getattr(loaded, "vocabulary", ()) or ())
    names = declared or list(builtin_vocabulary())
    what = (f"{loaded.model_id}'s {len(names):,} declared classes" if declared
            else f"the built-in vocabulary's {len(names):,} ImageNet names")
    if extra:
        names, what = [*names, *extra], f"{what} and the request's {len(extra):,} vocabulary names"
    out: dict[str, str] = {}
    for n in names:
        out.setdefault(normalize_name(n), n)
    return list(out.values()), f"{what}, and their aliases" + ("" if declared else f" ({loaded.model_id} declares no classes)")


def check_known(loaded: Any, forget: Sequence[str], *, extra: Sequence[str] = (), allow_unknown: bool = False,
                features: Features | None = None) -> Recognition:
    """The verdict on ``forget``; raises a one-line ``ForgetpackError`` naming each unknown name
    unless ``allow_unknown``. ``features`` gives bare pre-projection features (default: the
    engine's cached ``text_features``); it is called only when some name is not a known name itself."""
    known, checked = known_names(loaded, extra)
    keys = {normalize_name(n) for n in known}
    rest = [n for n in forget if normalize_name(n) not in keys]
    if not rest:
        return Recognition(loaded.model_id, checked)
    if features is None:
        from forgetpack.engine.features import text_features

        def features(names: Sequence[str]) -> np.ndarray:
            return text_features(loaded, names)

    K = np.asarray(features(known), dtype=np.float64)
    center = K.mean(axis=0)
    sims = unit_rows(np.asarray(features(rest), dtype=np.float64) - center) @ unit_rows(K - center).T
    by_key: dict[str, str] = {}
    for n in known:
        by_key.setdefault(n.casefold(), n)
    unknown, aliases = [], []
    for name, row in zip(rest, sims, strict=True):
        order = np.argsort(-row, kind="stable")
        best = int(order[0])
        if row[best] >= ALIAS_THRESHOLD:
            aliases.append((name, known[best], round(float(row[best]), 4)))
            continue
        nearest = tuple((known[j], round(float(row[j]), 4)) for j in order[:NEAREST])
        spelled = difflib.get_close_matches(name.casefold(), list(by_key), n=NEAREST, cutoff=SPELLING_CUTOFF)
        unknown.append(UnknownName(name, nearest, tuple(by_key[s] for s in spelled)))
    verdict = Recognition(loaded.model_id, checked, tuple(unknown), tuple(aliases))
    if unknown and not allow_unknown:
        raise ForgetpackError(verdict.message())
    return verdict
