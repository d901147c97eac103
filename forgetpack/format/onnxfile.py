"""Read named initializers and metadata straight out of an .onnx file, without the onnx package.

Why: the runtime must know the exact projection matrices inside the graph it runs (to check
them against the manifest's fingerprints and to re-project with a hot-swapped patch), and
onnxruntime has no API that returns initializer values. The serving machine should not need
the ``onnx`` package either, so this module walks the protobuf wire format itself.

Only what is needed is decoded: the top-level ``ModelProto`` fields, the graph's
``initializer`` entries (name, dims, dtype, and the data of the tensors asked for) and
``metadata_props``. The file is memory-mapped, so a 350 MB graph is skipped over, not read.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from forgetpack.format.errors import ForgetpackError

# ONNX TensorProto.DataType -> numpy (the float types a projection can have)
_DTYPES = {1: np.dtype("<f4"), 10: np.dtype("<f2"), 11: np.dtype("<f8")}

# Field numbers from onnx.proto.
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_DTYPE, _TENSOR_FLOAT, _TENSOR_NAME, _TENSOR_RAW, _TENSOR_DOUBLE, _TENSOR_LOCATION = 1, 2, 4, 8, 9, 10, 14


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Malformed("varint too long")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """Yield ``(field number, wire type, value)``; length-delimited values are sub-views."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise _Malformed("field runs past the end")
            yield number, wire, buf[pos : pos + length]
            pos += length
        elif wire == 1:
            pos += 8
            yield number, wire, 0
        elif wire == 5:
            pos += 4
            yield number, wire, 0
        else:
            raise _Malformed(f"unsupported wire type {wire}")
        if pos > end:
            raise _Malformed("field runs past the end")


@dataclass
class InitializerInfo:
    """One graph initializer: its name, shape and data type (data decoded on request)."""

    name: str
    dims: tuple[int, ...]
    dtype: int
    external: bool
    _view: memoryview | None = field(default=None, repr=False)

    def array(self) -> np.ndarray:
        """The initializer's values as a numpy array (a copy)."""
        if self.external:
            raise ForgetpackError(f"initializer {self.name!r} is stored as external data, which the runtime does not read")
        dtype = _DTYPES.get(self.dtype)
        if dtype is None:
            raise ForgetpackError(f"initializer {self.name!r} has ONNX data type {self.dtype}, not a float type")
        raw: bytes | None = None
        floats: list[memoryview] = []
        for number, wire, value in _fields(self._view):
            if number == _TENSOR_RAW and wire == 2:
                raw = bytes(value)
            elif number in (_TENSOR_FLOAT, _TENSOR_DOUBLE) and wire == 2:
                floats.append(value)
        count = int(np.prod(self.dims)) if self.dims else 1
        if raw is not None:
            data = np.frombuffer(raw, dtype=dtype)
        elif floats and self.dtype in (1, 11):
            data = np.frombuffer(b"".join(bytes(v) for v in floats), dtype=dtype)
        else:
            raise ForgetpackError(f"initializer {self.name!r} stores its data in a form the runtime does not read")
        if data.size != count:
            raise ForgetpackError(f"initializer {self.name!r} holds {data.size} values, its shape {list(self.dims)} needs {count}")
        return data.reshape(self.dims).copy()


class OnnxFile:
    """A memory-mapped .onnx file: its metadata and its initializers by name."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ForgetpackError(f"{self.path}: cannot read ONNX graph ({exc})") from None
        self.metadata: dict[str, str] = {}
        self.initializers: dict[str, InitializerInfo] = {}
        try:
            self._parse(memoryview(self._map))
        except _Malformed as exc:
            raise ForgetpackError(f"{self.path}: not a readable ONNX model ({exc})") from None

    def _parse(self, buf: memoryview) -> None:
        graph = None
        for number, wire, value in _fields(buf):
            if number == _MODEL_GRAPH and wire == 2:
                graph = value
            elif number == _MODEL_METADATA and wire == 2:
                entry = {n: bytes(v).decode("utf-8", "replace") for n, w, v in _fields(value) if w == 2}
                self.metadata[entry.get(1, "")] = entry.get(2, "")
        if graph is None:
            raise _Malformed("no graph")
        for number, wire, value in _fields(graph):
            if number == _GRAPH_INITIALIZER and wire == 2:
                info = self._tensor(value)
                self.initializers[info.name] = info

    @staticmethod
    def _tensor(view: memoryview) -> InitializerInfo:
        name, dims, dtype, external = "", [], 0, False
        for number, wire, value in _fields(view):
            if number == _TENSOR_NAME and wire == 2:
                name = bytes(value).decode("utf-8", "replace")
            elif number == _TENSOR_DIMS:
                if wire == 0:
                    dims.append(value)
                else:  # packed
                    pos = 0
                    while pos < len(value):
                        d, pos = _varint(value, pos)
                        dims.append(d)
            elif number == _TENSOR_DTYPE and wire == 0:
                dtype = value
            elif number == _TENSOR_LOCATION and wire == 0:
                external = value == 1
        return InitializerInfo(name, tuple(dims), dtype, external, view)

    def arrays(self, names: Iterable[str]) -> dict[str, np.ndarray]:
        """The named initializers as arrays; a missing name is a clear error."""
        out = {}
        for name in names:
            info = self.initializers.get(name)
            if info is None:
                raise ForgetpackError(f"{self.path}: has no initializer {name!r}")
            out[name] = info.array()
        return out


# ---------------------------------------------------------------------------- a tiny graph, written by hand


def _key(number: int, wire: int) -> bytes:
    return _encode_varint(number << 3 | wire)


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _encode_varint(len(payload)) + payload


def _value_info(name: str, dims: tuple[str, str]) -> bytes:
    shape = b"".join(_message(1, _message(2, d.encode())) for d in dims)  # Dimension.dim_param
    tensor = _key(1, 0) + _encode_varint(1) + _message(2, shape)  # elem_type FLOAT, shape
    return _message(1, name.encode()) + _message(2, _message(1, tensor))


def matmul_graph() -> bytes:
    """A serialized ONNX model computing ``y = x @ w`` with both operands as inputs.

    The runtime re-projects features with it: onnxruntime's own GEMM on a single thread is
    fast and steady, whereas numpy's multithreaded BLAS can take tens of milliseconds for
    a 10x512x512 product on a busy 2-core machine. Encoded by hand (no ``onnx`` package).
    """
    node = _message(1, b"x") + _message(1, b"w") + _message(2, b"y") + _message(3, b"project") + _message(4, b"MatMul")
    graph = (_message(1, node) + _message(2, b"forgetpack_projection")
             + _message(11, _value_info("x", ("n", "d"))) + _message(11, _value_info("w", ("d", "e")))
             + _message(12, _value_info("y", ("n", "e"))))
    opset = _message(1, b"") + _key(2, 0) + _encode_varint(13)
    return _key(1, 0) + _encode_varint(8) + _message(8, opset) + _message(7, graph)
