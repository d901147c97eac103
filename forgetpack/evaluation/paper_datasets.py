"""The paper's four datasets, read from local copies, and mini's stand-in for them.

Kravets & Namboodiri (TMLR 2025) forget three classes in each of StanfordDogs, StanfordCars,
Caltech101 and OxfordFlowers, evaluated on CoOp's test splits. Nothing is downloaded: each
dataset is read from a folder under ``--data-root`` in one of two layouts.

- **CoOp** (what the paper used): the dataset folder holds CoOp's split file
  (``split_zhou_<Name>.json``, ``{"test": [[path, label, classname], ...]}``); its cleaned class
  names are used as they are (underscores read as spaces, as CoOp's prompts do).
- **Official** (no split file): the layouts torchvision's ``download=False`` readers expect,
  read here directly (torchvision's Flowers102 insists on the files' md5 sums, and none of this
  needs torchvision): Stanford Dogs ``Images/<wnid>-<breed>/`` with ``test_list.mat``; Stanford
  Cars ``devkit/cars_meta.mat``, ``cars_test_annos_withlabels.mat``, ``cars_test/``; Caltech101
  ``101_ObjectCategories/<class>/``; Flowers102 ``jpg/``, ``imagelabels.mat``, ``setid.mat``.
  Class names are cleaned as CoOp cleans them (Cars: the year first; Caltech: CoOp's renames).

Images are read from disk when they are encoded, never all held in memory, and a set's
fingerprint (the image-embedding cache key) hashes the files' bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np
from PIL import Image

from forgetpack.evaluation.datasets import IMAGE_EXTENSIONS, LabeledImages, load_dataset
from forgetpack.format.errors import ForgetpackError, one_line

log = logging.getLogger(__name__)

Listing = tuple[list[Path], list[int], list[str]]  # image files, their labels, the class names


@dataclass(frozen=True)
class BenchmarkSet:
    """One dataset of the protocol: its images, and the classes requests forget in it (none: an "other" set only)."""

    data: LabeledImages
    forget: tuple[str, ...] = ()
    source: str = ""  # where it was read from, for the report

    @property
    def name(self) -> str:
        return self.data.name


# ----------------------------------------------------------------------------- images read when needed


class ImageFiles(Sequence[Image.Image]):
    """Images opened on access: a split of thousands of photos is never held in memory at once."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    @overload
    def __getitem__(self, index: int) -> Image.Image: ...
    @overload
    def __getitem__(self, index: slice) -> list[Image.Image]: ...
    def __getitem__(self, index: int | slice) -> Image.Image | list[Image.Image]:
        if isinstance(index, slice):
            return [read_image(p) for p in self.paths[index]]
        return read_image(self.paths[index])


def read_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ForgetpackError(f"{path}: cannot read the image ({one_line(exc)})") from exc


class DiskImages(LabeledImages):
    """A labeled set whose images are files; its fingerprint hashes their bytes, not decoded pixels."""

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        h.update("\x1f".join(self.classnames).encode())
        h.update(np.asarray(self.labels, dtype=np.int64).tobytes())
        for path in self.images.paths:  # type: ignore[attr-defined]
            h.update(hashlib.sha1(path.read_bytes()).digest())
        return h.hexdigest()


# ----------------------------------------------------------------------------- the four datasets


@dataclass(frozen=True)
class PaperDataset:
    """How to find, read and prompt one of the paper's datasets."""

    name: str  # as the paper's code and CoOp name it
    key: str  # what --datasets takes
    folders: tuple[str, ...]  # accepted folder names under the data root (CoOp's, torchvision's)
    forget: tuple[str, str, str]
    template: str
    split_file: str  # CoOp's split file in the dataset folder
    images_dir: str  # the folder the split file's paths are relative to
    test_images: int  # images in the test split the paper evaluates on
    official: Callable[[Path], Listing]  # the official layout's reader
    expected: str  # the official layout, for error messages


