"""The client's batching plan: messages sized by the server's limits and the model's own image shape; and
answers checked before they become the caller's data."""

from __future__ import annotations

import re

import numpy as np
import pytest

from aevae.client import AevaeError
from aevae.client.core import HEADROOM, ServerLimits
from aevae.client.decoder import _Plan, _parse
from aevae.client.encoder import _Plan as EncodePlan
from aevae.client.fanout import Assembler
from aevae.v1 import decoder_pb2, encoder_pb2
from aevae.v1.tensors import to_tensor

LIMITS = ServerLimits(max_message_bytes=HEADROOM + 10 * 32 * 32 * 4, max_batch=1000,
                      image_shapes={"vae": (32, 32), "small": (8, 8)})


def test_a_batch_that_fits_is_one_unary_call() -> None:
    plan = _Plan(np.zeros((10, 4)), "vae", None, "float32", LIMITS, stream_chunk=4096)
    assert plan.unary and plan.spans == [(0, 10)] and plan.version == 0


def test_a_bigger_batch_is_split_by_the_response_size_of_its_model() -> None:
    plan = _Plan(np.zeros((25, 4)), "vae", 3, "float32", LIMITS, stream_chunk=4096)
    assert not plan.unary and plan.spans == [(0, 10), (10, 20), (20, 25)] and plan.version == 3
    assert _Plan(np.zeros((25, 4)), "vae", None, "uint8", LIMITS, 4096).unary  # 4x smaller responses
    assert _Plan(np.zeros((150, 4)), "small", None, "float32", LIMITS, 4096).unary  # 8 x 8 images


def test_the_stream_chunk_caps_each_message() -> None:
    plan = _Plan(np.zeros((25, 4)), "vae", None, "float32", LIMITS, stream_chunk=4)
    assert plan.spans[:2] == [(0, 4), (4, 8)] and plan.spans[-1] == (24, 25)


def test_bad_arguments_fail_before_any_call() -> None:
    with pytest.raises(AevaeError, match="version: expected None"):
        _Plan(np.zeros((1, 4)), "vae", -1, "float32", LIMITS, 4096)
    with pytest.raises(AevaeError, match="dtype"):
        _Plan(np.zeros((1, 4)), "vae", None, "float16", LIMITS, 4096)


def _answer(images: np.ndarray) -> bytes:
    return decoder_pb2.DecodeResponse(model="vae", version=1, images=to_tensor(images)).SerializeToString()


def test_an_answer_that_is_not_what_was_asked_is_an_error_never_data() -> None:
    """A server that answers the wrong rows, dtype or shape, or bytes that do not parse: the caller gets
    INTERNAL saying what was wrong, never images that are not its own (nor uninitialized rows)."""
    plan = _Plan(np.zeros((3, 4)), "vae", None, "float32", LIMITS, 4096)
    good = np.random.default_rng(0).random((3, 32, 32), dtype=np.float32)
    assert np.array_equal(plan.unary_result(_parse(_answer(good))), good)
    for answer, words in [(_answer(good[:2]), "shape [2, 32, 32]; asked for 3 of float32"),
                          (_answer((good * 255).astype(np.uint8)), "uint8 images"),
                          (_answer(good.reshape(3, 1024)), "shape [3, 1024]"),
                          (_answer(good)[:-10], "unreadable"),
                          (b"\xff\xff\xff", "unreadable")]:
        with pytest.raises(AevaeError, match="the server's answer is not usable: .*" + re.escape(words)) as error:
            plan.unary_result(_parse(answer))
        assert error.value.code().name == "INTERNAL"
    streamed = _Plan(np.zeros((25, 4)), "vae", None, "float32", LIMITS, 4096)
    streamed.add(_parse(_answer(np.zeros((10, 32, 32), np.float32))))
    with pytest.raises(AevaeError, match=r"response 1 holds .* \[10, 16, 64\]; asked for 10 of float32, each "
                                          r"\[32, 32\] as before"):
        streamed.add(_parse(_answer(np.zeros((10, 16, 64), np.float32))))


def test_an_encoder_answer_with_the_wrong_rows_or_width_is_an_error() -> None:
    def answer(mean: np.ndarray) -> encoder_pb2.EncodeResponse:
        return encoder_pb2.EncodeResponse(model="vae", version=1, mean=to_tensor(mean))

    plan = EncodePlan(np.zeros((3, 32, 32), np.uint8), "vae", None, False, None, LIMITS, 4096)
    assert plan.result([answer(np.ones((3, 4), np.float32))]).mean.shape == (3, 4)
    with pytest.raises(AevaeError, match=r"response 0: mean is float32 of shape \[2, 4\]; expected 3 rows"):
        plan.result([answer(np.ones((2, 4), np.float32))])
    broken = encoder_pb2.EncodeResponse(model="vae", version=1)
    broken.mean.dtype, broken.mean.shape[:] = "float32", [3, 4]
    with pytest.raises(AevaeError, match=r"response 0: mean.data: .* needs 48 bytes, got 0"):
        plan.result([broken])


def test_replicas_that_disagree_on_the_image_shape_are_an_error() -> None:
    out = Assembler(20)
    out.put(0, {"images": np.zeros((10, 32, 32), np.float32)})
    with pytest.raises(AevaeError, match=r"replicas disagree on images: float32 rows of \[16, 64\] at row 10"):
        out.put(10, {"images": np.zeros((10, 16, 64), np.float32)})
