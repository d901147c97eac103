"""Other ways to ask for a forgotten class: the bypass families that audits and hardening try.

A patch is solved for the names and templates a user gave. Someone who wants the class back
types something else: another phrasing ("a sculpture of a {}."), another spelling ("Sevn",
"SEVEN", "sevens"), another notation ("7", "VII") or another language ("sieben"). Each family
here is a deterministic generator of such :class:`Variant` s for a forget name, so an audit is
reproducible and hardening can put exactly these prompts into the solve.

Families register like solvers, through the ``forgetpack.variant_families`` entry points
(``name = "module:Class"``, a class with ``name`` and ``variants(name, context)``); the built-in
ones are ``templates``, ``surface``, ``lexicon``, ``synonyms`` and, needing the model, ``aliases``
(``forgetpack.engine.aliases``). Generating text needs no torch.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from forgetpack.format import registry
from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_input_file
from forgetpack.format.names import FORGET_TEMPLATES, normalize_name

GROUP = "forgetpack.variant_families"
DATA = Path(__file__).resolve().parent / "data"
# open_clip's 80 ImageNet templates (open_clip.zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES),
# copied so that generating them does not import open_clip
IMAGENET_TEMPLATES_FILE = DATA / "openai_imagenet_templates.txt"
LEXICON_FILE = DATA / "lexicon.tsv"
WORDNET_FILE = DATA / "wordnet.tsv"  # WordNet 3.0's synonyms and hyponyms of known classes (tools/build_wordnet.py)
LABEL_TEMPLATES = ("{}", "a photo of a {}.", "a photo of the {}.")  # how label variants are phrased
MAX_EDIT2 = 24  # edit-distance-2 misspellings per name (a seeded sample: all of them would be thousands)
MAX_PER_FAMILY = 400  # variants per name and family, at most

KEYBOARD = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
                "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")


@dataclass(frozen=True)
class Variant:
    """One way to ask for ``name``: the prompt ``template.format(label)``."""

    family: str
    name: str  # the forget name it stands for
    label: str  # what a user would type instead of the name
    template: str  # the phrasing, with '{}' for the label
    kind: str = ""  # within the family: "case", "misspelling", "de", ...

    @property
    def prompt(self) -> str:
        return self.template.format(self.label)

    @property
    def stand_in(self) -> str:
        """The forget name in the variant's template: text space's stand-in for the class's images."""
        return self.template.format(self.name)

    def to_json(self) -> dict[str, str]:
        return {"family": self.family, "name": self.name, "label": self.label, "template": self.template, "kind": self.kind}


@dataclass(frozen=True)
class FamilyContext:
    """What a family may use besides the name: templates, extra lexicon entries, the model."""

    label_templates: tuple[str, ...] = LABEL_TEMPLATES
    lexicon: dict[str, tuple[str, ...]] = field(default_factory=dict)  # normalised name -> variants
    loaded: Any = None  # a LoadedModel, for families that search the model itself
    candidates: tuple[str, ...] = ()  # the classes a variant competes with
    max_tokens: int | None = None  # the aliases family: vocabulary tokens searched, in vocabulary order (None: all)


class Family(Protocol):
    name: str
    needs_model: bool

    def variants(self, name: str, context: FamilyContext) -> list[Variant]: ...


# ---------------------------------------------------------------------------- the built-in families


class TemplateFamily:
    """The name itself in open_clip's 80 ImageNet templates, the engine's own and the model's
    (``LoadedModel.templates``, when the context has the model)."""

    name = "templates"
    needs_model = False

    def variants(self, name: str, context: FamilyContext) -> list[Variant]:
        templates = dict.fromkeys([*imagenet_templates(), *FORGET_TEMPLATES, *getattr(context.loaded, "templates", ())])
        return [Variant(self.name, name, name, t, _template_kind(t)) for t in templates]


def _template_kind(template: str) -> str:
    return "imagenet" if template in imagenet_templates() else "engine" if template in FORGET_TEMPLATES else "model"


class SurfaceFamily:
    """Case, plural and singular, punctuation and spacing, misspellings, numerals and number words."""

    name = "surface"
    needs_model = False

    def variants(self, name: str, context: FamilyContext) -> list[Variant]:
        labels: dict[str, str] = {}
        for kind, forms in (("case", case_forms(name)), ("number", plural_forms(name)),
                            ("punctuation", punctuation_forms(name)), ("numeral", numeral_forms(name)),
                            ("misspelling", misspellings(name))):
            for form in forms:
                if form != name and form.strip():
                    labels.setdefault(form, kind)
        return _phrase(self.name, name, labels, context)


class LexiconFamily:
    """Other languages, notations and synonyms: the shipped lexicon plus the user's ``--variants`` file."""

    name = "lexicon"
    needs_model = False

    def variants(self, name: str, context: FamilyContext) -> list[Variant]:
        key = normalize_name(name)
        entries = [*builtin_lexicon().get(key, ()), *context.lexicon.get(key, ())]
        labels = {v: "lexicon" for v in entries if v != name}
        return _phrase(self.name, name, labels, context)


class SynonymFamily:
    """Other words for the same thing, from WordNet 3.0: the name's synonyms ("car" -> "automobile")
    and the kinds below it ("cat" -> "kitty", "tabby"; "dog" -> "puppy"), shipped as a table
    (``WORDNET_FILE``) for mini's classes and the built-in vocabulary, so nothing is installed at run time."""

    name = "synonyms"
    needs_model = False

    def variants(self, name: str, context: FamilyContext) -> list[Variant]:
        labels: dict[str, str] = {}
        for kind, words in wordnet_table().get(normalize_name(name), {}).items():
            for word in words:
                if word != name:
                    labels.setdefault(word, kind)
        return _phrase(self.name, name, labels, context)


