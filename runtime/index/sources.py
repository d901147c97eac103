"""Where the images to index come from: a folder, a list of paths, or a Parquet/CSV table.

Every source becomes one list of :class:`Item` in a fixed order (sorted paths, or the file's
own row order), so that the shards cut from it are the same on every run and a resumed run
finds the shards it already committed. Nothing here decodes an image.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from forgetpack.format.errors import ForgetpackError
from forgetpack.format.fileio import check_input_file

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"})
PATH_COLUMNS = ("path", "image_path", "file", "filename")
BYTES_COLUMNS = ("bytes", "image", "image_bytes", "content")
LIST_SUFFIXES = (".txt", ".lst", ".list")
# The largest image file read: an uncompressed 40-megapixel RGBA TIFF or BMP (the runtime's pixel
# budget) is 160 MB. A file over it is refused from its size (stat), before a byte is read.
MAX_IMAGE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Item:
    """One image to index: ``key`` names it (its path, or ``table#row`` for bytes in a table)."""

    key: str
    data: bytes | None = None  # the encoded image when the source holds bytes, else read from ``key``

    def read(self) -> bytes:
        if self.data is not None:
            return check_image_bytes(self.key, len(self.data)) and self.data
        path = check_input_file(self.key, "image")
        check_image_bytes(self.key, path.stat().st_size)
        with open(path, "rb") as handle:
            data = handle.read(MAX_IMAGE_BYTES + 1)  # a file grown since its stat is still bounded
        check_image_bytes(self.key, len(data))
        return data


def check_image_bytes(name: str, size: int) -> bool:
    """The one rule for an image's size in bytes (from a stat, or of bytes in a table): over
    ``MAX_IMAGE_BYTES`` is refused in one line. True when it passes."""
    if size > MAX_IMAGE_BYTES:
        raise ForgetpackError(f"{name}: {size:,} bytes is over the limit of {MAX_IMAGE_BYTES:,} for an image file")
    return True


def content_hash(data: bytes) -> str:
    """The identity of an image in the index: sha256 of its encoded bytes (hex)."""
    return hashlib.sha256(data).hexdigest()


def list_items(source: str | os.PathLike[str], column: str | None = None) -> list[Item]:
    """The images of ``source``: a folder (recursive), a text file of paths, or a .parquet/.csv file."""
    path = Path(source)
    suffix = path.suffix.lower()
    if column is not None and (path.is_dir() or suffix not in (".parquet", ".csv")):
        raise ForgetpackError(f"{path}: --column names a column of a .parquet/.csv source; this is a "
                              f"{'folder' if path.is_dir() else 'list of paths'}, which has none")
    if path.is_dir():
        return _folder(path)
    check_input_file(path, "image source")
    if suffix in (".parquet", ".csv"):
        return _table(path, column)
    if suffix in LIST_SUFFIXES:
        return _path_list(path)
    raise ForgetpackError(f"{path}: not an image source (give a folder, a .txt list of paths, or a .parquet/.csv file)")


def _folder(root: Path) -> list[Item]:
    """Image files under ``root`` at any depth, by extension, in sorted order (symlinked folders not followed)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [Path(folder) / f for f in files if Path(f).suffix.lower() in IMAGE_EXTENSIONS]
    return [Item(str(p)) for p in sorted(found)]


def _path_list(path: Path) -> list[Item]:
    """One path per line; blank lines and ``#`` comments skipped; relative paths are relative to the list."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ForgetpackError(f"{path}: a list of image paths must be UTF-8 text") from None
    items = []
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            entry = Path(line)
            items.append(Item(str(entry if entry.is_absolute() else path.parent / entry)))
    return items


def _table(path: Path, column: str | None) -> list[Item]:
    """Rows of a Parquet or CSV file: a bytes column is used as the images, else a path column."""
    import pyarrow as pa

    table = _read_table(path)
    names = table.column_names
    wanted: Sequence[str] = [column] if column else [*BYTES_COLUMNS, *PATH_COLUMNS]
    if column and column not in names:
        raise ForgetpackError(f"{path}: has no column {column!r} (columns: {', '.join(names)})")
    for name in wanted:
        if name not in names:
            continue
        kind = table.schema.field(name).type
        values = table.column(name).to_pylist()
        if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
            return [Item(f"{path}#{row}", v) for row, v in enumerate(values) if v is not None]
        if pa.types.is_string(kind) or pa.types.is_large_string(kind):
            return [Item(str(v if Path(v).is_absolute() else path.parent / v)) for v in values if v]
        if column:
            raise ForgetpackError(f"{path}: column {column!r} holds {kind}, not image bytes or paths")
    raise ForgetpackError(f"{path}: no image column (looked for {', '.join(wanted)}; choose one with --column)")


def _read_table(path: Path):  # -> pyarrow.Table
    import pyarrow.csv
    import pyarrow.parquet

    try:
        if path.suffix.lower() == ".parquet":
            return pyarrow.parquet.read_table(path)
        return pyarrow.csv.read_csv(path)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        raise ForgetpackError(f"{path}: cannot read it as {path.suffix[1:].upper()} ({' '.join(str(exc).split())[:200]})") from None
