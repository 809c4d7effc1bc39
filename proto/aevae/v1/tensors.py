"""numpy <-> `aevae.v1.Tensor`: dtype + shape + raw little-endian bytes, row-major.

The one codec for both sides, so that the client and the services cannot disagree about byte order or
layout. Decoding never copies (a read-only view on the message's bytes) and checks everything a peer could
get wrong, naming the field: the dtype, the shape, and the byte length against the shape.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from aevae.v1 import tensor_pb2

MAX_RANK = 32  # numpy's limit
MAX_DIM = 2**40  # far beyond any message; keeps products of dimensions inside int64
DTYPES: dict[str, np.dtype] = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


class WireError(ValueError):
    """A message field that does not hold a valid value; the message names the field."""


class TensorError(WireError):
    """A Tensor message that does not describe a valid array; the message names the field."""


# "The newest version" is None in Python and 0 only on the wire; these two convert it, once at each edge.
MAX_VERSION = 2**63 - 1


def version_from_wire(value: int, field: str = "version") -> int | None:
    """A request's version field -> a version number, or None for the newest (0)."""
    if value < 0:
        raise WireError(f"{field}: expected 0 (the newest) or a positive version, got {value}")
    return value or None


def version_to_wire(version: int | None, field: str = "version") -> int:
    """None (the newest) or a positive version number -> a request's version field."""
    if version is None:
        return 0
    if isinstance(version, bool) or not isinstance(version, (int, np.integer)) or not 0 < version <= MAX_VERSION:
        raise WireError(f"{field}: expected None (the newest) or a positive integer, got {version!r}")
    return int(version)


_NAMES: dict[np.dtype, str] = {}


def dtype_name(dtype: np.dtype) -> str:
    """`dtype.name`, remembered: numpy computes it anew on every access, which shows on the one-latent path."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = dtype.name
    return name


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Any numpy array; its dtype name travels as is, so the receiver can say what it got."""
    array = np.asarray(array)
    name = dtype_name(array.dtype)
    wire: np.dtype = DTYPES.get(name, array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return tensor_pb2.Tensor(dtype=name, shape=array.shape, data=data)


def from_tensor(tensor: tensor_pb2.Tensor, field: str, dtypes: Iterable[str] = tuple(DTYPES),
                data: bytes | memoryview | None = None) -> np.ndarray:
    """A read-only array viewing the message's bytes (or `data`, the Tensor's data when it was split off the
    message by `split_payload`); TensorError when dtype, shape or length are wrong."""
    accepted = tuple(dtypes)
    if tensor.dtype not in accepted:
        got = repr(tensor.dtype[:40]) + ("..." if len(tensor.dtype) > 40 else "") if tensor.dtype else "no dtype"
        raise TensorError(f"{field}.dtype: expected {' or '.join(accepted)}, got {got}")
    if len(tensor.shape) > MAX_RANK:
        raise TensorError(f"{field}.shape: at most {MAX_RANK} dimensions, got {len(tensor.shape)}")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}.shape: dimensions must be >= 0, got {list(shape)}")
    if any(s > MAX_DIM for s in shape):
        raise TensorError(f"{field}.shape: each dimension must be below 2**40, got {list(shape)}")
    itemsize = DTYPES[tensor.dtype].itemsize
    expected = math.prod(shape) * itemsize
    if data is None:
        data = tensor.data  # each read of a bytes field makes a new copy of it: read it once
    if len(data) != expected:
        raise TensorError(
            f"{field}.data: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(data)}"
        )
    return np.frombuffer(data, dtype=DTYPES[tensor.dtype]).reshape(shape)


# -- the bulk path: responses that carry a big Tensor, written and read with one copy of its bytes --------
# A Tensor's data is most of a DecodeResponse. Building the message with protobuf copies those bytes three or
# four times (array -> bytes -> Tensor -> response -> wire); here the response is serialized without its
# data, and the data follows as a second occurrence of the same Tensor field, which protobuf merges into the
# first (the wire format's rule for embedded messages), so any protobuf reader sees one ordinary message.
_LEN = 2  # wire type: length-delimited


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def length_delimited(field_number: int, size: int) -> bytes:
    """The key and length that come before `size` bytes of field `field_number` on the wire: an embedded
    message, a bytes field or a packed repeated scalar field."""
    return _varint(field_number << 3 | _LEN) + _varint(size)


