"""Retries by gRPC itself: the client's service config retries UNAVAILABLE (and nothing else) up to its
budget, every failure surfaces as AevaeError, and a stream's deadline is one total deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent import futures
from typing import Any, Iterator

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError, AsyncDecoderClient, DecoderClient
from aevae.client.core import service_config
from aevae.v1 import decoder_pb2, tensor_pb2
from aevae.v1.tensors import to_tensor


class Flaky:
    """A fake aevae.v1.Decoder: ListModels fails with `code` `failures` times, then answers; DecodeStream
    answers each message after `delay` seconds."""

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.code = grpc.StatusCode.UNAVAILABLE
        self.delay = 0.0
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
        for request in requests:
            time.sleep(self.delay)
            n = request.latents.shape[0]
            yield decoder_pb2.DecodeResponse(model="vae", version=1, images=to_tensor(np.zeros((n, 2, 2), np.float32)))


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
