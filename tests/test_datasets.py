"""The data behind mini and the eval harness: fixed held-out splits, image folders, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from forgetpack.evaluation import datasets as fd
from forgetpack.evaluation import everyday
from forgetpack.evaluation.datasets import LabeledImages, image_hash, load_dataset
from forgetpack.format.errors import ForgetpackError


@pytest.fixture(scope="module")
def splits() -> dict[str, dict[str, LabeledImages]]:
    return {name: {s: load_dataset(name, s) for s in fd.SPLITS} for name in fd.BUILTIN}


def test_builtin_sizes_and_classes(splits):
    expected_test = {"mnist": 1000, "digits": 500, "letters": 1000}
    expected_total = {"mnist": 5000, "digits": 1797, "letters": 7000}
    for name, parts in splits.items():
        test, train = parts["test"], parts["train"]
        assert len(test) == expected_test[name]
        assert len(test) + len(train) == expected_total[name]
        assert np.all(test.counts() == test.counts()[0]), "held-out sets are class-balanced"
        assert test.classnames == train.classnames
        assert all(im.size == (28, 28) and im.mode == "L" for im in test.images[:50])
    assert splits["mnist"]["test"].classnames[7] == "seven"
    assert not set(fd.DIGIT_NAMES) & set(fd.LETTER_NAMES)


@pytest.mark.parametrize("name", fd.BUILTIN)
def test_heldout_never_overlaps_training(splits, name):
    train = {image_hash(im) for im in splits[name]["train"].images}
    test = [image_hash(im) for im in splits[name]["test"].images]
    assert not train & set(test)


def test_splits_are_fixed():
    # Re-rendering / re-drawing gives the very same pixels: the held-out sets never drift.
    assert load_dataset("letters", "test").fingerprint() == load_dataset("letters", "test").fingerprint()
    assert load_dataset("digits", "test").fingerprint() == load_dataset("digits", "test").fingerprint()


def test_heldout_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), 10)
    train, test = fd.heldout_split(labels, 3, seed=1)
    assert np.array_equal(np.bincount(labels[test]), [3, 3, 3, 3])
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(40))
    assert np.array_equal(test, fd.heldout_split(labels, 3, seed=1)[1])


def test_unknown_dataset_and_split():
    with pytest.raises(ForgetpackError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ForgetpackError, match="unknown split"):
        load_dataset("mnist", "validation")


# ----------------------------------------------------------------------------- image folders


def _write_folder(root, classes=("cat", "dog"), per_class=3, corrupt=True):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / classes[0] / "notes.txt").write_text("not an image, ignored")
    if corrupt:
        (root / classes[1] / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    return root


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == fd.__name__ and r.levelno == logging.WARNING]


def test_imagefolder_loads_and_skips_corrupt_files(tmp_path, caplog):
    root = _write_folder(tmp_path / "pets")
    with caplog.at_level(logging.WARNING, logger=fd.__name__):
        data = load_dataset(f"imagefolder:{root}")
    assert any(m.startswith("skipped unreadable image") and "broken.jpg" in m for m in _warnings(caplog))
    assert data.classnames == ["cat", "dog"]
    assert len(data) == 6 and list(data.counts()) == [3, 3]
    assert len(data.skipped) == 1 and data.skipped[0].endswith("broken.jpg")
    assert all(im.mode == "RGB" for im in data.images)


def test_imagefolder_classnames_file(tmp_path):
    root = _write_folder(tmp_path / "pets", corrupt=False)
    (root / "classnames.txt").write_text("tabby cat\ngolden retriever\n")
    assert load_dataset(f"imagefolder:{root}").classnames == ["tabby cat", "golden retriever"]
    (root / "classnames.txt").write_text("dog\tgolden retriever\n")
    assert load_dataset(f"imagefolder:{root}").classnames == ["cat", "golden retriever"]
    (root / "classnames.txt").write_text("only one\n")
    with pytest.raises(ForgetpackError, match="has 1 names but .* has 2 class folders"):
        load_dataset(f"imagefolder:{root}")


def test_imagefolder_errors(tmp_path, caplog):
    with pytest.raises(ForgetpackError, match="image folder not found"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ForgetpackError, match="has no class sub-folders"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}")
    (tmp_path / "hollow" / "a").mkdir(parents=True)
    with pytest.raises(ForgetpackError, match="has no readable images"):
        load_dataset(f"imagefolder:{tmp_path / 'hollow'}")
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    (bad / "x.png").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger=fd.__name__):
        with pytest.raises(ForgetpackError, match=r"no readable images \(1 unreadable"):
            load_dataset(f"imagefolder:{tmp_path / 'bad'}")
    assert any(m.startswith("skipped unreadable image") and "x.png" in m for m in _warnings(caplog))


# ----------------------------------------------------------------------------- everyday things


def test_everyday_heldout_sets_ship_in_the_package():
    """QuickDraw (the declared neighbour groups and all 345) and Fashion-MNIST's official test split load offline."""
    quickdraw, full, fashion = (load_dataset(n, "test") for n in ("quickdraw", "quickdraw-345", "fashion"))
    assert len(full.classnames) == 345 and np.all(full.counts() == 25)
    assert len(quickdraw.classnames) >= 60 and np.all(quickdraw.counts() == 25)
    for group in everyday.TARGET_GROUPS:
        assert set(everyday.QUICKDRAW_GROUPS[group]) <= set(quickdraw.classnames), group
    assert {"cat", "tiger", "lion", "dog", "police car", "teddy-bear", "coffee cup"} <= set(quickdraw.classnames)
    assert len(fashion) == 10_000 and fashion.classnames == list(everyday.FASHION_NAMES)
    assert np.all(fashion.counts() == 1000)
    assert all(im.size == (28, 28) and im.mode == "L" for im in quickdraw.images[:20] + fashion.images[:20])
    # the declared set is a relabelled subset of the full one: the same drawings
    cat = full.classnames.index("cat")
    assert [image_hash(im) for im, y in zip(full.images, full.labels, strict=True) if y == cat] == [
        image_hash(im) for im, y in zip(quickdraw.images, quickdraw.labels, strict=True) if y == quickdraw.classnames.index("cat")
    ]


@pytest.mark.parametrize("source", ["quickdraw", "fashion"])
def test_everyday_heldout_never_overlaps_training(source):
    """No held-out image is a training image: checked by content against the hashes of every training
    image, recorded beside the held-out split when tools/mini_data.py built both from the same download."""
    pixels, _, _ = everyday.load_arrays("quickdraw-345" if source == "quickdraw" else "fashion", "test")
    train = everyday.recorded_train_hashes(source)
    assert len(train) == {"quickdraw": 25_874, "fashion": 60_000}[source]
    assert not set(everyday.pixel_hashes(pixels).tolist()) & set(train.tolist())


def test_everyday_training_split_is_fetched_not_shipped(tmp_path, monkeypatch):
    """Without fetched training data the error names the tool that fetches it; with it, the split loads."""
    monkeypatch.setenv(everyday.TRAINING_DATA_ENV, str(tmp_path))
    with pytest.raises(ForgetpackError, match="tools/mini_data.py"):
        load_dataset("fashion", "train")
    pixels = np.zeros((3, 28, 28), dtype=np.uint8)
    pixels[1, 0, 0], pixels[2, 0, 0] = 1, 2
    np.savez_compressed(tmp_path / "fashion-train.npz", pixels=pixels, labels=np.array([0, 1, 9], dtype=np.int16))
    train = load_dataset("fashion", "train")
    assert len(train) == 3 and train.classnames[9] == "ankle boot" and list(train.labels) == [0, 1, 9]
