"""aevae.v1.Encoder and aevae.v1.Decoder as Ray Serve deployments behind Serve's gRPC proxy.

The replicas run the same servicers as `aevae serve` (EncoderServicer / DecoderServicer over EncoderLogic /
DecoderLogic): validation, error messages, streams and seeds cannot drift between the two transports. What
Serve adds is replicas with autoscaling, and for the unary Decode, dynamic batching: small requests that
arrive together (one latent -> one image, the UI's drag loop) are merged into one forward pass.

Serve's proxy routes by the gRPC metadata ("application", "encoder" | "decoder"), so one port serves both.
Run it with `serve run deploy/serve/config.yaml` (see docs/deploy.md), or build an app in Python:
`serve.run(decoder({"models_dir": "models"}), name="decoder", route_prefix="/decoder")`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

import grpc
import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from aevae.errors import InvalidArgument, ServiceError
from aevae.services.decoder import Decoded, DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.services.grpc_common import Runner, guarded
from aevae.services.grpc_decoder import DecoderServicer
from aevae.services.grpc_encoder import EncoderServicer
from aevae.services.server import open_store
from aevae.services.settings import ServiceSettings
from aevae.v1 import decoder_pb2, encoder_pb2, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor, version_from_wire

DEFAULTS = ServiceSettings()

T = TypeVar("T")

# What Serve's gRPC proxy must register (gRPCOptions.grpc_servicer_functions, grpc_options in the config).
SERVICER_FUNCTIONS = [
    "aevae.v1.encoder_pb2_grpc.add_EncoderServicer_to_server",
    "aevae.v1.decoder_pb2_grpc.add_DecoderServicer_to_server",
]

# Defaults of both deployments; deploy/serve/config.yaml may override them per deployment.
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 16,
    "upscale_delay_s": 5,
    "downscale_delay_s": 60,
}
MAX_ONGOING_REQUESTS = 64  # >= the Decode batch size, so that a full batch can gather on one replica


class _Aborted(Exception):
    """The call failed; its status is already set on Serve's context.

    A unary call then returns an empty message (Serve's documented way to fail a gRPC call; raising would
    log a traceback per bad request). A stream lets it propagate: Serve sends a status set on the context
    only along with a message, but keeps the code and details of an exception raised after setting them."""


class _ServeContext:
    """The part of grpc.aio.ServicerContext that the servicers use (abort), over Ray Serve's gRPC context."""

    def __init__(self, context: RayServegRPCContext):
        self.context = context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.context.set_code(code)
        self.context.set_details(details)
        raise _Aborted(details)


async def _unary(context: RayServegRPCContext, call: Awaitable[T], empty: T) -> T:
    """A unary call: its response, or an empty message with the error status set on the context."""
    try:
        return await call
    except _Aborted:
        return empty


class _Replica:
    """What both deployments share: arguments, the model cache, and the executor the model runs in."""

    servicer: Any  # each deployment's own aevae.v1 servicer

    def __init__(self, args: dict[str, Any] | None):
        self.settings = ServiceSettings.from_mapping(args)
        self.store = open_store(self.settings)
        self.executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="aevae-serve")
        self.run = Runner(self.executor, self.settings.inline_max)

    def __del__(self) -> None:
        self.executor.shutdown(wait=False)

    # Both services answer ListModels alike; `self.servicer` is each deployment's own servicer.
    async def ListModels(self, request: tensor_pb2.ListModelsRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.ListModels(request, _ServeContext(grpc_context)),
                            tensor_pb2.ListModelsResponse())


@serve.deployment(name="Encoder", autoscaling_config=AUTOSCALING, max_ongoing_requests=MAX_ONGOING_REQUESTS)
class EncoderDeployment(_Replica):
    """aevae.v1.Encoder: each RPC is the standalone servicer's, unchanged."""

    def __init__(self, args: dict[str, Any] | None = None):
        super().__init__(args)
        self.servicer = EncoderServicer(EncoderLogic(self.store, self.settings.limits), self.run)

    async def Encode(self, request: encoder_pb2.EncodeRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.Encode(request, _ServeContext(grpc_context)),
                            encoder_pb2.EncodeResponse())

    async def EncodeStream(self, requests: AsyncIterator[encoder_pb2.EncodeRequest],
                           grpc_context: RayServegRPCContext):
        async for response in self.servicer.EncodeStream(requests, _ServeContext(grpc_context)):
            yield response

    async def GetLatentStats(self, request: encoder_pb2.GetLatentStatsRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.GetLatentStats(request, _ServeContext(grpc_context)),
                            encoder_pb2.LatentStats())


