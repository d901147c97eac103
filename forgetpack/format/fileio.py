"""Safe file and folder output, the output-path checks, and a canonical safetensors writer.

Every file forgetpack writes goes through :func:`atomic_output` (a temporary file beside the
destination, renamed over it only when complete) and every folder through
:func:`atomic_directory` (a temporary folder, swapped in whole): an existing output is either
untouched or fully replaced, never torn and never deleted before its replacement is in place.

Why a writer of our own: ``safetensors.numpy.save`` emits ``__metadata__`` keys in hash
order, so two saves of the same content differ byte-wise, and ``forgetpack apply`` must be
byte-for-byte deterministic. The format is tiny (8-byte little-endian header length, a JSON
header, then the raw tensor bytes); we emit the same layout with sorted keys, and the
result is read by the plain ``safetensors`` library (a test checks both directions).
Reading stays with ``safetensors`` itself, which validates headers against the file size.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from forgetpack.format.errors import ForgetpackError, one_line

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


Inputs = Iterable[tuple[str, str | os.PathLike[str] | None]]  # (what it is, path): a command's own inputs


def check_output_file(path: str | os.PathLike[str], what: str = "output", *, replace: bool = True,
                      inputs: Inputs = ()) -> Path:
    """Fail before any work if a file could not be written at ``path`` (one clear line).

    This is the one overwrite rule of every command that writes a file: with ``replace=False`` (a
    command without ``--force``) an existing file is refused, and an output that is one of the
    command's own ``inputs`` (the same path, or the same file through a link) is refused always,
    since replacing it would destroy what the run reads (``apply BASE P -o BASE`` loses the base
    that ``revert --base`` needs). Library writes (caches, ``Patch.save``) replace by default.
    """
    path = Path(path)
    if path.is_dir():
        raise ForgetpackError(f"{path} is a directory; give a file name for the {what}")
    parent = path.resolve().parent
    if not parent.is_dir():
        raise ForgetpackError(f"{path}: output directory {parent} does not exist")
    _check_not_input(path, inputs, inside=False)
    if not replace and (path.exists() or path.is_symlink()):
        raise ForgetpackError(f"{path} exists: pass --force to replace it")
    return path


def _check_not_input(out: Path, inputs: Inputs, inside: bool) -> None:
    """Refuse an output that is one of the inputs (resolved, or the same file by ``samefile``); for a
    folder output (``inside``), also one that holds an input, since replacing the folder removes it."""
    target = out.resolve()
    for role, given in inputs:
        if given is None:
            continue
        source = Path(given).expanduser()
        resolved = source.resolve()
        same = resolved == target or (inside and target in resolved.parents)
        if not same and out.exists() and source.exists():
            with contextlib.suppress(OSError):
                same = os.path.samefile(out, source)  # hard links, bind mounts
        if same:
            raise ForgetpackError(f"{out} is also an input of this command ({role}): write elsewhere")


def check_input_file(path: str | os.PathLike[str], what: str = "file",
                     error: type[ForgetpackError] = ForgetpackError) -> Path:
    """Say plainly what is wrong with an input path: missing, a dangling link, a folder, a FIFO or device."""
    path = Path(path)
    if not path.exists():
        problem = "is a dangling symbolic link" if path.is_symlink() else "not found"
        raise error(f"{path}: {what} {problem}")
    if path.is_dir():
        raise error(f"{path}: is a directory, not a {what}")
    if not path.is_file():
        raise error(f"{path}: is not a regular file (a FIFO, socket or device), not a {what}")
    return path


def check_output_dir(path: str | os.PathLike[str], replace: bool = False, *, inputs: Inputs = ()) -> Path:
    """Fail before any work if a folder could not be published at ``path``: the rule of
    :func:`check_output_file` for folders (an empty folder counts as free; one that is or holds an input is refused)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ForgetpackError(f"{path}: exists and is not a directory")
    _check_not_input(path, inputs, inside=True)
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise ForgetpackError(f"{path} exists: pass --force to replace it")
    if not path.resolve().parent.is_dir():
        raise ForgetpackError(f"{path}: parent directory {path.resolve().parent} does not exist")
    return path


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only on success.

    An existing file at ``path`` is therefore either untouched or fully replaced, never
    torn, even if the process dies mid-write. ``mode`` defaults to what ``open()`` would give;
    the temporary file has 0600 until then, so a secret is never readable by others.
    """
    path = check_output_file(path)
    sweep_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.resolve().parent)
    except OSError as exc:
        raise ForgetpackError(f"{path}: cannot write ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, a read-only or immutable folder: one line, the old file intact
        _remove(Path(tmp))
        raise ForgetpackError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        _remove(Path(tmp))
        raise


def _default_mode() -> int:
    """0666 less the process umask: the mode a plain ``open(path, "w")`` would create."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``out``; publish it as ``out`` only on success.

    With ``replace`` an existing ``out`` is swapped for the new folder in one step (Linux
    ``renameat2(RENAME_EXCHANGE)``; elsewhere moved aside first and removed only after the new
    folder is in place). Without it, publishing fails if ``out`` gained content meanwhile.
    """
    out = check_output_dir(out, replace)
    sweep_stale_temporaries(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".tmp", dir=out.resolve().parent))
    except OSError as exc:
        raise ForgetpackError(f"{out}: cannot write ({exc.strerror})") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        _publish_directory(tmp, out, replace)
    except OSError as exc:
        raise ForgetpackError(f"{out}: cannot write ({exc.strerror or exc})") from None
    finally:
        _remove(tmp)  # after an exchange it holds the old folder


def _publish_directory(tmp: Path, out: Path, replace: bool) -> None:
    if out.is_dir() and (replace or not any(out.iterdir())):
        if _exchange(tmp, out):
            return
        aside = Path(tempfile.mkdtemp(prefix=_temp_prefix(out), suffix=".old", dir=out.resolve().parent))
        os.replace(out, aside / out.name)
        os.replace(tmp, out)
        shutil.rmtree(aside, ignore_errors=True)
        return
    try:
        os.rename(tmp, out)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise ForgetpackError(f"{out} exists (it appeared while this run was writing it): pass --force to replace it") from None
        raise


# Temporaries are named ".NAME.fpPID.RANDOM.tmp" (or ".old"): whoever writes NAME next can tell
# which ones a killed writer left behind (its PID is gone) and remove them.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.fp(?P<pid>\d+)\.[^.]+\.(tmp|old)$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.fp{os.getpid()}."


def sweep_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries of ``path`` whose writer process no longer exists; returns them.

    A process killed mid-write (kill -9, power loss) cannot clean up after itself, so the next
    writer of the same output does. Temporaries of live writers are left alone.
    """
    path = Path(path)
    try:
        entries = list(path.resolve().parent.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and match["name"] == path.name and not _alive(int(match["pid"])):
            _remove(entry)
            stale.append(entry)
    return stale


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system cannot."""
    rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if rename is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if rename(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EPERM):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> None:
    with atomic_output(path, mode) as handle:
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

    path = check_input_file(path, what, error)
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
        raise error(f"{path}: not a readable safetensors {what} ({one_line(exc, 200)})") from None
    return tensors, dict(metadata)

