"""aevae.v1.Encoder over gRPC: request -> validation -> batch -> model -> response."""

from __future__ import annotations

import asyncio
from contextlib import aclosing
from typing import Any, AsyncIterator

import grpc
import numpy as np

from aevae.errors import FailedPrecondition, shorten
from aevae.services.admission import Engine
from aevae.services.batching import Batcher
from aevae.services.encoder import Encoded, EncodeJob, EncoderLogic
from aevae.services.listing import ListsModels
from aevae.services.registration import readable, request_array, rows
from aevae.services.status import guarded
from aevae.services.streams import Reply, served_stream
from aevae.v1 import encoder_pb2, tensor_pb2
from aevae.v1.tensors import to_tensor, version_from_wire


class EncoderServicer(ListsModels):
    """Registered by registration.register (its request parsing), so it needs no generated base class."""

    def __init__(self, logic: EncoderLogic, engine: Engine):
        self.logic = logic
        self.engine = engine
        self.batcher: Batcher[EncodeJob, Encoded] = Batcher.of_jobs(logic.run, engine)

    async def _encode(self, request: encoder_pb2.EncodeRequest, noise: np.random.Generator | None,
                      unary: bool = False) -> Reply:
        """One message: validated on its own, then encoded together with whatever else is waiting (a unary
        call's, on a busy server, waiting a moment for others: Batcher.submit)."""
        with self.engine.admission.hold(request.ByteSize()):
            version = version_from_wire(request.version)
            images = request_array(request, "images")
            job = await self.engine.run(lambda: self.logic.prepare(request.model, version, images, noise),
                                        rows(images), self.logic.ready(request.model, version))
            async with self.engine.answered(self.batcher, job, unary) as out:
                response = encoder_pb2.EncodeResponse(model=out.model, version=out.version, mean=to_tensor(out.mean))
                if out.logvar is not None:
                    response.logvar.CopyFrom(to_tensor(out.logvar))
                if out.sample is not None:
                    response.sample.CopyFrom(to_tensor(out.sample))
        return Reply(out.model, out.version, response, out.content)

    async def Encode(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.EncodeResponse:
        async def call() -> encoder_pb2.EncodeResponse:
            with self.engine.admission.call():
                message = readable(request)
                return (await self._encode(message, _noise(message), unary=True)).response

        return await guarded(context, call())

    async def EncodeStream(self, request_iterator: AsyncIterator[Any],
                           context: grpc.aio.ServicerContext) -> AsyncIterator[encoder_pb2.EncodeResponse]:
        # One generator for the whole stream, seeded by the first message that asks for a sample, drawn from
        # in message order (a message samples only after the one before it has finished, and a batch runs its
        # jobs in order), so that the sample does not depend on how the client split the batch.
        state: dict[str, np.random.Generator | None] = {}
        order = InOrder()

        async def submit(index: int, request: encoder_pb2.EncodeRequest) -> Reply:
            if not request.sample:
                order.pass_on(index)
                return await self._encode(request, None)
            await order.turn(index)
            try:
                if "noise" not in state:
                    state["noise"] = _noise(request)
                return await self._encode(request, state["noise"])
            finally:
                order.done(index)

        async with aclosing(served_stream(context, self.engine.admission, request_iterator, submit,
                                          self.engine.stream_depth)) as responses:
            async for response in responses:  # closed with this one: its budget is given back at once
                yield response

    async def GetLatentStats(self, request: Any, context: grpc.aio.ServicerContext) -> encoder_pb2.LatentStats:
        async def work() -> encoder_pb2.LatentStats:
            message = readable(request)
            version = version_from_wire(message.version)
            name, number, stats = await self.engine.run(lambda: self.logic.latent_stats(message.model, version),
                                                        0, False)
            try:
                return latent_stats_message(name, number, stats)
            except (KeyError, TypeError, ValueError, AttributeError) as exc:  # checksummed, but not ours
                raise FailedPrecondition(f"the latent statistics of {name}/{number} are malformed "
                                         f"({type(exc).__name__}: {shorten(str(exc))})") from None

        return await guarded(context, work())


class InOrder:
    """Turns taken in message order, whatever order the messages' handlers happen to run in (a handler that
    finds its predecessor already done does not yield to it, so a lock alone does not keep the order).

    Message i takes its turn once message i-1 is `done`; a message that needs no turn `pass_on`s, which
    counts as done as soon as its predecessor is."""

    def __init__(self) -> None:
        self._done: dict[int, asyncio.Future[None]] = {}

    def _future(self, index: int) -> asyncio.Future[None]:
        if index not in self._done:
            self._done[index] = asyncio.get_running_loop().create_future()
        return self._done[index]

    async def turn(self, index: int) -> None:
        if index > 0:
            await asyncio.shield(self._future(index - 1))

    def done(self, index: int) -> None:
        future = self._future(index)
        if not future.done():
            future.set_result(None)
        self._done.pop(index - 1, None)  # nobody else waits for the one before

    def pass_on(self, index: int) -> None:
        if index == 0:
            self.done(0)
        else:
            self._future(index - 1).add_done_callback(lambda _: self.done(index))


def _noise(request: encoder_pb2.EncodeRequest) -> np.random.Generator | None:
    if not request.sample:
        return None
    return np.random.default_rng(request.seed if request.HasField("seed") else None)


def latent_stats_message(name: str, version: int, stats: dict[str, Any]) -> encoder_pb2.LatentStats:
    """latent_stats.json, typed; 2-D arrays travel as float32 Tensors."""
    pca = stats.get("pca") or {}

    def matrix(key: str) -> tensor_pb2.Tensor:
        return to_tensor(np.asarray(pca.get(key, []), dtype=np.float32))

    return encoder_pb2.LatentStats(
        model=name,
        version=version,
        count=int(stats.get("count", 0)),
        latent_dim=int(stats.get("latent_dim", 0)),
        source=str(stats.get("source", "")),
        dims=[
            encoder_pb2.DimStats(
                min=d["min"], max=d["max"], mean=d["mean"], std=d["std"],
                quantiles={str(k): float(v) for k, v in d.get("quantiles", {}).items()},
                grid=d.get("grid", []), density=d.get("density", []),
            )
            for d in stats.get("dims", [])
        ],
        pca=encoder_pb2.Pca(
            mean=pca.get("mean", []),
            components=matrix("components"),
            explained_variance_ratio=pca.get("explained_variance_ratio", []),
            points=matrix("points"),
            labels=[int(x) for x in pca.get("labels", [])],
            latents=matrix("latents"),
        ),
    )