def serialize_with_data(head: Any, field_number: int, array: np.ndarray) -> bytes:
    """`head` (a message whose Tensor field `field_number` holds dtype and shape but no data) serialized, with
    the array's bytes as that Tensor's data: one copy of the array."""
    wire = DTYPES.get(dtype_name(array.dtype), array.dtype)
    data = np.ascontiguousarray(array, dtype=wire).reshape(-1).view(np.uint8).data
    inner = length_delimited(3, len(data))
    outer = length_delimited(field_number, len(inner) + len(data))
    return b"".join((head.SerializeToString(), outer, inner, data))


def tensor_head(array: np.ndarray) -> tensor_pb2.Tensor:
    """A Tensor with the array's dtype and shape and no data (see serialize_with_data)."""
    return tensor_pb2.Tensor(dtype=dtype_name(array.dtype), shape=array.shape)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TensorError("a varint longer than 10 bytes")


def entries(buf: memoryview) -> Iterable[tuple[int, int, Any, int, int]]:
    """(field number, wire type, value, start, end) of each field of a message: ints for varints, memoryview
    slices for the rest; buf[start:end] is the whole field, key included."""
    pos, end = 0, len(buf)
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        value: Any
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == _LEN:
            size, pos = _read_varint(buf, pos)
            if pos + size > end:
                raise TensorError("a field runs past the end of the message")
            value, pos = buf[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise TensorError("a field runs past the end of the message")
            value, pos = buf[pos:pos + size], pos + size
        else:
            raise TensorError(f"unsupported wire type {wire}")
        yield number, wire, value, start, pos


def _fields(buf: memoryview) -> Iterable[tuple[int, int, Any]]:
    """(field number, wire type, value) of a message: ints for varints, memoryview slices for the rest."""
    for number, wire, value, _, _ in entries(buf):
        yield number, wire, value


def split_payload(data: bytes, field_number: int) -> tuple[bytes, memoryview] | None:
    """The bulk path of requests: a message's bytes without the data of its Tensor field `field_number`, and
    that data, a view on `data` (no copy). Parsing the rest with protobuf then gives the same message as
    parsing it all, minus the one big bytes field that protobuf would copy twice (into the message, and again
    on each read). None when there is no such data or the bytes do not read as protobuf: the caller parses
    them whole, and protobuf says what is wrong."""
    buf = memoryview(data)
    head: list[bytes | memoryview] = []
    payload: memoryview | None = None
    try:
        for number, wire, value, start, end in entries(buf):
            if number != field_number or wire != _LEN:
                head.append(buf[start:end])
                continue
            inner: list[memoryview] = []
            for n, w, v, s, e in entries(value):
                if n == 3 and w == _LEN:
                    payload = v  # a repeated scalar field: the last one wins, as in protobuf
                else:
                    inner.append(value[s:e])
            rest = b"".join(inner)
            head.append(length_delimited(field_number, len(rest)) + rest)
    except (TensorError, IndexError):
        return None
    return None if payload is None else (b"".join(head), payload)


class TensorResponse:
    """A response of the form {model = 1, version = 2, Tensor = 3} (DecodeResponse), read without copying
    the Tensor's data: `array` is a read-only view on the received bytes."""

    __slots__ = ("model", "version", "array")

    def __init__(self, model: str, version: int, array: np.ndarray):
        self.model, self.version, self.array = model, version, array

    @classmethod
    def parse(cls, data: bytes, field: str = "images") -> "TensorResponse":
        buf = memoryview(data)
        model, version, dtype, shape = "", 0, "", []
        parts: list[memoryview] = []
        for number, wire, value in _fields(buf):
            if number == 1 and wire == _LEN:
                model = bytes(value).decode()
            elif number == 2 and wire == 0:
                version = value
            elif number == 3 and wire == _LEN:
                for n, w, v in _fields(value):
                    if n == 1 and w == _LEN:
                        dtype = bytes(v).decode()
                    elif n == 2 and w == _LEN:  # packed
                        pos = 0
                        while pos < len(v):
                            dim, pos = _read_varint(v, pos)
                            shape.append(dim)
                    elif n == 2 and w == 0:
                        shape.append(v)
                    elif n == 3 and w == _LEN:
                        parts.append(v)
        if dtype not in DTYPES:
            raise TensorError(f"{field}.dtype: expected {' or '.join(DTYPES)}, got {dtype!r}")
        payload = parts[-1] if parts else memoryview(b"")  # a repeated scalar field: the last one wins
        expected = math.prod(shape) * DTYPES[dtype].itemsize
        if len(payload) != expected:
            raise TensorError(f"{field}.data: shape {shape} of {dtype} needs {expected} bytes, got {len(payload)}")
        return cls(model, version, np.frombuffer(payload, dtype=DTYPES[dtype]).reshape(shape))
