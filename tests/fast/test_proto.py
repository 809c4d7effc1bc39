"""The API contract: committed generated code equals a fresh generation; the tensor codec checks what it reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aevae.v1 import generate
from aevae.v1.tensors import TensorError, from_tensor, to_tensor


def test_committed_generated_code_matches_a_fresh_generation(tmp_path: Path) -> None:
    fresh = {p.name: p.read_bytes() for p in generate.generate(tmp_path)}
    committed = {p.name: p.read_bytes() for p in generate.generated_files()}
    assert sorted(fresh) == sorted(committed), "generated files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"{stale} differ from a fresh generation: run `make proto` and commit the result"
    assert {"encoder_pb2.py", "encoder_pb2.pyi", "decoder_pb2_grpc.py", "decoder_pb2_grpc.pyi"} <= set(fresh)


def test_generated_modules_import_each_other_through_the_package() -> None:
    text = (generate.HERE / "decoder_pb2_grpc.py").read_text()
    assert "from aevae.v1 import decoder_pb2" in text
    assert "\nimport decoder_pb2" not in text


@pytest.mark.parametrize("array", [
    np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    np.arange(12, dtype=np.uint8).reshape(3, 4),
    np.zeros((0, 4), dtype=np.float32),
])
def test_tensor_round_trip_is_exact(array: np.ndarray) -> None:
    tensor = to_tensor(array)
    assert tensor.dtype == array.dtype.name and list(tensor.shape) == list(array.shape)
    back = from_tensor(tensor, "x")
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_tensor_bytes_are_little_endian_row_major() -> None:
    tensor = to_tensor(np.array([[1.0, 2.0]], dtype=">f4"))
    assert tensor.dtype == "float32"
    assert tensor.data == np.array([1.0, 2.0], dtype="<f4").tobytes()


def test_tensor_errors_name_the_field_what_was_expected_and_what_came() -> None:
    good = to_tensor(np.zeros((2, 4), dtype=np.float32))
    short = type(good)(dtype="float32", shape=[2, 4], data=good.data[:12])
    with pytest.raises(TensorError, match=r"latents\.data: shape \[2, 4\] of float32 needs 32 bytes, got 12"):
        from_tensor(short, "latents")
    with pytest.raises(TensorError, match=r"latents\.dtype: expected float32, got 'float64'"):
        from_tensor(type(good)(dtype="float64", shape=[1], data=b"\0" * 8), "latents", dtypes=("float32",))
    with pytest.raises(TensorError, match=r"x\.shape: dimensions must be >= 0"):
        from_tensor(type(good)(dtype="uint8", shape=[-1], data=b""), "x")
