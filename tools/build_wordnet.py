#!/usr/bin/env python
"""Write ``forgetpack/engine/data/wordnet.tsv``: WordNet's other names for the classes forgetpack knows.

The ``synonyms`` variant family (``forgetpack.engine.variants.SynonymFamily``) reads the file at run
time, so users need no WordNet install: this tool builds it once from Debian's ``wordnet-base``
(WordNet 3.0, Princeton's WordNet licence; NOTICE), fetched with ``apt-get download`` when
``--wordnet DIR`` is not given.

For each class name (mini's declared classes and the built-in vocabulary's ImageNet names) that is
a WordNet noun, its most frequent sense gives:

- ``synonym``: the other words of that synset ("cat" -> "true cat"; "car" -> "auto", "automobile");
- ``hyponym``: the words of the synsets below it, two levels deep ("cat" -> "house cat",
  "kitty", "tabby"; "dog" -> "puppy", "pooch"), at most ``MAX_HYPONYMS``, nearest level first.

Words that are themselves class names are left out.

A line is ``name<TAB>kind<TAB>variant<TAB>variant...``.

    python tools/build_wordnet.py                       # fetches wordnet-base
    python tools/build_wordnet.py --wordnet /usr/share/wordnet
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from forgetpack import mini
from forgetpack.engine.variants import WORDNET_FILE
from forgetpack.engine.vocabulary import builtin_vocabulary

MAX_HYPONYMS = 40
HEADER = (
    "# Other names for forgetpack's classes from WordNet 3.0 (Princeton University; WordNet licence, see NOTICE),\n"
    "# written by tools/build_wordnet.py. name<TAB>kind<TAB>variant...; kinds: synonym, hyponym.\n"
)


def read_nouns(root: Path) -> tuple[dict[str, list[str]], dict[str, tuple[list[str], list[str]]]]:
    """``index``: lemma -> synset offsets (most frequent sense first); ``synsets``: offset -> (words, hyponym offsets)."""
    index: dict[str, list[str]] = {}
    for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        parts = line.split()
        n_senses, n_pointers = int(parts[2]), int(parts[3])
        index[parts[0]] = parts[6 + n_pointers : 6 + n_pointers + n_senses]
    synsets: dict[str, tuple[list[str], list[str]]] = {}
    for line in (root / "data.noun").read_text(encoding="latin-1").splitlines():
        if line.startswith(" "):
            continue
        parts = line.split(" | ")[0].split()
        n_words = int(parts[3], 16)
        words = [parts[4 + 2 * i] for i in range(n_words)]
        at = 4 + 2 * n_words
        n_pointers = int(parts[at])
        pointers = [parts[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(n_pointers)]
        hyponyms = [p[1] for p in pointers if p[0] in ("~", "~i") and p[2] == "n"]
        synsets[parts[0]] = (words, hyponyms)
    return index, synsets


def readable(word: str) -> str:
    """WordNet's ``house_cat(a)`` as ``house cat``."""
    return word.split("(")[0].replace("_", " ")


def variants_of(name: str, index: dict, synsets: dict, known: set[str]) -> dict[str, list[str]]:
    """Synonyms and hyponyms of ``name``'s first sense, less any word that is itself a ``known``
    class name (an "ambulance" is a kind of "car", but it is its own class, not another name for cars)."""
    senses = index.get(name.lower().replace(" ", "_").replace("-", "_")) or index.get(name.lower().replace(" ", ""))
    if not senses:
        return {}
    words, hyponyms = synsets[senses[0]]
    seen = {name.lower(), *known}

    def fresh(ws: list[str]) -> list[str]:
        out = []
        for w in map(readable, ws):
            if w.lower() not in seen:
                seen.add(w.lower())
                out.append(w)
        return out

    synonyms = fresh(words)
    below: list[str] = []
    level = hyponyms
    for _ in range(2):
        below += fresh([w for offset in level for w in synsets[offset][0]])
        level = [h for offset in level for h in synsets[offset][1]]
    return {k: v for k, v in (("synonym", synonyms), ("hyponym", below[:MAX_HYPONYMS])) if v}


def wordnet_root(given: Path | None, tmp: str) -> Path:
    if given is not None:
        return given
    subprocess.run(["apt-get", "download", "wordnet-base"], cwd=tmp, check=True)
    deb = next(Path(tmp).glob("wordnet-base_*.deb"))
    subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
    return Path(tmp) / "usr/share/wordnet"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, help="folder with WordNet's index.noun and data.noun")
    parser.add_argument("--out", type=Path, default=WORDNET_FILE)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        index, synsets = read_nouns(wordnet_root(args.wordnet, tmp))
    names = list(dict.fromkeys([*mini.CLASS_NAMES, *builtin_vocabulary()]))
    known = {n.lower() for n in names}
    lines = []
    for name in names:
        if len(name) <= 1 or name in mini.DIGIT_NAMES:  # letters and digits: the lexicon's business
            continue
        for kind, words in variants_of(name, index, synsets, known).items():
            lines.append("\t".join([name, kind, *words]))
    args.out.write_text(HEADER + "\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(lines)} lines for {len({line.split(chr(9))[0] for line in lines})} names")


if __name__ == "__main__":
    main()
