"""Safe file output and a canonical safetensors writer.

Why a writer of our own: ``safetensors.numpy.save`` emits ``__metadata__`` keys in hash
order, so two saves of the same content differ byte-wise, and ``forgetpack apply`` must be
byte-for-byte deterministic. The format is tiny (8-byte little-endian header length, a JSON
header, then the raw tensor bytes); we emit the same layout with sorted keys, and the
result is read by the plain ``safetensors`` library (a test checks both directions).
Reading stays with ``safetensors`` itself, which validates headers against the file size.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from forgetpack.errors import ForgetpackError

# safetensors dtype code <-> numpy dtype (bf16 has no numpy dtype: it can be copied raw,
# never decoded).
DTYPES: dict[str, np.dtype | None] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": None,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items() if dt is not None}
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def dtype_code(array: np.ndarray) -> str:
    """The safetensors dtype code of a numpy array."""
    code = _CODES.get(array.dtype.newbyteorder("<"))
    if code is None:
        raise ForgetpackError(f"dtype {array.dtype} cannot be stored in safetensors")
    return code


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: dtype code, shape and little-endian bytes (decoded or not)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    @classmethod
    def from_array(cls, array: np.ndarray) -> RawTensor:
        code = dtype_code(array)
        data = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
        return cls(code, tuple(int(d) for d in array.shape), data)

    def to_array(self) -> np.ndarray:
        dt = DTYPES.get(self.dtype)
        if dt is None:
            raise ForgetpackError(f"dtype {self.dtype} cannot be decoded with numpy")
        return np.frombuffer(self.data, dtype=dt).reshape(self.shape).copy()


def ensure_parent_dir(path: Path) -> None:
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ForgetpackError(f"{path}: output directory {parent} does not exist")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    An existing file at ``path`` is therefore either untouched or fully replaced, never
    torn, even if the process dies mid-write.
    """
    path = Path(path)
    ensure_parent_dir(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.resolve().parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode())  # mkstemp makes 0600; an output gets what open() would give it
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _default_mode() -> int:
    """0666 less the process umask: the mode a plain ``open(path, "w")`` would create."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_output(path) as handle:
        handle.write(data)


def _header(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None) -> tuple[bytes, list[str]]:
    # Same tensor order as safetensors: larger alignment first, then by name.
    order = sorted(tensors, key=lambda name: (-_ITEMSIZE[tensors[name].dtype], name))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name in order:
        t = tensors[name]
        header[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(t.data)]}
        offset += len(t.data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(raw)) + raw, order


def serialize(tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Canonical safetensors bytes: same content in, same bytes out."""
    head, order = _header(tensors, metadata)
    return head + b"".join(bytes(tensors[name].data) for name in order)


def save_safetensors(
    path: str | os.PathLike[str], tensors: Mapping[str, RawTensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a canonical safetensors file atomically, streaming tensor bytes."""
    head, order = _header(tensors, metadata)
    with atomic_output(path) as handle:
        handle.write(head)
        for name in order:
            handle.write(tensors[name].data)


def read_safetensors(
    path: str | os.PathLike[str], what: str = "file", error: type[ForgetpackError] = ForgetpackError
) -> tuple[dict[str, RawTensor], dict[str, str]]:
    """Read every tensor raw (no decoding) and the metadata, validated by ``safetensors``.

    The file is memory-mapped, so copying a 600 MB checkpoint does not double its memory.
    Raises ``error`` naming the file for anything unreadable.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        # safe_open validates the header against the file (offsets, sizes, dtypes).
        with safe_open(str(path), framework="numpy") as handle:
            handle.metadata()
        with open(path, "rb") as raw:
            data = mmap.mmap(raw.fileno(), 0, access=mmap.ACCESS_READ)
        (length,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + length])
        metadata = header.pop("__metadata__", None) or {}
        start = 8 + length
        view = memoryview(data)
        tensors = {
            name: RawTensor(info["dtype"], tuple(info["shape"]), view[start + info["data_offsets"][0] : start + info["data_offsets"][1]])
            for name, info in header.items()
        }
    except Exception as exc:  # any failure to parse untrusted bytes is a user error
        raise error(f"{path}: not a readable safetensors {what} ({_short(exc)})") from None
    return tensors, dict(metadata)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
