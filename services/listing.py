"""ListModels for aevae.v1's Encoder and Decoder: the repository's models (their versions, the broken ones with
the reason) and the server's per-message limits, answered in one place so that the two cannot drift; and the
fitting of a listing into the largest message the server sends, which the Open Inference Protocol's
RepositoryIndex shares."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import grpc
from google.protobuf.message import Message

from aevae.errors import ResourceExhausted
from aevae.services.admission import Engine
from aevae.services.registration import parsed
from aevae.services.settings import Limits
from aevae.services.status import guarded
from aevae.store import ModelSummary
from aevae.v1 import tensor_pb2

M = TypeVar("M", bound=Message)


class ListsModels:
    """The ListModels method both servicers share; they hold `logic` (with `list_models` and `limits`) and the
    `engine` it runs on."""

    logic: Any
    engine: Engine

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> tensor_pb2.ListModelsResponse:
        # The request has no fields, but bytes that are no ListModelsRequest are refused like any other
        # method's, rather than answered as if they were one.
        await guarded(context, parsed(request))
        limits = self.logic.limits

        def answer() -> tensor_pb2.ListModelsResponse:  # off the event loop: a scan may read the disk
            summaries = self.logic.list_models()
            return fitted(lambda reasons: models_response(summaries, limits, reasons), len(summaries),
                          limits.max_message_bytes)

        return await guarded(context, self.engine.run(answer, 0, False))


def models_response(summaries: list[ModelSummary], limits: Limits,
                    reasons: bool = True) -> tensor_pb2.ListModelsResponse:
    return tensor_pb2.ListModelsResponse(
        models=[
            tensor_pb2.ModelInfo(
                name=s.name, version=s.number, versions=s.numbers, kind=s.kind, latent_dim=s.latent_dim,
                image_shape=list(s.image_shape), metrics=s.metrics, runtime=s.runtime,
                broken=[tensor_pb2.BrokenVersion(version=n, reason=r if reasons else "")
                        for n, r in s.listed_broken()],
                broken_count=len(s.broken),
            )
            for s in summaries
        ],
        limits=tensor_pb2.Limits(max_message_bytes=limits.max_message_bytes, max_batch=limits.max_batch),
    )


def fitted(listing: Callable[[bool], M], models: int, max_message_bytes: int) -> M:
    """A listing of the repository (ListModels, the Open Inference Protocol's RepositoryIndex) that the server
    can send: `listing(True)`, with the broken versions' reasons, if it fits in max_message_bytes; if not,
    `listing(False)`, their numbers without the reasons (up to store.REASON_MAX characters each, which a few
    hundred broken versions took past a small --max-message-bytes: the call failed with gRPC's "Sent message
    larger than max", and the Python client, which lists first, with it); RESOURCE_EXHAUSTED naming the setting
    if even that does not fit. The log names every broken version with its reason."""
    answer = listing(True)
    if answer.ByteSize() > max_message_bytes:
        answer = listing(False)
    size = answer.ByteSize()
    if size > max_message_bytes:
        raise ResourceExhausted(f"the listing of {models} models takes {size} bytes, over this server's "
                                f"--max-message-bytes of {max_message_bytes}: start it with a larger one")
    return answer
