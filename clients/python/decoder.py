"""DecoderClient and AsyncDecoderClient: latents in, N x H x W images out (the model's shape), for any N.

A batch that fits one message goes as one Decode call; a bigger one streams through DecodeStream in chunks,
and the responses, which come back in order, are written into one preallocated array. Responses are read
without copying their images (TensorResponse.parse views the received bytes), so each image is copied once:
into the output.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

import grpc
import numpy as np

from aevae import allocation
from aevae.client import fanout
from aevae.client.base import AsyncClient, SyncClient
from aevae.client.core import (ServerLimits, Unlisted, bulk_stub, model_name, output_dtype, prepare_latents,
                               located, reading, restarts_big, spans, wire_version)
from aevae.client.errors import AevaeError, bad_answer
from aevae.client.results import DecodeResult
from aevae.v1 import decoder_pb2, decoder_pb2_grpc
from aevae.v1.tensors import TensorResponse, to_tensor


class _Plan:
    """One decode call: how the batch is split, the request messages, and the assembly of the answer."""

    def __init__(self, latents: object, model: str, version: int | None, dtype: str, limits: ServerLimits,
                 stream_chunk: int):
        self.z = prepare_latents(latents)
        self.model = model
        self.version = wire_version(version)
        self.dtype = output_dtype(dtype)
        # What the server lists for this version of the model: a row of another width cannot be right, and
        # would only fail there (or, one row over the message size, with advice to split that cannot be
        # followed). Another version's shapes are not listed: the server checks those.
        listed = limits.listed(model, self.version)
        self.listed_version = limits.versions.get(model) if listed else None
        self.image_shape = listed[1] if listed and listed[1] else None
        if listed and self.z.ndim == 2 and self.z.shape[1] != listed[0]:
            raise Unlisted(grpc.StatusCode.INVALID_ARGUMENT,
                           f"latents: model {model!r} takes {listed[0]} values per row (N x {listed[0]}), got "
                           f"rows of {self.z.shape[1]}")
        width = self.z.shape[1] * 4 if self.z.ndim == 2 else 0
        row = max(width, limits.pixels(model) * self.dtype.itemsize)
        n = len(self.z) if self.z.ndim else 0
        self.unary = self.z.ndim != 2 or n <= limits.rows(row)
        self.spans = [(0, n)] if self.unary else list(spans(n, limits.rows(row, stream_chunk)))
        self.out: np.ndarray | None = None
        self.received = 0
        self.first = 0  # the first message of the latest attempt: the one the server calls "message 0"

    def request(self, start: int, stop: int) -> decoder_pb2.DecodeRequest:
        latents = self.z if self.unary else self.z[start:stop]
        return decoder_pb2.DecodeRequest(model=self.model, version=self.version, latents=to_tensor(latents),
                                         dtype=self.dtype.name)

    def requests(self) -> Iterator[decoder_pb2.DecodeRequest]:
        """The messages not yet answered: all of them, or after a broken stream those after its last answer."""
        self.first = self.received
        for start, stop in self.spans[self.received:]:
            yield self.request(start, stop)

    def _checked(self, response: TensorResponse | AevaeError, rows: int, which: str) -> TensorResponse:
        """The response, checked: `rows` images of the dtype asked for, of the model's shape (as ListModels
        lists it, else all of one shape), for the model and version asked for (or pinned by the first answer)."""
        if isinstance(response, AevaeError):
            raise response
        images = response.array
        shape = images.shape[1:] if self.out is None else self.out.shape[1:]
        if self.image_shape and response.version == self.listed_version:
            shape = self.image_shape
        if images.dtype != self.dtype or images.ndim != 3 or len(images) != rows or images.shape[1:] != shape:
            raise bad_answer(f"{which} holds {images.dtype} images of shape {list(images.shape)}; asked for {rows} "
                             f"of {self.dtype}, each {list(shape)}")
        if response.model != self.model or (self.version and response.version != self.version):
            asked = f"{self.model!r} version {self.version}" if self.version else repr(self.model)
            raise bad_answer(f"{which} is from model {response.model!r} version {response.version}; asked for "
                             f"{asked}")
        return response

    def unary_result(self, response: TensorResponse | AevaeError) -> DecodeResult:
        checked = self._checked(response, len(self.z), "the response")
        out = allocation.empty(checked.array.shape, checked.array.dtype)
        out[...] = checked.array
        return DecodeResult(out, self.model, int(checked.version))

    def add(self, response: TensorResponse | AevaeError) -> None:
        if self.received >= len(self.spans):
            raise bad_answer(f"the server sent more than {len(self.spans)} responses")
        start, stop = self.spans[self.received]
        checked = self._checked(response, stop - start, f"response {self.received}")
        images = checked.array
        if self.out is None:
            self.out = allocation.empty((len(self.z), *images.shape[1:]), images.dtype)
        self.out[start:stop] = images
        self.received += 1
        self.version = self.version or checked.version  # pinned: a resumed stream gets the same version

    def located(self, error: AevaeError) -> AevaeError:
        return located(error, self.spans, self.first, "latents", self.received)

    def result(self) -> DecodeResult:
        if self.received != len(self.spans) or self.out is None:
            raise AevaeError(grpc.StatusCode.INTERNAL,
                             f"the stream ended after {self.received} of {len(self.spans)} responses")
        return DecodeResult(self.out, self.model, int(self.version))  # pinned by the first answer


_parse = reading(TensorResponse.parse)  # the images read without copying them


def _stub(channel: Any) -> Any:
    return bulk_stub(channel, decoder_pb2_grpc.DecoderStub(channel), "Decode", decoder_pb2.DecodeRequest,
                     TensorResponse.parse)


class DecoderClient(SyncClient):
    """`with DecoderClient("localhost:50052") as dec: images = dec.decode(z)`."""

    SERVICE = "Decoder"

    def _make_stub(self, channel: grpc.Channel) -> Any:
        return _stub(channel)

    def decode(self, latents: object, model: str = "vae", version: int | None = None, dtype: str = "float32",
               *, timeout: float | None = None) -> np.ndarray:
        """N x d latents (or one d-vector) -> N x H x W images, float32 in [0, 1] or uint8."""
        return self.decode_result(latents, model, version, dtype, timeout=timeout).images

    def decode_result(self, latents: object, model: str = "vae", version: int | None = None,
                      dtype: str = "float32", *, timeout: float | None = None) -> DecodeResult:
        """As `decode`, with the model and the version that decoded the images (the newest when `version` is
        None: a version written during a session changes the images a latent gives)."""
        model, latents = model_name(model), prepare_latents(latents)  # refused before any call
        if self._fanout is not None:
            return fanout.decode(self._fanout, latents, model, version, dtype, self._fanned(timeout), self.stream_chunk)
        started = time.monotonic()
        try:
            plan = _Plan(latents, model, version, dtype, self._server_limits(timeout=timeout), self.stream_chunk)
        except Unlisted:  # asked again: a version written since may take these latents
            plan = _Plan(latents, model, version, dtype, self._server_limits(True, timeout), self.stream_chunk)
        deadline = self._left(timeout, started)
        if plan.unary:
            response = self._retry(lambda: self._stub.Decode(plan.request(*plan.spans[0]), timeout=deadline))
            return plan.unary_result(response)

        def stream(remaining: float | None) -> DecodeResult:
            # resumed: wait for the server to be back (within the deadline; with none, fail at once)
            resumed = plan.received > 0 and remaining is not None
            for response in self._stub.DecodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.add(response)
            return plan.result()

        return self._retry.resumable(stream, lambda: plan.received, deadline, restart=restarts_big(plan.z.nbytes),
                                     locate=plan.located)


class AsyncDecoderClient(AsyncClient):
    """The asyncio twin of DecoderClient: the same methods, as coroutines."""

    SERVICE = "Decoder"

    def _make_stub(self, channel: grpc.aio.Channel) -> Any:
        return _stub(channel)

    async def decode(self, latents: object, model: str = "vae", version: int | None = None,
                     dtype: str = "float32", *, timeout: float | None = None) -> np.ndarray:
        """As DecoderClient.decode."""
        return (await self.decode_result(latents, model, version, dtype, timeout=timeout)).images

    async def decode_result(self, latents: object, model: str = "vae", version: int | None = None,
                            dtype: str = "float32", *, timeout: float | None = None) -> DecodeResult:
        """As DecoderClient.decode_result."""
        model, latents = model_name(model), prepare_latents(latents)
        if self._fanout is not None:
            return await fanout.decode_async(self._fanout, latents, model, version, dtype, self._fanned(timeout),
                                             self.stream_chunk)
        started = time.monotonic()
        try:
            plan = _Plan(latents, model, version, dtype, await self._server_limits(timeout=timeout), self.stream_chunk)
        except Unlisted:
            plan = _Plan(latents, model, version, dtype, await self._server_limits(True, timeout), self.stream_chunk)
        deadline = self._left(timeout, started)
        if plan.unary:
            response = await self._retry.run_async(
                lambda: self._stub.Decode(plan.request(*plan.spans[0]), timeout=deadline))
            return plan.unary_result(response)

        async def stream(remaining: float | None) -> DecodeResult:
            resumed = plan.received > 0 and remaining is not None
            async for response in self._stub.DecodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.add(response)
            return plan.result()

        return await self._retry.resumable_async(stream, lambda: plan.received, deadline,
                                                  restart=restarts_big(plan.z.nbytes), locate=plan.located)
