"""The client's batching plan: messages sized by the server's limits and the model's own image shape."""

from __future__ import annotations

import numpy as np
import pytest

from aevae.client import AevaeError
from aevae.client.core import HEADROOM, ServerLimits
from aevae.client.decoder import _Plan

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