def _dogs(folder: Path) -> Listing:
    images = _need_dir(folder / "Images", "Images/<wnid>-<breed>/*.jpg")
    breeds = sorted(p.name for p in images.iterdir() if p.is_dir())
    if not breeds:
        raise ForgetpackError(f"{images}: no breed folders (expected Images/<wnid>-<breed>/*.jpg, e.g. n02085620-Chihuahua)")
    names = [b.partition("-")[2].replace("_", " ") or b for b in breeds]
    index = {b: i for i, b in enumerate(breeds)}
    split = next((p for p in (folder / "test_list.mat", folder / "lists" / "test_list.mat") if p.is_file()), None)
    if split is None:
        log.warning("%s: no test_list.mat (the official test split): evaluating every image under Images/", folder)
        files = [f for b in breeds for f in _image_files(images / b)]
    else:
        listed = _loadmat(split, "file_list")["file_list"]
        files = [images / str(np.ravel(entry)[0]) for entry in np.ravel(listed)]
    labels = []
    for f in files:
        breed = f.parent.name
        if breed not in index:
            raise ForgetpackError(f"{split}: lists {f.relative_to(images)}, whose breed folder is not under {images}")
        labels.append(index[breed])
    return files, labels, names


def _cars(folder: Path) -> Listing:
    meta = _loadmat(folder / "devkit" / "cars_meta.mat", "class_names")
    annos = _loadmat(folder / "cars_test_annos_withlabels.mat", "annotations")["annotations"]
    names = [_year_first(str(np.ravel(n)[0]) if np.ndim(n) else str(n)) for n in np.ravel(meta["class_names"])]
    test_dir = _need_dir(folder / "cars_test", "cars_test/*.jpg")
    files, labels = [], []
    for a in np.ravel(annos):
        files.append(test_dir / str(np.ravel(a["fname"])[0]))
        labels.append(int(np.ravel(a["class"])[0]) - 1)
    return files, labels, names


def _year_first(name: str) -> str:
    """Stanford Cars names end in the year ("Spyker C8 Coupe 2009"); CoOp's and the paper's start with it."""
    *model, year = name.split()
    return f"{year} {' '.join(model)}" if model and year.isdigit() else name


CALTECH_IGNORED = ("BACKGROUND_Google", "Faces_easy")  # CoOp's 100 classes
CALTECH_RENAMED = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}


def _caltech(folder: Path) -> Listing:
    root = _need_dir(folder / "101_ObjectCategories", "101_ObjectCategories/<class>/*.jpg")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in CALTECH_IGNORED)
    if not classes:
        raise ForgetpackError(f"{root}: no class folders (expected 101_ObjectCategories/<class>/*.jpg)")
    log.warning("%s: no split_zhou_Caltech101.json (CoOp's split; Caltech101 has no official one): "
                "evaluating every image", folder)  # fmt: skip
    files, labels = [], []
    for i, c in enumerate(classes):
        found = _image_files(root / c)
        files += found
        labels += [i] * len(found)
    return files, labels, [CALTECH_RENAMED.get(c, c).replace("_", " ") for c in classes]


def _flowers(folder: Path) -> Listing:
    jpg = _need_dir(folder / "jpg", "jpg/image_00001.jpg ...")
    all_labels = np.ravel(_loadmat(folder / "imagelabels.mat", "labels")["labels"]).astype(int)
    test_ids = np.ravel(_loadmat(folder / "setid.mat", "tstid")["tstid"]).astype(int)
    names = list(FLOWER_NAMES)
    named = folder / "cat_to_name.json"
    if named.is_file():
        mapping = _read_json(named)
        names = [str(mapping.get(str(i + 1), n)) for i, n in enumerate(names)]
    return [jpg / f"image_{i:05d}.jpg" for i in test_ids], [int(all_labels[i - 1]) - 1 for i in test_ids], names


