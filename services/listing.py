"""ListModels for aevae.v1's Encoder and Decoder: the repository's models (their versions, the broken ones with
the reason) and the server's per-message limits, answered in one place so that the two cannot drift."""

from __future__ import annotations

from typing import Any

import grpc

from aevae.services.admission import Engine
from aevae.services.registration import parsed
from aevae.services.settings import Limits
from aevae.services.status import guarded
from aevae.store import ModelSummary
from aevae.v1 import tensor_pb2


class ListsModels:
    """The ListModels method both servicers share; they hold `logic` (with `list_models` and `limits`) and the
    `engine` it runs on."""

    logic: Any
    engine: Engine

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> tensor_pb2.ListModelsResponse:
        # The request has no fields, but bytes that are no ListModelsRequest are refused like any other
        # method's, rather than answered as if they were one.
        await guarded(context, parsed(request))
        summaries = await guarded(context, self.engine.run(self.logic.list_models, 0, False))
        return models_response(summaries, self.logic.limits)


def models_response(summaries: list[ModelSummary], limits: Limits) -> tensor_pb2.ListModelsResponse:
    return tensor_pb2.ListModelsResponse(
        models=[
            tensor_pb2.ModelInfo(
                name=s.name, version=s.number, versions=s.numbers, kind=s.kind, latent_dim=s.latent_dim,
                image_shape=list(s.image_shape), metrics=s.metrics, runtime=s.runtime,
                broken=[tensor_pb2.BrokenVersion(version=n, reason=r) for n, r in s.listed_broken()],
                broken_count=len(s.broken),
            )
            for s in summaries
        ],
        limits=tensor_pb2.Limits(max_message_bytes=limits.max_message_bytes, max_batch=limits.max_batch),
    )
