"""numpy <-> `aevae.v1.Tensor`: dtype + shape + raw little-endian bytes, row-major.

The one codec for both sides, so that the client and the services cannot disagree about byte order or
layout. Decoding never copies (a read-only view on the message's bytes) and checks everything a peer could
get wrong, naming the field: the dtype, the shape, and the byte length against the shape.
"""

from __future__ import annotations

import math
from typing import Iterable

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


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Any numpy array; its dtype name travels as is, so the receiver can say what it got."""
    array = np.asarray(array)
    wire: np.dtype = DTYPES.get(array.dtype.name, array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return tensor_pb2.Tensor(dtype=array.dtype.name, shape=array.shape, data=data)


def from_tensor(tensor: tensor_pb2.Tensor, field: str, dtypes: Iterable[str] = tuple(DTYPES)) -> np.ndarray:
    """A read-only array viewing the message's bytes; TensorError when dtype, shape or length are wrong."""
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
    if len(tensor.data) != expected:
        raise TensorError(
            f"{field}.data: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=DTYPES[tensor.dtype]).reshape(shape)
