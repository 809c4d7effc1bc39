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

DTYPES = {"float32": np.dtype("<f4"), "uint8": np.dtype("u1")}


class TensorError(ValueError):
    """A Tensor message that does not describe a valid array; the message names the field."""


def to_tensor(array: np.ndarray) -> tensor_pb2.Tensor:
    """Any numpy array; its dtype name travels as is, so the receiver can say what it got."""
    array = np.asarray(array)
    wire = DTYPES.get(array.dtype.name, array.dtype.newbyteorder("<"))
    data = np.ascontiguousarray(array, dtype=wire).tobytes()
    return tensor_pb2.Tensor(dtype=array.dtype.name, shape=array.shape, data=data)


def from_tensor(tensor: tensor_pb2.Tensor, field: str, dtypes: Iterable[str] = tuple(DTYPES)) -> np.ndarray:
    """A read-only array viewing the message's bytes; TensorError when dtype, shape or length are wrong."""
    accepted = tuple(dtypes)
    if tensor.dtype not in accepted:
        got = repr(tensor.dtype) if tensor.dtype else "no dtype"
        raise TensorError(f"{field}.dtype: expected {' or '.join(accepted)}, got {got}")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{field}.shape: dimensions must be >= 0, got {list(shape)}")
    itemsize = DTYPES[tensor.dtype].itemsize
    expected = math.prod(shape) * itemsize
    if len(tensor.data) != expected:
        raise TensorError(
            f"{field}.data: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got {len(tensor.data)}"
        )
    return np.frombuffer(tensor.data, dtype=DTYPES[tensor.dtype]).reshape(shape)