# The 102 Oxford flower categories in label order (label 1 first), as CoOp's cat_to_name.json names them.
FLOWER_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold", "tiger lily",
    "moon orchid", "bird of paradise", "monkshood", "globe thistle", "snapdragon", "colt's foot", "king protea",
    "spear thistle", "yellow iris", "globe-flower", "purple coneflower", "peruvian lily", "balloon flower",
    "giant white arum lily", "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william", "carnation",
    "garden phlox", "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya", "cape flower",
    "great masterwort", "siam tulip", "lenten rose", "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion", "petunia",
    "wild pansy", "primula", "sunflower", "pelargonium", "bishop of llandaff", "gaura", "geranium", "orange dahlia",
    "pink-yellow dahlia", "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy", "gazania",
    "azalea", "water lily", "rose", "thorn apple", "morning glory", "passion flower", "lotus lotus", "toad lily",
    "anthurium", "frangipani", "clematis", "hibiscus", "columbine", "desert-rose", "tree mallow", "magnolia",
    "cyclamen", "watercress", "canna lily", "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower", "trumpet creeper", "blackberry lily",
)  # fmt: skip

PHOTO = "a photo of a {}."
PAPER_DATASETS = (
    PaperDataset("StanfordDogs", "dogs", ("stanford_dogs", "StanfordDogs", "stanford-dogs"),
                 ("Pekinese", "toy poodle", "Scotch terrier"), PHOTO, "split_zhou_StanfordDogs.json", "Images", 8580,
                 _dogs, "Images/<wnid>-<breed>/*.jpg and test_list.mat"),
    PaperDataset("StanfordCars", "cars", ("stanford_cars", "StanfordCars"),
                 ("2009 Spyker C8 Coupe", "2010 Dodge Ram Pickup 3500 Crew Cab", "2011 Ford Ranger SuperCab"), PHOTO,
                 "split_zhou_StanfordCars.json", "", 8041, _cars,
                 "split_zhou_StanfordCars.json, or devkit/cars_meta.mat, cars_test_annos_withlabels.mat and cars_test/"),
    PaperDataset("Caltech101", "caltech101", ("caltech-101", "caltech101", "Caltech101"),
                 ("euphonium", "minaret", "platypus"), PHOTO, "split_zhou_Caltech101.json", "101_ObjectCategories", 2465,
                 _caltech, "split_zhou_Caltech101.json and/or 101_ObjectCategories/<class>/*.jpg"),
    PaperDataset("OxfordFlowers", "flowers", ("oxford_flowers", "flowers-102", "OxfordFlowers", "flowers102"),
                 ("trumpet creeper", "gazania", "tree mallow"), "a photo of a {}, a type of flower.",
                 "split_zhou_OxfordFlowers.json", "jpg", 2463, _flowers,
                 "split_zhou_OxfordFlowers.json, or jpg/, imagelabels.mat and setid.mat"),
)  # fmt: skip
PAPER_KEYS = tuple(d.key for d in PAPER_DATASETS)


def find_paper_dataset(name: str) -> PaperDataset:
    """A dataset by its key or its name, any case."""
    for d in PAPER_DATASETS:
        if name.strip().lower() in (d.key, d.name.lower()):
            return d
    raise ForgetpackError(f"unknown dataset {name!r}: choose from {', '.join(PAPER_KEYS)}")


def dataset_folder(root: Path, spec: PaperDataset) -> Path:
    """The dataset's folder under ``root``, under any of the names CoOp or torchvision give it."""
    for name in spec.folders:
        if (root / name).is_dir():
            return root / name
    raise ForgetpackError(f"{root}: no {spec.name} folder (expected {root / spec.folders[0]}/ with {spec.expected}; "
                          f"other accepted names: {', '.join(spec.folders[1:])})")  # fmt: skip


