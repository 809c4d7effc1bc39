"""The wire's conversions: "the newest" is None in Python and 0 only on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from aevae.v1.tensors import WireError, version_from_wire, version_to_wire


def test_newest_is_none_in_python_and_zero_on_the_wire() -> None:
    assert version_from_wire(0) is None and version_to_wire(None) == 0
    assert version_from_wire(7) == 7 and version_to_wire(np.int64(7)) == 7


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2", 2**63])
def test_a_python_version_must_be_none_or_positive(bad: object) -> None:
    with pytest.raises(WireError, match="expected None"):
        version_to_wire(bad)  # type: ignore[arg-type]


def test_a_negative_wire_version_is_refused() -> None:
    with pytest.raises(WireError, match=r"version: expected 0 \(the newest\) or a positive version, got -3"):
        version_from_wire(-3)


def test_shapes_numpy_cannot_hold_are_tensor_errors() -> None:
    from aevae.v1 import tensor_pb2
    from aevae.v1.tensors import TensorError, from_tensor

    with pytest.raises(TensorError, match="at most 32 dimensions, got 33"):
        from_tensor(tensor_pb2.Tensor(dtype="uint8", shape=[1] * 33, data=b"\0"), "x")
    with pytest.raises(TensorError, match="below 2\\*\\*40"):
        from_tensor(tensor_pb2.Tensor(dtype="uint8", shape=[0, 2**62], data=b""), "x")
    with pytest.raises(TensorError, match=r"expected float32, got 'xxxx.*\.\.\."):
        from_tensor(tensor_pb2.Tensor(dtype="x" * 10_000, shape=[1], data=b"\0"), "x", dtypes=("float32",))


@pytest.mark.parametrize("dtype, n", [("float32", 5), ("uint8", 5), ("float32", 0)])
def test_a_response_written_with_one_copy_is_an_ordinary_message(dtype: str, n: int) -> None:
    from aevae.v1 import decoder_pb2
    from aevae.v1.tensors import TensorResponse, from_tensor, serialize_with_data, tensor_head

    images = (np.random.default_rng(0).random((n, 6, 7)) * 200).astype(dtype)
    head = decoder_pb2.DecodeResponse(model="vae", version=3, images=tensor_head(images))
    data = serialize_with_data(head, 3, images)
    message = decoder_pb2.DecodeResponse.FromString(data)  # protobuf's own reader merges the two parts
    assert (message.model, message.version) == ("vae", 3)
    assert np.array_equal(from_tensor(message.images, "images"), images)
    fast = TensorResponse.parse(data)  # and ours reads it without copying the data
    assert (fast.model, fast.version) == ("vae", 3) and np.array_equal(fast.array, images)
    plain = TensorResponse.parse(message.SerializeToString())  # and reads protobuf's serialization too
    assert np.array_equal(plain.array, images)
