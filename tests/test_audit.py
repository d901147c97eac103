"""The audit: bypass families' generators, the model's own aliases, and the bypass grid on mini (text and images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from forgetpack import mini as mini_model
from forgetpack.cli import main
from forgetpack.engine import aliases
from forgetpack.engine.request import ForgetRequest
from forgetpack.engine.variants import FamilyContext, SurfaceFamily, SynonymFamily, generate, misspellings
from forgetpack.evaluation import audit as audit_module
from forgetpack.evaluation.audit import audit, retained_classes
from forgetpack.format.errors import ForgetpackError

ALIAS_CAP = 2000  # the first 2,000 whole-word tokens of MiniLM hold "7", "week" and "few"


# ---------------------------------------------------------------------------- generators


def distance(a: str, b: str) -> int:
    """Damerau-Levenshtein distance (Lowrance-Wagner: a transposed pair may be edited again)."""
    big = len(a) + len(b)
    d = [[big] * (len(b) + 2)] + [[big] + [0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i + 1][1] = i
    for j in range(len(b) + 1):
        d[1][j + 1] = j
    last_row: dict[str, int] = {}
    for i in range(1, len(a) + 1):
        last_col = 0
        for j in range(1, len(b) + 1):
            k, cost = last_row.get(b[j - 1], 0), int(a[i - 1] != b[j - 1])
            d[i + 1][j + 1] = min(d[i][j] + cost, d[i + 1][j] + 1, d[i][j + 1] + 1,
                                  d[k][last_col] + (i - k - 1) + 1 + (j - last_col - 1))
            last_col = j if not cost else last_col
        last_row[a[i - 1]] = i
    return d[len(a) + 1][len(b) + 1]


def test_surface_forms_hold_case_numerals_and_misspellings() -> None:
    labels = {v.label: v.kind for v in SurfaceFamily().variants("seven", FamilyContext())}
    assert labels["SEVEN"] == "case" and labels["Seven"] == "case"
    assert labels["7"] == "numeral" and labels["sevens"] == "number"
    assert "seven" not in labels  # the name itself is the templates family's
    distances = {distance("seven", w) for w, kind in labels.items() if kind == "misspelling"}
    assert distances == {1, 2}
    assert {v.template for v in SurfaceFamily().variants("seven", FamilyContext())} == set(FamilyContext().label_templates)


def test_synonyms_of_everyday_names_come_from_wordnet() -> None:
    """Other words for the same thing (WordNet synonyms and the kinds below it), never another known class:
    "ambulance" is a kind of car in WordNet, but it is a class of its own."""
    family = SynonymFamily()
    labels = {v.label: v.kind for v in family.variants("cat", FamilyContext())}
    assert {"kitty", "house cat", "tabby"} <= set(labels) and labels["kitty"] == "hyponym"
    assert {"automobile", "auto"} <= {v.label for v in family.variants("car", FamilyContext())}
    assert "fiddle" in {v.label for v in family.variants("violin", FamilyContext())}
    known = {n.lower() for n in mini_model.CLASS_NAMES}
    for name in ("car", "cat", "dog", "truck", "cup", "t-shirt"):
        assert not {v.label.lower() for v in family.variants(name, FamilyContext())} & known, name
    assert family.variants("seven", FamilyContext()) == []  # numbers are the lexicon's
    assert {v.template for v in family.variants("dog", FamilyContext())} == set(FamilyContext().label_templates)


def test_generators_are_deterministic_across_runs() -> None:
    """The edit-distance-2 sample is seeded by the name, never by Python's per-process hash seed."""
    code = ("from forgetpack.engine.variants import FamilyContext, generate;"
            "print([v.prompt for v in generate(['seven', 'tabby cat'], ['templates', 'surface', 'lexicon'], FamilyContext())])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2")}
    assert len(runs) == 1
    here = [v.prompt for v in generate(["seven", "tabby cat"], ["templates", "surface", "lexicon"], FamilyContext())]
    assert repr(here) == runs.pop().strip()
    assert misspellings("seven") == misspellings("seven")


