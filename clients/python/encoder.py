"""EncoderClient and AsyncEncoderClient: images in, latents out, plus the models' latent statistics.

A batch that fits one message goes as one Encode call; a bigger one streams through EncodeStream in chunks.
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Literal

import grpc
import numpy as np

from aevae.client import fanout
from aevae.client.base import AsyncClient, SyncClient
from aevae.client.core import (ServerLimits, bulk_stub, located, model_name, prepare_images, restarts_big,
                               spans, wire_version)
from aevae.client.errors import AevaeError, bad_answer, invalid
from aevae.client.results import EncodeResult, latent_stats
from aevae.v1 import encoder_pb2, encoder_pb2_grpc
from aevae.v1.tensors import WireError, from_tensor, to_tensor

FIELDS: tuple[Literal["mean", "logvar", "sample"], ...] = ("mean", "logvar", "sample")
MAX_SEED = 2 ** 64 - 1  # the request's seed is a uint64


class _Plan:
    def __init__(self, images: object, model: str, version: int | None, sample: bool, seed: int | None,
                 limits: ServerLimits, stream_chunk: int):
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                                 or not 0 <= seed <= MAX_SEED):
            raise invalid(f"seed: expected None or a whole number from 0 to 2**64 - 1, got {seed!r}")
        if not isinstance(sample, (bool, np.bool_)):  # sample="no" is truthy: it asked for a sample
            raise invalid(f"sample: expected True or False, got {sample!r}")
        self.x = prepare_images(images)
        self.model = model
        self.version = wire_version(version)
        self.sample = bool(sample)
        self.seed = None if seed is None else int(seed)
        n = len(self.x) if self.x.ndim else 0
        # an answer's row: the mean, the log-variance and the sample, float32, of the model's latent width
        row = max(3 * 4 * limits.latent_dim(model), self.x[:1].nbytes)
        self.unary = self.x.ndim != 3 or n <= limits.rows(row)
        self.spans = [(0, n)] if self.unary else list(spans(n, limits.rows(row, stream_chunk)))
        self.parts: list[encoder_pb2.EncodeResponse] = []
        self.first = 0  # the first message of the latest attempt: the one the server calls "message 0"
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
        self.first = len(self.parts)
        for i, (start, stop) in enumerate(self.spans[len(self.parts):], start=len(self.parts)):
            yield self.request(start, stop, first=i == 0)

    def located(self, error: AevaeError) -> AevaeError:
        return located(error, self.spans, self.first, "images", len(self.parts))

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

    def add(self, response: "encoder_pb2.EncodeResponse | AevaeError") -> None:
        """A response received: kept if it is for the model and version asked for (or the version the first
        answer pinned); the reason it cannot be read, or why it is not what was asked, is raised."""
        if isinstance(response, AevaeError):
            raise response
        index = len(self.parts)
        version = self.version or (int(self.parts[0].version) if self.parts else 0)
        if response.model != self.model or (version and int(response.version) != version):
            asked = f"{self.model!r} version {version}" if version else repr(self.model)
            raise bad_answer(f"response {index} is from model {response.model!r} version {response.version}; "
                             f"asked for {asked}")
        self.parts.append(response)

    def result(self, parts: list[encoder_pb2.EncodeResponse]) -> EncodeResult:
        """The parts put together: each answer carries a mean, a sample when one was asked for, and either
        all or none carry a log-variance (a VAE's, or an AE's that has none)."""
        if len(parts) != len(self.spans):
            raise AevaeError(grpc.StatusCode.INTERNAL,
                             f"the stream ended after {len(parts)} of {len(self.spans)} responses")
        arrays: dict[str, np.ndarray | None] = {}
        for name in FIELDS:
            present = [self._part(p, name, i) for i, p in enumerate(parts) if p.HasField(name)]
            required = name == "mean" or (name == "sample" and self.sample)
            if (required or present) and len(present) != len(parts):
                missing = next(i for i, p in enumerate(parts) if not p.HasField(name))
                raise bad_answer(f"response {missing} carries no {name}"
                                 + ("" if required else f", which {len(present)} of {len(parts)} carry"))
            arrays[name] = np.concatenate(present) if present else None
        assert arrays["mean"] is not None
        return EncodeResult(mean=arrays["mean"], logvar=arrays["logvar"], sample=arrays["sample"],
                            model=parts[0].model, version=int(parts[0].version))


def _stub(channel: Any) -> Any:
    return bulk_stub(channel, encoder_pb2_grpc.EncoderStub(channel), "Encode", encoder_pb2.EncodeRequest,
                     encoder_pb2.EncodeResponse.FromString)


class EncoderClient(SyncClient):
    """`with EncoderClient("localhost:50051") as enc: z = enc.encode(images).mean`."""

    SERVICE = "Encoder"

    def _make_stub(self, channel: grpc.Channel) -> Any:
        return _stub(channel)

    def encode(self, images: object, model: str = "vae", version: int | None = None, sample: bool = False,
               seed: int | None = None, *, timeout: float | None = None) -> EncodeResult:
        """N x H x W images of the model's shape (or without its padding: 28 x 28 for 32 x 32), or one 2-D
        image; uint8 0..255 or float32 in [0, 1]. `seed` draws the noise of a sample (`sample=True`), the same
        for the same seed however the batch is split; without a sample the answer (the mean and, for a VAE,
        the log-variance) draws no noise, and a seed changes nothing."""
        model, images = model_name(model), prepare_images(images)  # refused before any call
        if self._fanout is not None:
            return fanout.encode(self._fanout, images, model, version, sample, seed, self._fanned(timeout),
                                 self.stream_chunk)
        started = time.monotonic()
        plan = _Plan(images, model, version, sample, seed, self._server_limits(timeout=timeout), self.stream_chunk)
        deadline = self._left(timeout, started)
        if plan.unary:
            plan.add(self._retry(lambda: self._stub.Encode(plan.request(*plan.spans[0]), timeout=deadline)))
            return plan.result(plan.parts)

        def stream(remaining: float | None) -> EncodeResult:
            # resumed: wait for the server to be back (within the deadline; with none, fail at once)
            resumed = plan.progress() > 0 and remaining is not None
            for response in self._stub.EncodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.add(response)  # kept if the stream breaks: a resumption starts after it
            return plan.result(plan.parts)

        return self._retry.resumable(stream, plan.progress, deadline, lambda: bool(plan.parts),
                                     restarts_big(plan.x.nbytes), locate=plan.located)

    def latent_stats(self, model: str = "vae", version: int | None = None, *,
                     timeout: float | None = None) -> dict[str, Any]:
        """latent_stats.json of the model version (violins, quantiles, ranges, PCA), plus "model", "version"."""
        model = model_name(model)
        if self._fanout is not None:
            return self._fanout.first(lambda client, t: client.latent_stats(model, version, timeout=t),
                                      self._fanned(timeout))
        request = encoder_pb2.GetLatentStatsRequest(model=model, version=wire_version(version))
        return latent_stats(self._retry(lambda: self._stub.GetLatentStats(request, timeout=self._deadline(timeout))))


class AsyncEncoderClient(AsyncClient):
    """The asyncio twin of EncoderClient: the same methods, as coroutines."""

    SERVICE = "Encoder"

    def _make_stub(self, channel: grpc.aio.Channel) -> Any:
        return _stub(channel)

    async def encode(self, images: object, model: str = "vae", version: int | None = None, sample: bool = False,
                     seed: int | None = None, *, timeout: float | None = None) -> EncodeResult:
        """As EncoderClient.encode."""
        model, images = model_name(model), prepare_images(images)
        if self._fanout is not None:
            return await fanout.encode_async(self._fanout, images, model, version, sample, seed,
                                             self._fanned(timeout), self.stream_chunk)
        started = time.monotonic()
        plan = _Plan(images, model, version, sample, seed, await self._server_limits(timeout=timeout),
                     self.stream_chunk)
        deadline = self._left(timeout, started)
        if plan.unary:
            plan.add(await self._retry.run_async(
                lambda: self._stub.Encode(plan.request(*plan.spans[0]), timeout=deadline)))
            return plan.result(plan.parts)

        async def stream(remaining: float | None) -> EncodeResult:
            resumed = plan.progress() > 0 and remaining is not None
            async for response in self._stub.EncodeStream(plan.requests(), timeout=remaining, wait_for_ready=resumed):
                plan.add(response)
            return plan.result(plan.parts)

        return await self._retry.resumable_async(stream, plan.progress, deadline, lambda: bool(plan.parts),
                                                  restarts_big(plan.x.nbytes), locate=plan.located)

    async def latent_stats(self, model: str = "vae", version: int | None = None, *,
                           timeout: float | None = None) -> dict[str, Any]:
        """As EncoderClient.latent_stats."""
        model = model_name(model)
        if self._fanout is not None:
            return await self._fanout.first(lambda client, t: client.latent_stats(model, version, timeout=t),
                                            self._fanned(timeout))
        request = encoder_pb2.GetLatentStatsRequest(model=model, version=wire_version(version))
        return latent_stats(await self._retry.run_async(
            lambda: self._stub.GetLatentStats(request, timeout=self._deadline(timeout))))
