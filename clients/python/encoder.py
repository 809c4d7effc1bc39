"""EncoderClient and AsyncEncoderClient: images in, latents out, plus the models' latent statistics.

A batch that fits one message goes as one Encode call; a bigger one streams through EncodeStream in chunks.
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

import grpc
import numpy as np

from aevae.client import fanout
from aevae.client.base import AsyncClient, SyncClient
from aevae.client.core import ServerLimits, prepare_images, spans, wire_version
from aevae.client.errors import AevaeError, bad_answer, invalid
from aevae.client.results import EncodeResult, latent_stats
from aevae.v1 import encoder_pb2, encoder_pb2_grpc
from aevae.v1.tensors import WireError, from_tensor, to_tensor

FIELDS: tuple[Literal["mean", "logvar", "sample"], ...] = ("mean", "logvar", "sample")
RESPONSE_ROW = 3 * 64 * 4  # mean, log-variance and sample of up to 64 float32 dimensions


class _Plan:
    def __init__(self, images: object, model: str, version: int | None, sample: bool, seed: int | None,
                 limits: ServerLimits, stream_chunk: int):
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise invalid(f"seed: expected None or a non-negative integer, got {seed!r}")
        self.x = prepare_images(images)
        self.model = model
        self.version = wire_version(version)
        self.sample = bool(sample)
        self.seed = None if seed is None else int(seed)
        n = len(self.x) if self.x.ndim else 0
        row = max(RESPONSE_ROW, self.x[:1].nbytes)
        self.unary = self.x.ndim != 3 or n <= limits.rows(row)
        self.spans = [(0, n)] if self.unary else list(spans(n, limits.rows(row, stream_chunk)))
        self.parts: list[encoder_pb2.EncodeResponse] = []
        self._width: tuple[int, ...] | None = None  # the latent width of the first response read

    def request(self, start: int, stop: int, first: bool = True) -> encoder_pb2.EncodeRequest:
        request = encoder_pb2.EncodeRequest(
            model=self.model, version=self.version, sample=self.sample,
            images=to_tensor(self.x if self.unary else self.x[start:stop]),
        )
        if self.seed is not None and first:
            request.seed = self.seed
        return request

    @property
    def resumable(self) -> bool:
        """A seeded sample is not: one generator draws the whole stream's noise, so a part cannot be redone."""
        return not (self.sample and self.seed is not None)

    def progress(self) -> int:
        """The answers a resumption would keep (none for a seeded sample: its error surfaces)."""
        return len(self.parts) if self.resumable else 0

    def requests(self) -> Iterator[encoder_pb2.EncodeRequest]:
        """The messages not yet answered: all of them, or after a broken stream those after its last answer,
        for the version that answered."""
        if not self.resumable:
            self.parts = []
        if self.parts:
            self.version = self.version or int(self.parts[0].version)
        for i, (start, stop) in enumerate(self.spans[len(self.parts):], start=len(self.parts)):
            yield self.request(start, stop, first=i == 0)

    def _part(self, response: encoder_pb2.EncodeResponse, name: str, index: int) -> np.ndarray:
        """One response's `name`, checked: float32, one row per image of its span, as wide as the first read
        (the mean, the log-variance and the sample all have the model's latent width)."""
        try:
            array = from_tensor(getattr(response, name), name)
        except WireError as exc:
            raise bad_answer(f"response {index}: {exc}") from None
        start, stop = self.spans[index]
        width = self._width or array.shape[1:]
        if array.dtype != np.float32 or array.ndim != 2 or len(array) != stop - start or array.shape[1:] != width:
            raise bad_answer(f"response {index}: {name} is {array.dtype} of shape {list(array.shape)}; expected "
                             f"{stop - start} rows of float32, each {list(width)}")
        self._width = width
        return array

    def result(self, parts: list[encoder_pb2.EncodeResponse]) -> EncodeResult:
        if len(parts) != len(self.spans):
            raise AevaeError(grpc.StatusCode.INTERNAL,
                             f"the stream ended after {len(parts)} of {len(self.spans)} responses")
        arrays: dict[str, np.ndarray | None] = {}
        for name in FIELDS:
            present = [self._part(p, name, i) for i, p in enumerate(parts) if p.HasField(name)]
            arrays[name] = np.concatenate(present) if len(present) == len(parts) else None
        if arrays["mean"] is None:
            raise bad_answer("a response carried no mean")
        return EncodeResult(mean=arrays["mean"], logvar=arrays["logvar"], sample=arrays["sample"],
                            model=parts[0].model, version=int(parts[0].version))


