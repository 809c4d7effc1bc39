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
