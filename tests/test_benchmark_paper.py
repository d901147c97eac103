"""``forgetpack benchmark paper``: the paper's protocol on fake dataset roots in every layout, on
random-init RN50 and ViT-B-16 and on mini, and its S against a hand-computed case."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from forgetpack.cli.main import main
from forgetpack.evaluation import paper_datasets as pd
from forgetpack.evaluation.metrics import DatasetResult
from forgetpack.evaluation.paper import requests_of, score_request

PER_CLASS = 2  # images per class: random-init towers on CPU are slow, and the protocol, not the accuracy, is under test
OTHERS = {  # a few real classes beside each dataset's forget classes
    "dogs": ("Chihuahua", "golden retriever"),
    "cars": ("2012 Tesla Model S", "2007 Volvo XC90 SUV"),
    "caltech101": ("face", "sunflower"),
    "flowers": ("pink primrose", "sunflower"),
}


# ----------------------------------------------------------------------------- fake dataset roots


def _images(folder: Path, names: list[str], seed: int) -> None:
    """Tiny JPEGs, one colour per image (so their embeddings differ)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = np.clip(rng.integers(0, 256, 3) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / name, quality=90)


def _classes(key: str) -> list[str]:
    return [*pd.find_paper_dataset(key).forget, *OTHERS[key]]


def dogs_official(root: Path, with_split: bool = True) -> None:
    folder = root / "stanford_dogs"
    wnids = {"Pekinese": "n02086079", "toy poodle": "n02113624", "Scotch terrier": "n02097298",
             "Chihuahua": "n02085620", "golden retriever": "n02099601"}  # fmt: skip
    listed = []
    for i, name in enumerate(_classes("dogs")):
        breed = f"{wnids[name]}-{name.replace(' ', '_')}"
        files = [f"{wnids[name]}_{k}.jpg" for k in range(PER_CLASS + 1)]
        _images(folder / "Images" / breed, files, seed=i)
        listed += [f"{breed}/{f}" for f in files[:PER_CLASS]]  # the last image of each breed is a training image
    if with_split:
        cells = np.empty((len(listed), 1), dtype=object)
        for k, path in enumerate(listed):
            cells[k, 0] = np.array([path])
        scipy.io.savemat(folder / "test_list.mat", {"file_list": cells})


def _coop(folder: Path, images_dir: str, split_file: str, names: list[str], path_of) -> None:
    entries = []
    for label, name in enumerate(names):
        rel = [path_of(label, name, k) for k in range(PER_CLASS)]
        for r in rel:
            _images((folder / images_dir / r).parent, [Path(r).name], seed=100 + label)
        entries += [[r, label, name] for r in rel]
    (folder / split_file).write_text(json.dumps({"train": [], "val": [], "test": entries}))


def cars_coop(root: Path) -> None:
    _coop(root / "stanford_cars", "", "split_zhou_StanfordCars.json", _classes("cars"),
          lambda label, name, k: f"cars_test/{label * PER_CLASS + k + 1:05d}.jpg")


