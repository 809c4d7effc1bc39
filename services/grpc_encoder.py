"""aevae.v1.Encoder over gRPC: request -> validation -> model (off the event loop) -> response."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

import grpc
import numpy as np

from aevae.services.encoder import EncoderLogic
from aevae.services.grpc_common import Runner, guarded, models_response, served_stream
from aevae.v1 import encoder_pb2, encoder_pb2_grpc, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor, version_from_wire


class EncoderServicer(encoder_pb2_grpc.EncoderServicer):
    def __init__(self, logic: EncoderLogic, run: Runner, stream_depth: int = 2):
        self.logic = logic
        self.run = run
        self.stream_depth = stream_depth

    def _encode(
        self, request: encoder_pb2.EncodeRequest, version: int | None, noise: np.random.Generator | None
    ) -> encoder_pb2.EncodeResponse:
        images = from_tensor(request.images, "images")
        out = self.logic.encode(request.model, version, images, noise)
        response = encoder_pb2.EncodeResponse(model=out.model, version=out.version, mean=to_tensor(out.mean))
        if out.logvar is not None:
            response.logvar.CopyFrom(to_tensor(out.logvar))
        if out.sample is not None:
            response.sample.CopyFrom(to_tensor(out.sample))
        return response

    async def _submit(
        self, request: encoder_pb2.EncodeRequest, noise: np.random.Generator | None
    ) -> encoder_pb2.EncodeResponse:
        version = version_from_wire(request.version)
        n = request.images.shape[0] if request.images.shape else 0
        return await self.run(lambda: self._encode(request, version, noise), n,
                              self.logic.ready(request.model, version))

    async def Encode(self, request: encoder_pb2.EncodeRequest, context: grpc.aio.ServicerContext):
        return await guarded(context, self._submit(request, _noise(request)))

    async def EncodeStream(
        self, request_iterator: AsyncIterator[encoder_pb2.EncodeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[encoder_pb2.EncodeResponse]:
        # One generator for the whole stream, seeded by the first message that asks for a sample, drawn from
        # in message order (handlers start in order and the lock is FIFO), so that the sample does not depend
        # on how the client split the batch.
        state: dict[str, np.random.Generator | None] = {}
        lock = asyncio.Lock()

        async def submit(index: int, request: encoder_pb2.EncodeRequest) -> encoder_pb2.EncodeResponse:
            if not request.sample:
                return await self._submit(request, None)
            if "noise" not in state:
                state["noise"] = _noise(request)
            async with lock:
                return await self._submit(request, state["noise"])

        async for response in served_stream(context, request_iterator, submit, self.stream_depth):
            yield response

    async def ListModels(self, request: tensor_pb2.ListModelsRequest, context: grpc.aio.ServicerContext):
        summaries = await guarded(context, self.run(self.logic.list_models, 0, False))
        return models_response(summaries, self.logic.limits)

    async def GetLatentStats(self, request: encoder_pb2.GetLatentStatsRequest, context: grpc.aio.ServicerContext):
        async def work() -> tuple[str, int, dict[str, Any]]:
            version = version_from_wire(request.version)
            return await self.run(lambda: self.logic.latent_stats(request.model, version), 0, False)

        name, number, stats = await guarded(context, work())
        return latent_stats_message(name, number, stats)


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
