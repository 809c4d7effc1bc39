"""A seeded, bounded property-based fuzz of the wire (issue 9): random Tensor messages and request fields sent
to real encoder and decoder processes. Every answer is OK with finite results of the right shape, or one of
the documented statuses; afterwards each server still answers a known request correctly."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aevae.services.process import ServiceProcess
from aevae.v1 import decoder_pb2, decoder_pb2_grpc, encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor
from helpers import write_tiny

DOCUMENTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.FAILED_PRECONDITION}
MAX_MESSAGE = 1 << 20
CASES = 250  # per service: about 15 s each here (the test asserts the bound: at most 60 s in all)


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, object]]:
    root = tmp_path_factory.mktemp("fuzz") / "models"
    write_tiny(root, "vae")
    write_tiny(root, "ae", "ae")
    args = ["--max-message-bytes", str(MAX_MESSAGE), "--max-batch", "512"]
    with ServiceProcess("encoder", root, args=args) as enc, ServiceProcess("decoder", root, args=args) as dec:
        enc.wait_healthy()
        dec.wait_healthy()
        with grpc.insecure_channel(enc.address) as ec, grpc.insecure_channel(dec.address) as dc:
            yield encoder_pb2_grpc.EncoderStub(ec), decoder_pb2_grpc.DecoderStub(dc)
        assert "Traceback" not in "".join(enc.output + dec.output)


floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1.0, -1e30]))
dims = st.one_of(st.integers(0, 40), st.sampled_from([-1, 2**31, 2**62, 2**63 - 1]))


@st.composite
def tensors(draw: st.DrawFn, dtypes: tuple[str, ...]) -> tensor_pb2.Tensor:
    dtype = draw(st.sampled_from([*dtypes, "", "float64", "int8", "x" * 300]))
    shape = draw(st.lists(dims, max_size=5))
    if draw(st.booleans()) and all(0 <= d <= 40 for d in shape) and dtype in ("float32", "uint8"):
        n = int(np.prod(shape)) if shape else 1
        if dtype == "float32":
            data = np.array(draw(st.lists(floats, min_size=min(n, 64), max_size=min(n, 64))) * (n // 64 + 1),
                            dtype=np.float32)[:n].tobytes()
        else:
            data = bytes(draw(st.binary(min_size=n, max_size=n)))
    else:
        data = draw(st.binary(max_size=256))
    return tensor_pb2.Tensor(dtype=dtype, shape=shape, data=data)


names = st.one_of(st.sampled_from(["vae", "ae", "", "nope"]), st.text(max_size=50))
versions = st.one_of(st.integers(-3, 3), st.sampled_from([2**62, -(2**62)]))


def _check(call, validate) -> None:  # type: ignore[no-untyped-def]
    try:
        response = call()
    except grpc.RpcError as error:
        assert error.code() in DOCUMENTED, (error.code(), error.details())
        assert len(error.details()) < 2000
        return
    validate(response)


@settings(max_examples=CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tensor=tensors(("float32",)), model=names, version=versions, dtype=st.sampled_from(["", "float32", "uint8", "f16"]))
def test_decode_answers_every_request_with_a_documented_status(stubs, tensor, model, version, dtype) -> None:  # type: ignore[no-untyped-def]
    _, dec = stubs

    def valid(response: decoder_pb2.DecodeResponse) -> None:
        images = from_tensor(response.images, "images")
        assert images.shape == (tensor.shape[0], 32, 32) and np.isfinite(images.astype(np.float32)).all()

    _check(lambda: dec.Decode(decoder_pb2.DecodeRequest(model=model, version=version, latents=tensor, dtype=dtype),
                              timeout=10), valid)


@settings(max_examples=CASES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(tensor=tensors(("float32", "uint8")), model=names, version=versions, sample=st.booleans())
def test_encode_answers_every_request_with_a_documented_status(stubs, tensor, model, version, sample) -> None:  # type: ignore[no-untyped-def]
    enc, _ = stubs

    def valid(response: encoder_pb2.EncodeResponse) -> None:
        mean = from_tensor(response.mean, "mean")
        assert mean.shape == (tensor.shape[0], 4) and np.isfinite(mean).all()

    _check(lambda: enc.Encode(encoder_pb2.EncodeRequest(model=model, version=version, images=tensor, sample=sample),
                              timeout=10), valid)


def test_both_servers_still_answer_correctly_after_the_fuzz(stubs) -> None:  # type: ignore[no-untyped-def]
    enc, dec = stubs
    z = np.zeros((3, 4), np.float32)
    images = from_tensor(dec.Decode(decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(z))).images, "i")
    assert images.shape == (3, 32, 32) and np.isfinite(images).all()
    mean = from_tensor(enc.Encode(encoder_pb2.EncodeRequest(model="vae", images=to_tensor(images))).mean, "m")
    assert mean.shape == (3, 4)