def test_whole_word_tokens_of_each_tokenizer_kind() -> None:
    import open_clip

    clip_words = aliases.search_tokens(open_clip.get_tokenizer("ViT-B-32"))
    assert "seven" in clip_words and "7" in clip_words
    assert not any(w.endswith("</w>") or w != w.lower() for w in clip_words)

    class SentencePiece:
        all_special_tokens = ["<s>"]

        def get_vocab(self) -> dict[str, int]:
            return {"<s>": 0, "\u2581seven": 1, "en": 2, "\u2581sieben": 3, "\u2581!": 4}

    assert aliases.search_tokens(SentencePiece()) == ["seven", "sieben"]
    assert aliases.search_tokens(SentencePiece(), max_tokens=1) == ["seven"]
    with pytest.raises(ForgetpackError, match="at least 0"):
        aliases.search_tokens(SentencePiece(), max_tokens=-1)


# ---------------------------------------------------------------------------- mini


@pytest.fixture(scope="module")
def mini():
    from forgetpack.engine.models import load_model

    return load_model("mini")


@pytest.fixture(scope="module")
def patches(mini):
    """The default "seven" patch, and a weak one solved for the bare template only."""
    from forgetpack.engine.solve import forget

    return {"default": forget(mini, ["seven"]).patch, "weak": forget(mini, ForgetRequest(["seven"], templates=["{}"])).patch}


@pytest.fixture(scope="module")
def reports(mini, patches):
    return {k: audit(mini, [p], ["seven"], datasets=["mnist"], max_tokens=ALIAS_CAP) for k, p in patches.items()}


def test_the_model_s_own_aliases(mini) -> None:
    """The whole vocabulary (MiniLM's 23,502 whole-word tokens; ~40 s with an empty cache on 2 shared cores)."""
    found = aliases.find_aliases(mini, "seven", mini.vocabulary)
    assert found[:4] == ["7", "seventh", "sevens", "7th"]
    assert not {"seven", "SEVEN", "six", "eight"} & set(found)
    assert found == aliases.find_aliases(mini, "seven", mini.vocabulary)  # deterministic
    capped = aliases.find_aliases(mini, "seven", mini.vocabulary, max_tokens=ALIAS_CAP)
    assert capped and set(capped) < set(found)
    variants = aliases.AliasFamily().variants("seven", FamilyContext(loaded=mini, candidates=mini.vocabulary, max_tokens=ALIAS_CAP))
    assert [v.label for v in variants[:3]] == [capped[0]] * 3 and variants[0].family == "aliases"


def test_a_weak_patch_is_bypassed(reports) -> None:
    """Solved for the bare template only: on mini every template still forgets (MiniLM pools the word
    itself), but one of the model's own aliases ("number" on the shipped mini; "few" on the earlier one)
    still reaches "seven" in text space, and some other name on images."""
    weak = reports["weak"]
    templates = weak.text["templates"]
    assert templates["tried"] == templates["recognised"] >= 80 and templates["bypasses"] == 0
    assert weak.text["aliases"]["bypasses"] >= 1 and {o.variant.family for o in weak.bypasses} == {"aliases"}
    images = weak.image_summary()
    assert images["templates"]["counted"] == templates["tried"] and images["templates"]["worst"] == 0.0
    assert all(r.base >= audit_module.MIN_RECOGNISED for r in weak.images if r.counted)


def test_the_default_patch_has_fewer_bypasses(reports) -> None:
    weak, default = reports["weak"], reports["default"]
    assert len(default.bypasses) < len(weak.bypasses)
    worst = {k: max((r.patched for r in v.images if r.counted), default=0.0) for k, v in reports.items()}
    assert worst["default"] <= worst["weak"] < 0.5  # on images, neither lets a recognised variant bring sevens back
    assert default.text["templates"] == weak.text["templates"] and default.text["surface"]["recognised"] > 0


def test_image_side_probes_are_reported_as_untouched(reports) -> None:
    for report in reports.values():
        (probe,) = report.probes
        assert probe.dataset == "mnist" and probe.name == "seven" and probe.test_images == 100
        assert probe.unchanged and probe.nearest_neighbour >= 0.9 and probe.linear_probe >= 0.9
    assert reports["weak"].probes == reports["default"].probes  # a text patch cannot move them
    data = reports["weak"].to_json()
    assert data["probes"][0]["unchanged_by_patches"] and data["images"]["min_recognised"] == 0.5
    assert json.loads(json.dumps(data)) == data


def test_retained_classes_leave_out_forget_names_and_aliases(mini, patches) -> None:
    retained = retained_classes(mini, [patches["default"]], ["seven"], {})
    assert "seven" not in retained and {"six", "eight", "A"} <= set(retained)
    assert set(patches["default"].recipe["preserve"]) <= set(retained)