def cars_official(root: Path) -> None:
    folder = root / "stanford_cars"
    names = [" ".join([*n.split()[1:], n.split()[0]]) for n in _classes("cars")]  # the year last, as Stanford writes it
    meta = np.empty((1, len(names)), dtype=object)
    for i, n in enumerate(names):
        meta[0, i] = np.array([n])
    (folder / "devkit").mkdir(parents=True)
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": meta})
    annos = np.zeros((1, len(names) * PER_CLASS), dtype=[("fname", object), ("class", object)])
    for k in range(len(names) * PER_CLASS):
        annos[0, k] = (np.array([f"{k + 1:05d}.jpg"]), np.array([[k // PER_CLASS + 1]], dtype=np.uint8))
    scipy.io.savemat(folder / "cars_test_annos_withlabels.mat", {"annotations": annos})
    _images(folder / "cars_test", [f"{k + 1:05d}.jpg" for k in range(len(names) * PER_CLASS)], seed=7)


def caltech_coop(root: Path) -> None:
    folder = {"face": "Faces"}
    _coop(root / "caltech-101", "101_ObjectCategories", "split_zhou_Caltech101.json", _classes("caltech101"),
          lambda label, name, k: f"{folder.get(name, name)}/image_{k + 1:04d}.jpg")


def caltech_official(root: Path) -> None:
    base = root / "caltech101" / "101_ObjectCategories"
    for i, c in enumerate(["euphonium", "minaret", "platypus", "Faces", "Faces_easy", "BACKGROUND_Google", "stop_sign"]):
        _images(base / c, [f"image_{k + 1:04d}.jpg" for k in range(PER_CLASS)], seed=200 + i)


def flowers_official(root: Path) -> None:
    folder = root / "flowers-102"
    labels = [pd.FLOWER_NAMES.index(n) + 1 for n in _classes("flowers")]
    all_labels = [lab for lab in labels for _ in range(PER_CLASS + 1)]  # one training image per class
    _images(folder / "jpg", [f"image_{i + 1:05d}.jpg" for i in range(len(all_labels))], seed=300)
    test = [i + 1 for i in range(len(all_labels)) if i % (PER_CLASS + 1) != PER_CLASS]
    scipy.io.savemat(folder / "imagelabels.mat", {"labels": np.array([all_labels], dtype=np.uint8)})
    scipy.io.savemat(folder / "setid.mat", {"tstid": np.array([test], dtype=np.uint16),
                                            "trnid": np.array([[3, 6]], dtype=np.uint16)})  # fmt: skip


def flowers_coop(root: Path) -> None:
    _coop(root / "oxford_flowers", "jpg", "split_zhou_OxfordFlowers.json", _classes("flowers"),
          lambda label, name, k: f"image_{label * PER_CLASS + k + 1:05d}.jpg")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """The four datasets: Dogs in the official layout, the others in CoOp's (the other layouts are read
    below; Flowers' official layout names all 102 classes, which costs the random-init runs time)."""
    root = tmp_path_factory.mktemp("paper-data")
    dogs_official(root)
    cars_coop(root)
    caltech_coop(root)
    flowers_coop(root)
    return root


# ----------------------------------------------------------------------------- readers


def test_every_layout_reads_the_real_class_names(tmp_path, data_root):
    sets = {s.name: s for s in pd.load_paper_datasets(data_root)}
    assert list(sets) == ["StanfordDogs", "StanfordCars", "Caltech101", "OxfordFlowers"]
    for key, s in zip(pd.PAPER_KEYS, sets.values(), strict=True):
        assert set(_classes(key)) <= set(s.data.classnames), key
        assert len(s.data) == PER_CLASS * len(_classes(key)), key  # test split only
        assert s.forget == pd.find_paper_dataset(key).forget
    assert sets["OxfordFlowers"].data.templates == ("a photo of a {}, a type of flower.",)
    assert "split_zhou_OxfordFlowers.json" in sets["OxfordFlowers"].source
    assert sets["StanfordDogs"].data.classnames[:2] == ["Chihuahua", "Pekinese"]  # wnid order, breed names cleaned
    image = sets["Caltech101"].data.images[0]
    assert image.mode == "RGB" and image.size == (24, 24)

    other = tmp_path / "other"
    cars_official(other)
    caltech_official(other)
    flowers_official(other)
    dogs_official(other, with_split=False)
    read = {s.name: s for s in pd.load_paper_datasets(other)}
    assert read["StanfordCars"].data.classnames == _classes("cars")  # year moved first, as CoOp names them
    assert read["Caltech101"].data.classnames == ["face", "euphonium", "minaret", "platypus", "stop sign"]
    assert len(read["StanfordDogs"].data) == (PER_CLASS + 1) * 5  # no test_list.mat: every image
    flowers = read["OxfordFlowers"].data
    assert flowers.classnames == list(pd.FLOWER_NAMES) and len(flowers) == PER_CLASS * 5  # setid.mat's test ids only
    assert [flowers.classnames[i] for i in flowers.labels[::PER_CLASS]] == _classes("flowers")


@pytest.mark.parametrize("breakage, message", [
    (lambda root: None, "no StanfordDogs folder (expected {root}/stanford_dogs/ with Images/"),
    (lambda root: (root / "stanford_dogs").mkdir(), "stanford_dogs/Images: folder not found (expected Images/"),
    (lambda root: (root / "stanford_dogs" / "Images" / "n1-Pekinese").mkdir(parents=True) or
     (root / "stanford_dogs" / "test_list.mat").write_bytes(b"not a mat file"), "test_list.mat: cannot read the MATLAB file"),
    (lambda root: (root / "stanford_cars").mkdir() or
     (root / "stanford_cars" / "split_zhou_StanfordCars.json").write_text('{"train": []}'), "not a CoOp split file"),
])  # fmt: skip
def test_missing_folder_or_bad_layout_is_one_line(tmp_path, capsys, breakage, message):
    breakage(tmp_path)
    keys = "cars" if "CoOp" in message else "dogs"
    code = main(["benchmark", "paper", "--model", "RN50:none", "--data-root", str(tmp_path), "--datasets", keys])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err
    assert message.format(root=tmp_path) in err


def test_bad_options_fail_before_any_model_loads(tmp_path, capsys, data_root):
    for args, message in (
        (["--model", "RN50:none"], "--data-root is required"),
        (["--model", "RN50:none", "--data-root", str(tmp_path / "nope")], "data root not found"),
        (["--model", "RN50:none", "--data-root", str(data_root), "--datasets", "imagenet"], "unknown dataset 'imagenet'"),
        (["--model", "mini", "--datasets", "dogs"], "unknown mini dataset 'dogs'"),
        (["--model", "mini", "--solver", "magic"], "unknown solver 'magic'"),
    ):
        assert main(["benchmark", "paper", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


# ----------------------------------------------------------------------------- the score


def _result(name, classes, labels, predictions):
    return DatasetResult(name, classes, np.array(labels), np.array(predictions))


def test_score_is_the_papers_five_terms_by_hand():
    """Forget set: 4 images of "a" (class 0), 4 retained. Base: forget 4/4, retained 3/4; patched:
    forget 1/4, retained 2/4. Other sets: 4/5 -> 2/5, 2/2 -> 2/2, 3/4 -> 4/4 (a gain counts 0)."""
    classes = ["a", "b", "c"]
    base = {"D": _result("D", classes, [0, 0, 0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 1, 1, 2, 0]),
            "O1": _result("O1", ["x", "y"], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]),
            "O2": _result("O2", ["x", "y"], [0, 1], [0, 1]),
            "O3": _result("O3", ["x", "y"], [0, 0, 1, 1], [0, 0, 1, 0])}  # fmt: skip
    patched = {"D": _result("D", classes, [0, 0, 0, 0, 1, 1, 2, 2], [0, 1, 2, 2, 1, 2, 2, 0]),
               "O1": _result("O1", ["x", "y"], [0, 0, 0, 1, 1], [0, 1, 1, 1, 0]),
               "O2": _result("O2", ["x", "y"], [0, 1], [0, 1]),
               "O3": _result("O3", ["x", "y"], [0, 0, 1, 1], [0, 0, 1, 1])}  # fmt: skip
    score = score_request(base, patched, "D", ["a"])
    by_hand = (0.25 / 1.0 + (0.75 - 0.5) / 0.75 + (0.8 - 0.4) / 0.8 + 0.0 + 0.0) / 5
    assert score.score == pytest.approx(by_hand) and len(score.terms) == 5 and score.note == ""
    assert score.forget_acc == (1.0, 0.25) and score.retain_acc == (0.75, 0.5)
    assert requests_of(("a", "b", "c")) == [("a",), ("b",), ("c",), ("a", "b", "c")]


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def fast_paper_loop():
    """The paper's loop with 40 Adam steps and 2 tries: the protocol under test, not its 2,000 steps."""
    from forgetpack.engine.solvers import paper as paper_solver

    full = paper_solver.paper_loop
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(paper_solver, "paper_loop", lambda problem, steps=0, max_tries=0, rank=None: full(problem, 40, 2, rank))
        yield


# Each architecture runs the protocol once, shared by the assertions: all four datasets embedded and
# evaluated after every patch, the requests of one of them solved by the paper's loop (a request costs
# seconds of text encoding on a random-init tower on 2 cores). forgetpack's default runs on mini below.
FORGET_IN = {"RN50:none": "Caltech101", "ViT-B-16:none": "OxfordFlowers"}


@pytest.fixture(scope="module", params=list(FORGET_IN))
def random_init_run(request, data_root, fast_paper_loop) -> tuple[str, dict]:
    from forgetpack.evaluation.paper import run_benchmark

    sets = [s if s.name == FORGET_IN[request.param] else pd.BenchmarkSet(s.data, (), s.source)
            for s in pd.load_paper_datasets(data_root)]  # fmt: skip
    return request.param, run_benchmark(request.param, sets, ["paper"]).to_json()


def test_random_init_models_run_the_whole_protocol(random_init_run):
    model, report = random_init_run
    datasets = {"StanfordDogs", "StanfordCars", "Caltech101", "OxfordFlowers"}
    assert report["model"] == model and list(report["solvers"]) == ["paper"]
    assert report["solvers"]["paper"] == {"solver": "paper", "target": "empty", "target_norm": "unit",
                                          "templates": "dataset", "verify": False}  # fmt: skip
    assert set(report["datasets"]) == datasets
    forget = list(pd.find_paper_dataset(FORGET_IN[model]).forget)
    assert [r["forget"] for r in report["requests"]] == [[c] for c in forget] + [forget]
    for r in report["requests"]:
        assert r["dataset"] == FORGET_IN[model] and r["solver"] == "paper"
        assert set(r["other_datasets"]) == datasets - {r["dataset"]}  # the paper's three other datasets
        assert r["seconds"] > 0 and r["rank"] == 5  # the paper's LoRA rank
        assert r["forget_classes"] == r["forget"]
        assert r["n_terms"] == 5 or "left out (base accuracy 0" in r["note"]  # a base accuracy of 0: undefined term
    for d in report["datasets"].values():
        assert d["images"] == PER_CLASS * 5 and d["source"] and 0 <= d["base_acc"] <= 1
    assert report["datasets"]["OxfordFlowers"]["templates"] == ["a photo of a {}, a type of flower."]
    assert report["timings"]["embed_images:StanfordDogs"] > 0


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory) -> tuple[dict, str, Path]:
    """mini's reduced protocol (CI's form): the letter requests with forgetpack's default (the paper's loop
    runs on the random-init models above), every set evaluated. One run gives the table (stdout), the
    JSON report (-o) and the plot."""
    folder = tmp_path_factory.mktemp("mini-run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "250")  # the table's full width, not a terminal's
        code = main(["benchmark", "paper", "--model", "mini", "--datasets", "letters", "--solver", "default",
                     "-o", str(folder / "report.json"), "--plot", str(folder / "s.png")])  # fmt: skip
    assert code == 0
    return json.loads((folder / "report.json").read_text()), out.getvalue(), folder / "s.png"


def test_mini_protocol_forgets_the_letters_and_keeps_the_rest(mini_run):
    report, _, plot = mini_run
    assert list(report["solvers"]) == ["default"]
    assert set(report["datasets"]) == {"mnist", "letters", "digits", "quickdraw", "fashion"}
    assert report["datasets"]["mnist"]["forget"] == [] and report["datasets"]["letters"]["forget"] == ["A", "K", "X"]
    assert report["datasets"]["quickdraw"]["forget"] == []  # --datasets letters: the others are "other" sets only
    bars = {"mnist": 0.95, "letters": 0.95, "digits": 0.95, "quickdraw": 0.48, "fashion": 0.85}
    assert all(d["base_acc"] > bars[name] for name, d in report["datasets"].items())  # mini reads its own sets
    requests = report["requests"]
    assert [(r["solver"], r["forget"]) for r in requests] == [("default", f) for f in (["A"], ["K"], ["X"], ["A", "K", "X"])]
    for r in requests:
        others = {"mnist", "digits", "quickdraw", "fashion"}
        assert set(r["other_datasets"]) == others and r["n_terms"] == 6  # forget, retain, four others
        terms = r["terms"]
        assert r["S"] == pytest.approx(sum(terms.values()) / 6, abs=1e-5)
        assert terms["forget"] == pytest.approx(r["forget_acc"]["patched"] / r["forget_acc"]["base"], abs=1e-5)
        assert r["forget_acc"]["patched"] <= 0.01  # forgotten
        assert r["retain_acc"]["patched"] >= r["retain_acc"]["base"] - 0.01  # the other letters kept
        assert r["S"] < 0.01
    assert report["mean_S"]["default"]["all"] < 0.01
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_the_table_is_the_papers(mini_run):
    _, table, _ = mini_run
    for text in ("base zero-shot accuracy", "built-in letters", "default f / r / o", "default S", "A, K, X", "mean S"):
        assert text in table, text
    header = next(line for line in table.splitlines() if "default S" in line)
    names = [cell.strip().lower() for cell in header.strip("┃ ").split("┃")]
    assert "default solve s" in names and len(names) == len(set(names)), names  # "S" the score, "solve s" the seconds
