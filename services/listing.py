"""ListModels' answer for aevae.v1's Encoder and Decoder: the repository's models (their versions, the broken
ones with the reason) and the server's per-message limits, built in one place so that the two cannot drift."""

from __future__ import annotations

from aevae.services.settings import Limits
from aevae.store import ModelSummary
from aevae.v1 import tensor_pb2


def models_response(summaries: list[ModelSummary], limits: Limits) -> tensor_pb2.ListModelsResponse:
    return tensor_pb2.ListModelsResponse(
        models=[
            tensor_pb2.ModelInfo(
                name=s.name, version=s.number, versions=s.numbers, kind=s.kind, latent_dim=s.latent_dim,
                image_shape=list(s.image_shape), metrics=s.metrics, runtime=s.runtime,
                broken=[tensor_pb2.BrokenVersion(version=n, reason=r) for n, r in s.broken.items()],
            )
            for s in summaries
        ],
        limits=tensor_pb2.Limits(max_message_bytes=limits.max_message_bytes, max_batch=limits.max_batch),
    )