class EncoderClient(SyncClient):
    """`with EncoderClient("localhost:50051") as enc: z = enc.encode(images).mean`."""

    SERVICE = "Encoder"

    def _make_stub(self, channel: grpc.Channel) -> Any:
        return encoder_pb2_grpc.EncoderStub(channel)

    def encode(self, images: object, model: str = "vae", version: int | None = None, sample: bool = False,
               seed: int | None = None, *, timeout: float | None = None) -> EncodeResult:
        """N x 32 x 32 or N x 28 x 28 images (or one 2-D image), uint8 0..255 or float32 in [0, 1]."""
        if self._fanout is not None:
            return fanout.encode(self._fanout, images, model, version, sample, seed, timeout, self.stream_chunk)
        plan = _Plan(images, model, version, sample, seed, self._server_limits(), self.stream_chunk)
        deadline = self._deadline(timeout, len(plan.spans))
        if plan.unary:
            response = self._retry(lambda: self._stub.Encode(plan.request(*plan.spans[0]), timeout=deadline))
            return plan.result([response])

        def stream(remaining: float | None) -> EncodeResult:
            # resumed: wait for the server to be back (within the deadline; with none, fail at once)
            resumed = plan.progress() > 0 and remaining is not None
            for response in self._stub.EncodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.parts.append(response)  # kept if the stream breaks: a resumption starts after it
            return plan.result(plan.parts)

        return self._retry.resumable(stream, plan.progress, deadline)

    def latent_stats(self, model: str = "vae", version: int | None = None, *,
                     timeout: float | None = None) -> dict[str, Any]:
        """latent_stats.json of the model version (violins, quantiles, ranges, PCA), plus "model", "version"."""
        if self._fanout is not None:
            return self._fanout.first(lambda client: client.latent_stats(model, version, timeout=timeout))
        request = encoder_pb2.GetLatentStatsRequest(model=model, version=wire_version(version))
        return latent_stats(self._retry(lambda: self._stub.GetLatentStats(request, timeout=self._deadline(timeout))))


class AsyncEncoderClient(AsyncClient):
    """The asyncio twin of EncoderClient: the same methods, as coroutines."""

    SERVICE = "Encoder"

    def _make_stub(self, channel: grpc.aio.Channel) -> Any:
        return encoder_pb2_grpc.EncoderStub(channel)

    async def encode(self, images: object, model: str = "vae", version: int | None = None, sample: bool = False,
                     seed: int | None = None, *, timeout: float | None = None) -> EncodeResult:
        if self._fanout is not None:
            return await fanout.encode_async(self._fanout, images, model, version, sample, seed, timeout,
                                             self.stream_chunk)
        plan = _Plan(images, model, version, sample, seed, await self._server_limits(), self.stream_chunk)
        deadline = self._deadline(timeout, len(plan.spans))
        if plan.unary:
            response = await self._retry.run_async(
                lambda: self._stub.Encode(plan.request(*plan.spans[0]), timeout=deadline))
            return plan.result([response])

        async def stream(remaining: float | None) -> EncodeResult:
            resumed = plan.progress() > 0 and remaining is not None
            async for response in self._stub.EncodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.parts.append(response)
            return plan.result(plan.parts)

        return await self._retry.resumable_async(stream, plan.progress, deadline)

    async def latent_stats(self, model: str = "vae", version: int | None = None, *,
                           timeout: float | None = None) -> dict[str, Any]:
        if self._fanout is not None:
            return await self._fanout.first(lambda client: client.latent_stats(model, version, timeout=timeout))
        request = encoder_pb2.GetLatentStatsRequest(model=model, version=wire_version(version))
        return latent_stats(await self._retry.run_async(
            lambda: self._stub.GetLatentStats(request, timeout=self._deadline(timeout))))