def test_held_out_probes_without_a_train_split() -> None:
    """An image folder is one split: leave-one-out 1-NN and a cross-validated probe."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], 10)
    X = np.eye(3)[y] * 5 + rng.normal(scale=0.1, size=(30, 3))
    nn, probe = audit_module._held_out_predictions(X / np.linalg.norm(X, axis=1, keepdims=True), y)
    assert (nn == y).all() and (probe == y).all()


def test_vision_patches_are_measured_and_other_targets_refused(mini) -> None:
    """A patch of the vision projection changes image embeddings (the probes say so); the text side
    is untouched, so every recognised template still reaches the name. Other targets are refused."""
    import torch

    from forgetpack.engine.projections import find_projection, projection_matrix
    from forgetpack.evaluation.datasets import LabeledImages, load_dataset
    from forgetpack.format.layer import Layer
    from forgetpack.format.patch import Patch

    proj = find_projection(mini.model, "image")
    W = projection_matrix(mini.model, proj)
    M = proj.feature_form(W)
    U = np.linalg.qr(np.random.default_rng(0).normal(size=(M.shape[1], 40)))[0]
    layer = Layer.lowrank(proj.target, *proj.storage_factors(-(M @ U), U.T))  # M (I - U Uᵀ)
    patch = Patch.create(mini.model_id, base={proj.target: W}, layers=[layer], layouts={proj.target: proj.layout})
    test = load_dataset("mnist", "test")
    keep = np.concatenate([np.flatnonzero(test.labels == c)[:10] for c in range(10)])
    small = LabeledImages("mnist-small", [test.images[i] for i in keep], test.labels[keep], test.classnames, test.templates)
    before = {k: v.clone() for k, v in mini.model.state_dict().items()}
    report = audit(mini, [patch], ["seven"], datasets=[small], families=["templates"])
    assert all(torch.equal(v, mini.model.state_dict()[k]) for k, v in before.items())  # patched on a copy
    assert report.text["templates"]["bypasses"] == report.text["templates"]["recognised"] >= 80
    (probe,) = report.probes
    assert not probe.unchanged and probe.test_images == 10  # leave-one-out: an image folder-like set has one split

    scale = Patch.create(mini.model_id, base={"logit_scale": np.zeros((1, 1), np.float32)},
                         layers=[Layer.lowrank("logit_scale", np.ones((1, 1)), np.ones((1, 1)))])
    with pytest.raises(ForgetpackError, match="changes 'logit_scale'"):
        audit(mini, [scale], ["seven"], families=["templates"])


# ---------------------------------------------------------------------------- the command


def run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_audit_json_and_bad_input(tmp_path, capsys, patches) -> None:
    path = tmp_path / "seven.fpatch"
    patches["default"].save(path)
    lexicon = tmp_path / "mine.tsv"
    lexicon.write_text("# my variants\nseven\tsiebn\tsept\n", encoding="utf-8")
    code, out, err = run(["audit", "mini", "--patch", str(path), "--forget", "seven", "--family", "surface,lexicon",
                          "--variants", str(lexicon), "--json"], capsys)
    assert code == 0, err
    report = json.loads(out)
    assert report["families"] == ["surface", "lexicon"] and report["forget"] == ["seven"]
    assert set(report["text"]["summary"]) == {"surface", "lexicon"}
    assert report["text"]["summary"]["lexicon"]["tried"] >= 6  # the file's two variants in three phrasings
    assert report["probes"] == [] and report["datasets"] == []

    bad = tmp_path / "bad.tsv"
    bad.write_text("seven sieben\n", encoding="utf-8")
    for args, message in (
        (["--variants", str(bad)], "line 1 is not 'name<TAB>variant'"),
        (["--variants", str(tmp_path / "missing.tsv")], "variants file not found"),
        (["--family", "nonsense"], "unknown variant family 'nonsense'"),
        (["--forget", "six"], "the patches do not forget 'six'"),
        (["--dataset", "letters"], "class 'seven' is not in any evaluated dataset"),
    ):
        forget = [] if "--forget" in args else ["--forget", "seven"]
        code, out, err = run(["audit", "mini", "--patch", str(path), *forget, *args], capsys)
        assert code == 1 and out == ""
        assert len(err.strip().splitlines()) == 1 and message in err, err