@dataclass(frozen=True)
class _DecodeItem:
    model: str
    version: int | None
    latents: np.ndarray
    dtype: str


@serve.deployment(name="Decoder", autoscaling_config=AUTOSCALING, max_ongoing_requests=MAX_ONGOING_REQUESTS)
class DecoderDeployment(_Replica):
    """aevae.v1.Decoder: the standalone servicer's DecodeStream and ListModels; Decode batched across calls."""

    def __init__(self, args: dict[str, Any] | None = None):
        super().__init__(args)
        self.logic = DecoderLogic(self.store, self.settings.limits)
        self.servicer = DecoderServicer(self.logic, self.run)
        # serve.batch adds these setters to the method at run time; its type hints do not show them.
        self._batched.set_max_batch_size(self.settings.batch_size)  # type: ignore[attr-defined]
        self._batched.set_batch_wait_timeout_s(self.settings.batch_wait_s)  # type: ignore[attr-defined]

    async def Decode(self, request: decoder_pb2.DecodeRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, guarded(_ServeContext(grpc_context), self._decode(request)),
                            decoder_pb2.DecodeResponse())

    async def _decode(self, request: decoder_pb2.DecodeRequest) -> decoder_pb2.DecodeResponse:
        """request -> validation -> (batch with other small requests) -> model -> response."""
        latents = from_tensor(request.latents, "latents", dtypes=("float32",))
        item = _DecodeItem(request.model, version_from_wire(request.version), latents, request.dtype)
        if latents.ndim == 2 and len(latents) <= self.settings.batch_rows:
            out = await self._batched(item)
        else:
            out = await self.run(lambda: self._decode_one(item), len(latents), False)
        if isinstance(out, Exception):
            raise out
        return decoder_pb2.DecodeResponse(model=out.model, version=out.version, images=to_tensor(out.images))

    @serve.batch(max_batch_size=DEFAULTS.batch_size, batch_wait_timeout_s=DEFAULTS.batch_wait_s)
    async def _batched(self, items: list[_DecodeItem]) -> list[Decoded | Exception]:
        return await self.run(lambda: self._decode_together(items), sum(len(i.latents) for i in items), False)

    def _decode_one(self, item: _DecodeItem) -> Decoded | Exception:
        try:
            return self.logic.decode(item.model, item.version, item.latents, item.dtype)
        except (ServiceError, ValueError) as exc:
            return exc

    def _decode_together(self, items: list[_DecodeItem]) -> list[Decoded | Exception]:
        """One forward pass per (model, version, dtype, latent width) among the batch's requests; if that
        fails (one request's bad latents), its requests are decoded one by one, so each gets its own answer
        and no request fails because of a neighbour."""
        groups: dict[tuple[str, int | None, str, int], list[int]] = {}
        for index, item in enumerate(items):
            groups.setdefault((item.model, item.version, item.dtype, item.latents.shape[1]), []).append(index)
        results: list[Decoded | Exception] = [InvalidArgument("not decoded")] * len(items)  # all replaced
        for (model, version, dtype, _), members in groups.items():
            if len(members) > 1:
                try:
                    merged = self.logic.decode(model, version,
                                               np.concatenate([items[i].latents for i in members]), dtype)
                except (ServiceError, ValueError):
                    pass
                else:
                    start = 0
                    for i in members:
                        stop = start + len(items[i].latents)
                        results[i] = Decoded(merged.model, merged.version, merged.images[start:stop])
                        start = stop
                    continue
            for i in members:
                results[i] = self._decode_one(items[i])
        return results

    async def DecodeStream(self, requests: AsyncIterator[decoder_pb2.DecodeRequest],
                           grpc_context: RayServegRPCContext):
        async for response in self.servicer.DecodeStream(requests, _ServeContext(grpc_context)):
            yield response


def encoder(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`import_path: aevae.services.serve_app:encoder` in the Serve config)."""
    ServiceSettings.from_mapping(args)  # fail the deploy early, in the builder, on bad args
    return EncoderDeployment.bind(args)  # type: ignore[attr-defined]  # serve.deployment makes it a Deployment


def decoder(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`import_path: aevae.services.serve_app:decoder` in the Serve config)."""
    ServiceSettings.from_mapping(args)
    return DecoderDeployment.bind(args)  # type: ignore[attr-defined]  # serve.deployment makes it a Deployment