def load_paper_dataset(root: str | Path, spec: PaperDataset) -> BenchmarkSet:
    """The test split of one dataset: CoOp's split file when present, the official layout otherwise."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise ForgetpackError(f"{root}: data root not found (expected a folder holding {', '.join(d.folders[0] for d in PAPER_DATASETS)})")
    folder = dataset_folder(root, spec)
    split = folder / spec.split_file
    if split.is_file():
        files, labels, names = _coop_split(split, folder / spec.images_dir)
        source = str(split)
    else:
        files, labels, names = spec.official(folder)
        source = f"{folder} (official layout)"
    missing = next((f for f in files if not f.is_file()), None)
    if missing is not None:
        raise ForgetpackError(f"{missing}: image listed by {source} not found")
    if not files:
        raise ForgetpackError(f"{folder}: no test images found (expected {spec.expected})")
    if min(labels) < 0 or max(labels) >= len(names):
        raise ForgetpackError(f"{source}: labels run outside the {len(names)} class names")
    absent = [c for c in spec.forget if c not in names]
    if absent:
        raise ForgetpackError(f"{source}: forget class {absent[0]!r} is not among its {len(names)} class names")
    data = DiskImages(spec.name, ImageFiles(files), np.asarray(labels, dtype=np.int64), names, (spec.template,))  # type: ignore[arg-type]
    return BenchmarkSet(data, spec.forget, source)


def load_paper_datasets(root: str | Path, keys: Sequence[str] = PAPER_KEYS) -> list[BenchmarkSet]:
    specs = list(dict.fromkeys(find_paper_dataset(k) for k in keys))
    return [load_paper_dataset(root, s) for s in specs]


def _coop_split(path: Path, images: Path) -> Listing:
    """CoOp's ``{"test": [[relative path, label, classname], ...]}``; class names indexed by label."""
    data = _read_json(path)
    entries = data.get("test") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ForgetpackError(f"{path}: not a CoOp split file (expected a non-empty \"test\" list of [path, label, classname])")
    by_label: dict[int, str] = {}
    files, labels = [], []
    for entry in entries:
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str) and isinstance(entry[1], int)):
            raise ForgetpackError(f"{path}: test entry {entry!r:.80} is not [path, label, classname]")
        files.append(images / entry[0])
        labels.append(entry[1])
        by_label.setdefault(entry[1], str(entry[2]).replace("_", " "))
    if sorted(by_label) != list(range(len(by_label))):
        raise ForgetpackError(f"{path}: the test split's labels are not 0..{len(by_label) - 1} (a class without test images?)")
    return files, labels, [by_label[i] for i in range(len(by_label))]


# ----------------------------------------------------------------------------- mini's stand-in

# Three forget classes a set, chosen like the paper's: each with close neighbours in its set (seven:
# one; K: X; cat: tiger, lion, dog; car: truck, van, police car; violin: cello, guitar; t-shirt: shirt;
# sneaker: sandal, ankle boot; coat: pullover).
MINI_FORGET = {
    "mnist": ("one", "four", "seven"),
    "letters": ("A", "K", "X"),
    "quickdraw": ("cat", "car", "violin"),
    "fashion": ("t-shirt", "sneaker", "coat"),
}
MINI_OTHER = ("digits",)  # UCI digits: holds the digit classes too, so it is an "other" set of the letter requests only


def mini_sets() -> list[BenchmarkSet]:
    """mini's built-in held-out sets in the paper's roles: three classes forgotten on each of MNIST,
    the letters, QuickDraw's neighbour groups and Fashion-MNIST; UCI digits only as an "other" set."""
    sets = [BenchmarkSet(load_dataset(name), forget, f"built-in {name}") for name, forget in MINI_FORGET.items()]
    return sets + [BenchmarkSet(load_dataset(name), (), f"built-in {name}") for name in MINI_OTHER]


# ----------------------------------------------------------------------------- file helpers


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ForgetpackError(f"{path}: folder not found (expected {what})")
    return path


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)


def _loadmat(path: Path, key: str) -> dict[str, Any]:
    """A MATLAB file of the official layout (scipy reads it; it holds arrays, nothing executable)."""
    import scipy.io

    if not path.is_file():
        raise ForgetpackError(f"{path}: file not found (part of the official layout)")
    try:
        data = scipy.io.loadmat(path)
    except Exception as exc:  # scipy raises several kinds for a damaged file
        raise ForgetpackError(f"{path}: cannot read the MATLAB file ({one_line(exc)})") from exc
    if key not in data:
        raise ForgetpackError(f"{path}: has no {key!r} entry")
    return data


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ForgetpackError(f"{path}: cannot read JSON ({one_line(exc)})") from exc