@functools.lru_cache(maxsize=1)
def wordnet_table() -> dict[str, dict[str, tuple[str, ...]]]:
    """``WORDNET_FILE`` as normalised name -> kind -> words."""
    out: dict[str, dict[str, tuple[str, ...]]] = {}
    for line in WORDNET_FILE.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, kind, *words = line.split("\t")
            out.setdefault(normalize_name(name), {})[kind] = tuple(words)
    return out


def _phrase(family: str, name: str, labels: dict[str, str], context: FamilyContext) -> list[Variant]:
    out = [Variant(family, name, label, t, kind) for label, kind in labels.items() for t in context.label_templates]
    return out[: MAX_PER_FAMILY]


# ---------------------------------------------------------------------------- generators


@functools.lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    return tuple(line for line in IMAGENET_TEMPLATES_FILE.read_text(encoding="utf-8").splitlines() if line)


def case_forms(name: str) -> list[str]:
    return list(dict.fromkeys([name.lower(), name.upper(), name.title(), name.capitalize(), name.swapcase()]))


def plural_forms(name: str) -> list[str]:
    """Naive English plural and singular of the last word (what a user types, right or wrong)."""
    head, _, last = name.rpartition(" ")
    join = (lambda w: f"{head} {w}" if head else w)  # noqa: E731
    forms = [join(last + "s"), join(last + "es")]
    if last.endswith("y") and len(last) > 1:
        forms.append(join(last[:-1] + "ies"))
    if last.endswith("s") and len(last) > 1:
        forms.append(join(last[:-1]))
    return forms


def punctuation_forms(name: str) -> list[str]:
    forms = [f"{name}.", f"{name}!", f"{name}?", f"{name},", f'"{name}"', f"'{name}'", f"({name})", f" {name} ", f"{name}s'"]
    if " " in name:
        forms += [name.replace(" ", "-"), name.replace(" ", ""), name.replace(" ", "_"), "  ".join(name.split())]
    return forms


def numeral_forms(name: str) -> list[str]:
    """Numerals for number words and number words for numerals ("seven" <-> "7")."""
    key = normalize_name(name)
    if key in NUMBER_WORDS:
        n = NUMBER_WORDS.index(key)
        return [str(n), f"#{n}", f"no. {n}", f"number {n}", f"the number {key}"]
    if key.isdigit() and int(key) < len(NUMBER_WORDS):
        return [NUMBER_WORDS[int(key)]]
    return []


def _neighbours(char: str) -> str:
    for row in KEYBOARD:
        i = row.find(char.lower())
        if i >= 0:
            return row[max(i - 1, 0) : i] + row[i + 1 : i + 2]
    return ""


def edits(word: str) -> list[str]:
    """Every edit-distance-1 spelling with keyboard-neighbour substitutions and insertions."""
    out = []
    for i in range(len(word)):
        out.append(word[:i] + word[i + 1 :])  # deletion
        if i + 1 < len(word):
            out.append(word[:i] + word[i + 1] + word[i] + word[i + 2 :])  # transposition
        for c in _neighbours(word[i]):
            out.append(word[:i] + c + word[i + 1 :])  # substitution by a neighbouring key
            out.append(word[:i] + c + word[i:])  # insertion of a neighbouring key
    out.append(word + word[-1:])  # a doubled last letter
    return [w for w in dict.fromkeys(out) if w and w != word]


def misspellings(name: str) -> list[str]:
    """Edit distance 1 (all) and 2 (a seeded sample of ``MAX_EDIT2``) of a name of letters."""
    if len(name) < 3 or not re.search(r"[a-zA-Z]", name):
        return []
    first = edits(name)
    second = sorted({w for e in first for w in edits(e)} - set(first) - {name})
    rng = random.Random(f"forgetpack.variants.{name}")
    return first + rng.sample(second, min(MAX_EDIT2, len(second)))


@functools.lru_cache(maxsize=1)
def builtin_lexicon() -> dict[str, tuple[str, ...]]:
    return read_lexicon(LEXICON_FILE)


def read_lexicon(path: str | Path) -> dict[str, tuple[str, ...]]:
    """``name<TAB>variant[<TAB>variant…]`` lines (UTF-8; blank lines and '#' comments skipped)."""
    path = check_input_file(path, "variants file")  # a FIFO or device would block the read
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ForgetpackError(f"{path}: cannot read the variants file ({exc})") from None
    out: dict[str, list[str]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = [p.strip() for p in line.split("\t")]
        if len(parts) < 2 or not parts[0] or not all(parts[1:]):
            raise ForgetpackError(f"{path}: line {number} is not 'name<TAB>variant'")
        out.setdefault(normalize_name(parts[0]), []).extend(parts[1:])
    return {k: tuple(dict.fromkeys(v)) for k, v in out.items()}


# ---------------------------------------------------------------------------- the registry


def available_families() -> dict[str, str]:
    """Family name -> where it comes from (entry points of ``forgetpack.variant_families``)."""
    return {name: ep.value for name, ep in registry.installed(GROUP, rescan=True).items()}


def get_family(name: str) -> Family:
    return registry.load(GROUP, name, "variant family")()  # type: ignore[operator]


def generate(names: Sequence[str], families: Iterable[str], context: FamilyContext) -> list[Variant]:
    """Every variant of every name from the named families, in a fixed order, each prompt once per name."""
    out: dict[tuple[str, str], Variant] = {}
    for family in families:
        generator = get_family(family)
        if generator.needs_model and context.loaded is None:
            raise ForgetpackError(f"variant family {family!r} needs the model")
        for name in names:
            for v in generator.variants(name, context):
                out.setdefault((name, v.prompt), v)
    return list(out.values())
