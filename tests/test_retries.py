"""Retries by gRPC itself: the client's service config retries UNAVAILABLE (and nothing else) up to its
budget, every failure surfaces as AevaeError, and a stream's deadline is one total deadline; a stream broken
after some answers is resumed by the client after its last answer."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient, EncoderClient
from aevae.client.core import service_config
from aevae.v1 import decoder_pb2, encoder_pb2, tensor_pb2
from aevae.v1.tensors import to_tensor


class Flaky:
    """A fake aevae.v1.Decoder: ListModels fails with `code` `failures` times, then answers; DecodeStream
    answers each message after `delay` seconds."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.delay = 0.0
        self.break_after: list[int] = []
        self.streamed: list[tuple[int, int]] = []  # (rows, version) of every request message received
        self.lock = threading.Lock()

    def list_models(self, request: tensor_pb2.ListModelsRequest, context: grpc.ServicerContext) -> Any:
        with self.lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            context.abort(self.code, "not now")
        return tensor_pb2.ListModelsResponse(
            limits=tensor_pb2.Limits(max_message_bytes=4096 + 160, max_batch=1 << 16),  # 10 rows a message
            models=[tensor_pb2.ModelInfo(name="vae", version=1, latent_dim=4, image_shape=[2, 2])])

    def decode_stream(self, requests: Iterator[decoder_pb2.DecodeRequest], context: grpc.ServicerContext) -> Any:
        """Each image holds its latent's first value; with `break_after`, the stream fails with UNAVAILABLE
        after that many answers, once per entry (a server restarting mid-stream)."""
        breaking = self.break_after.pop(0) if self.break_after else None
        for answered, request in enumerate(requests):
            self.streamed.append((request.latents.shape[0], request.version))
            if answered == breaking:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is restarting")
            time.sleep(self.delay)
            z = np.frombuffer(request.latents.data, np.float32).reshape(tuple(request.latents.shape))
            images = np.repeat(z[:, :1], 4, axis=1).reshape(-1, 2, 2)
            yield decoder_pb2.DecodeResponse(model="vae", version=7, images=to_tensor(images))

    def encode_stream(self, requests: Iterator[encoder_pb2.EncodeRequest], context: grpc.ServicerContext) -> Any:
        """Each mean holds its image's first pixel; `break_after` as for decode_stream."""
        breaking = self.break_after.pop(0) if self.break_after else None
        for answered, request in enumerate(requests):
            self.streamed.append((request.images.shape[0], request.version))
            if answered == breaking:  # in the words of a connection reset, which alone get a TLS hint
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is restarting: Connection reset by peer")
            x = np.frombuffer(request.images.data, np.uint8).reshape(tuple(request.images.shape))
            mean = np.repeat(x[:, :1, 0].astype(np.float32), 4, axis=1)
            yield encoder_pb2.EncodeResponse(model="vae", version=7, mean=to_tensor(mean))


