"""The channel, retries, timeouts, health and server limits that both clients share, sync and async."""

from __future__ import annotations

from typing import Any

import grpc

from aevae.client import health
from aevae.client.core import CHANNEL_OPTIONS, Retry, ServerLimits
from aevae.client.metadata import Metadata, async_interceptors, sync_channel
from aevae.client.results import ModelInfo, model_infos
from aevae.v1 import tensor_pb2


class _Common:
    SERVICE = ""  # the aevae.v1 service name, "Encoder" or "Decoder"

    def __init__(self, target: str, timeout: float | None, retries: int, backoff: float, stream_chunk: int):
        """`timeout` (seconds) bounds each request message: a streamed call gets timeout x its messages."""
        self.target = target
        self.timeout = timeout
        self.stream_chunk = stream_chunk
        self._retry = Retry(retries, backoff)
        self._limits: ServerLimits | None = None

    def _deadline(self, timeout: float | None, messages: int = 1) -> float | None:
        budget = self.timeout if timeout is None else timeout
        return None if budget is None else budget * max(1, messages)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


class SyncClient(_Common):
    def __init__(self, target: str, timeout: float | None = 30.0, retries: int = 3, backoff: float = 0.1,
                 stream_chunk: int = 4096, metadata: Metadata = ()):
        """`metadata` goes with every call, e.g. [("application", "decoder")] for Ray Serve's gRPC proxy."""
        super().__init__(target, timeout, retries, backoff, stream_chunk)
        self._raw_channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self._channel = sync_channel(self._raw_channel, metadata)
        self._stub: Any = self._make_stub(self._channel)

    def _make_stub(self, channel: grpc.Channel) -> Any:
        raise NotImplementedError

    def _list_models_response(self, timeout: float | None) -> tensor_pb2.ListModelsResponse:
        response = self._retry(lambda: self._stub.ListModels(tensor_pb2.ListModelsRequest(),
                                                             timeout=self._deadline(timeout)))
        self._limits = ServerLimits.from_response(response)
        return response

    def _server_limits(self) -> ServerLimits:
        if self._limits is None:
            self._list_models_response(None)
        assert self._limits is not None
        return self._limits

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return model_infos(self._list_models_response(timeout))

    def health(self, *, timeout: float | None = None) -> str:
        """"SERVING" or "NOT_SERVING"; AevaeError (UNAVAILABLE) when the server cannot be reached."""
        return self._retry(lambda: health.check(self._channel, self._deadline(timeout), self.SERVICE), retries=0)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Common):
    def __init__(self, target: str, timeout: float | None = 30.0, retries: int = 3, backoff: float = 0.1,
                 stream_chunk: int = 4096, metadata: Metadata = ()):
        super().__init__(target, timeout, retries, backoff, stream_chunk)
        self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS,
                                                  interceptors=async_interceptors(metadata))
        self._stub: Any = self._make_stub(self._channel)

    def _make_stub(self, channel: grpc.aio.Channel) -> Any:
        raise NotImplementedError

    async def _list_models_response(self, timeout: float | None) -> tensor_pb2.ListModelsResponse:
        response = await self._retry.run_async(
            lambda: self._stub.ListModels(tensor_pb2.ListModelsRequest(), timeout=self._deadline(timeout)))
        self._limits = ServerLimits.from_response(response)
        return response

    async def _server_limits(self) -> ServerLimits:
        if self._limits is None:
            await self._list_models_response(None)
        assert self._limits is not None
        return self._limits

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        return model_infos(await self._list_models_response(timeout))

    async def health(self, *, timeout: float | None = None) -> str:
        return await self._retry.run_async(lambda: health.check_async(self._channel, self._deadline(timeout), self.SERVICE),
                                           retries=0)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