@pytest.fixture(scope="module")
def flaky() -> Iterator[tuple[Flaky, str]]:
    fake = Flaky()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    handlers = {
        "ListModels": grpc.unary_unary_rpc_method_handler(
            fake.list_models, request_deserializer=tensor_pb2.ListModelsRequest.FromString,
            response_serializer=tensor_pb2.ListModelsResponse.SerializeToString),
        "DecodeStream": grpc.stream_stream_rpc_method_handler(
            fake.decode_stream, request_deserializer=decoder_pb2.DecodeRequest.FromString,
            response_serializer=decoder_pb2.DecodeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aevae.v1.Decoder", handlers),))
    encoder = {
        "ListModels": handlers["ListModels"],
        "EncodeStream": grpc.stream_stream_rpc_method_handler(
            fake.encode_stream, request_deserializer=encoder_pb2.EncodeRequest.FromString,
            response_serializer=encoder_pb2.EncodeResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aevae.v1.Encoder", encoder),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield fake, f"127.0.0.1:{port}"
    server.stop(0)


def attempts(fake: Flaky, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
    fake.calls, fake.failures, fake.code = 0, failures, code


def test_unavailable_is_retried_by_grpc_within_the_budget(flaky: tuple[Flaky, str]) -> None:
    fake, target = flaky
    attempts(fake, 2)
    with DecoderClient(target, retries=3, backoff=0.01) as client:
        assert [m.name for m in client.list_models()] == ["vae"]
    assert fake.calls == 3
    attempts(fake, 2)
    with DecoderClient(target, retries=1, backoff=0.01) as client, pytest.raises(AevaeError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and fake.calls == 2
    attempts(fake, 1, grpc.StatusCode.INVALID_ARGUMENT)  # never retried
    with DecoderClient(target, retries=3, backoff=0.01) as client, pytest.raises(AevaeError) as info:
        client.list_models()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and fake.calls == 1

    async def main() -> list[str]:
        async with AsyncDecoderClient(target, retries=3, backoff=0.01) as client:
            return [m.name for m in await client.list_models()]

    attempts(fake, 2)
    assert asyncio.run(main()) == ["vae"] and fake.calls == 3


def test_the_policy_has_jitter_and_no_retries_at_zero() -> None:
    assert '"retryableStatusCodes": ["UNAVAILABLE"]' in service_config(3, 0.1)
    assert '"maxAttempts": 5' in service_config(10, 0.1)  # gRPC's cap
    assert "retryPolicy" not in service_config(0, 0.1)


def test_a_stream_has_one_total_deadline(flaky: tuple[Flaky, str]) -> None:
    """Ten messages of 0.2 s each against a 1 s timeout: the whole call, not each message, gets the second."""
    fake, target = flaky
    attempts(fake, 0)
    fake.delay = 0.2
    try:
        with DecoderClient(target, timeout=1.0) as client, pytest.raises(AevaeError) as info:
            client.decode(np.zeros((100, 4), np.float32), dtype="float32")
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        fake.delay = 0.0


def test_a_stream_broken_midway_resumes_after_its_last_answer_for_the_same_version(flaky: tuple[Flaky, str]) -> None:
    """UNAVAILABLE after some answers (gRPC's own retries stop at the first answer): the client asks again for
    the messages not yet answered only, pinned to the version that answered, and returns every row."""
    fake, target = flaky
    attempts(fake, 0)
    z = np.arange(100 * 4, dtype=np.float32).reshape(100, 4)  # 10 messages of 10 rows
    fake.break_after, fake.streamed = [3, 2], []
    with DecoderClient(target, retries=3, backoff=0.01) as client:
        images = client.decode(z)
    assert np.array_equal(images[:, 0, 0], z[:, 0])
    # messages 0-2 answered and 3 refused; then 3-4 answered and 5 refused; then 5-9: none answered twice
    assert [rows for rows, _ in fake.streamed] == [10] * 12
    assert [version for _, version in fake.streamed][4:] == [7] * 8  # the version that answered first
    fake.break_after, fake.streamed = [3], []

    async def main() -> np.ndarray:
        async with AsyncDecoderClient(target, retries=3, backoff=0.01) as client:
            return await client.decode(z)

    assert np.array_equal(asyncio.run(main())[:, 0, 0], z[:, 0]) and len(fake.streamed) == 11  # 10 + 1 refused
    # before any answer gRPC retries the stream itself (3 retries: 4 attempts); past its budget the error surfaces
    fake.break_after, fake.streamed = [0] * 4, []
    with DecoderClient(target, retries=3, backoff=0.01) as client, pytest.raises(AevaeError) as info:
        client.decode(z)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "restarting" in info.value.details()
    assert len(fake.streamed) == 4
    fake.break_after = [3]  # retries=0 (a fan-out's replica: the fan-out fails over itself): no resumption
    with DecoderClient(target, retries=0) as client, pytest.raises(AevaeError) as info:
        client.decode(z)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    fake.break_after = []


def test_an_encode_stream_resumes_too_unless_its_sample_is_seeded(flaky: tuple[Flaky, str]) -> None:
    fake, target = flaky
    attempts(fake, 0)
    x = np.arange(40, dtype=np.uint8)[:, None, None] * np.ones((1, 28, 28), np.uint8)  # 28 x 28: 784 bytes
    fake.break_after, fake.streamed = [2], []
    with EncoderClient(target, retries=3, backoff=0.01) as client:
        result = client.encode(x)
    assert np.array_equal(result.mean[:, 0], np.arange(40)) and result.version == 7
    assert len(fake.streamed) == 41 and {v for _, v in fake.streamed[3:]} == {7}  # 40 answered, 1 refused
    fake.break_after = [2]  # a seeded sample cannot be redone in part: the error surfaces
    with EncoderClient(target, retries=3, backoff=0.01) as client, pytest.raises(AevaeError) as info:
        client.encode(x, sample=True, seed=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "if it serves TLS" not in info.value.details()  # it answered: no credentials hint (it had one)
    fake.break_after = []


@pytest.fixture(scope="module")
def stalled() -> Iterator[list[str]]:
    """Two replicas that take every call and never answer it (until the module ends)."""
    release = threading.Event()

    def never(request: Any, context: grpc.ServicerContext) -> Any:
        release.wait(60)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    servers, addresses = [], []
    for _ in range(2):
        server = grpc.server(futures.ThreadPoolExecutor(16))
        handlers = {name: grpc.unary_unary_rpc_method_handler(never) for name in ("ListModels", "Decode")}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("aevae.v1.Decoder", handlers),))
        addresses.append(f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}")
        server.start()
        servers.append(server)
    yield addresses
    release.set()
    for server in servers:
        server.stop(0)


def test_a_fan_out_call_has_one_total_deadline_whatever_its_failovers(stalled: list[str]) -> None:
    """Before, each replica attempt got the whole timeout again, round after round, with backoffs between:
    timeout=1 took 9.5 s over two stalled replicas."""
    z = np.zeros((3, 4), np.float32)
    with DecoderClient(stalled, timeout=1.0, retries=3) as client:
        for call in (client.list_models, lambda: client.decode(z)):
            started = time.monotonic()
            with pytest.raises(AevaeError) as error:
                call()
            assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2.5

    async def async_call() -> float:
        async with AsyncDecoderClient(stalled, timeout=1.0, retries=3) as aclient:
            started = time.monotonic()
            with pytest.raises(AevaeError, match="DEADLINE_EXCEEDED"):
                await aclient.decode(z)
            return time.monotonic() - started

    assert asyncio.run(async_call()) < 2.5
