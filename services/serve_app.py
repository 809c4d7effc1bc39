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

import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Any, AsyncIterator, Awaitable, TypeVar

import grpc
import numpy as np
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from aevae.services.decoder import Decoded, DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.services.errors import InvalidArgument, ServiceError
from aevae.services.grpc_common import Runner, guarded
from aevae.services.grpc_decoder import DecoderServicer
from aevae.services.grpc_encoder import EncoderServicer
from aevae.services.limits import Limits
from aevae.services.model_cache import ModelCache
from aevae.v1 import decoder_pb2, encoder_pb2, tensor_pb2
from aevae.v1.tensors import from_tensor, to_tensor

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


@dataclass(frozen=True)
class ServeArgs:
    """The application arguments (`args:` in the Serve config); the same knobs as `aevae serve`."""

    models_dir: str | None = None  # None: $AEVAE_MODELS_DIR or ./models
    max_message_bytes: int = Limits.max_message_bytes
    max_batch: int = Limits.max_batch
    refresh_seconds: float = 2.0
    workers: int = 2  # threads running the model off the replica's event loop
    inline_max: int = 64
    torch_threads: int | None = None
    batch_size: int = 32  # Decode requests merged into one forward pass
    batch_wait_s: float = 0.002  # how long the first request of a batch waits for company
    batch_rows: int = 256  # Decode requests with more latents than this are big enough alone: no batching

    @classmethod
    def parse(cls, args: dict[str, Any] | None) -> "ServeArgs":
        """Unknown keys and wrong types fail the deploy with a message naming the key and what is accepted."""
        args = dict(args or {})
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown application args {unknown}; accepted: {sorted(known)}")
        values: dict[str, Any] = {}
        for name, value in args.items():
            default = getattr(cls, name)
            if value is None or name == "models_dir":
                values[name] = None if value is None else str(value)
                continue
            kind = float if isinstance(default, float) else int
            try:
                values[name] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"args.{name}: expected {kind.__name__}, got {value!r}") from None
            if values[name] < 0 or (values[name] == 0 and name not in ("inline_max", "batch_wait_s")):
                raise ValueError(f"args.{name}: expected a positive number, got {value!r}")
        return cls(**values)

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_batch=self.max_batch)


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

    def __init__(self, args: dict[str, Any] | None):
        # Request tensors are read-only views on the message bytes; the model only reads them.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.args = ServeArgs.parse(args)
        if self.args.torch_threads:
            import torch

            torch.set_num_threads(self.args.torch_threads)
        self.cache = ModelCache(self.args.models_dir, refresh_seconds=self.args.refresh_seconds)
        self.executor = ThreadPoolExecutor(max_workers=self.args.workers, thread_name_prefix="aevae-serve")
        self.run = Runner(self.executor, self.args.inline_max)

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
        self.servicer = EncoderServicer(EncoderLogic(self.cache, self.args.limits), self.run)

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
    version: int
    latents: np.ndarray
    dtype: str


@serve.deployment(name="Decoder", autoscaling_config=AUTOSCALING, max_ongoing_requests=MAX_ONGOING_REQUESTS)
class DecoderDeployment(_Replica):
    """aevae.v1.Decoder: the standalone servicer's DecodeStream and ListModels; Decode batched across calls."""

    def __init__(self, args: dict[str, Any] | None = None):
        super().__init__(args)
        self.logic = DecoderLogic(self.cache, self.args.limits)
        self.servicer = DecoderServicer(self.logic, self.run)
        self._batched.set_max_batch_size(self.args.batch_size)
        self._batched.set_batch_wait_timeout_s(self.args.batch_wait_s)

    async def Decode(self, request: decoder_pb2.DecodeRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, guarded(_ServeContext(grpc_context), self._decode(request)),
                            decoder_pb2.DecodeResponse())

    async def _decode(self, request: decoder_pb2.DecodeRequest) -> decoder_pb2.DecodeResponse:
        """request -> validation -> (batch with other small requests) -> model -> response."""
        latents = from_tensor(request.latents, "latents", dtypes=("float32",))
        item = _DecodeItem(request.model, request.version, latents, request.dtype)
        if latents.ndim == 2 and len(latents) <= self.args.batch_rows:
            out = await self._batched(item)
        else:
            out = await self.run(lambda: self._decode_one(item), len(latents), False)
        if isinstance(out, Exception):
            raise out
        return decoder_pb2.DecodeResponse(model=out.model, version=out.version, images=to_tensor(out.images))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
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
        groups: dict[tuple[str, int, str, int], list[int]] = {}
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
    ServeArgs.parse(args)  # fail the deploy early, in the builder, on bad args
    return EncoderDeployment.bind(args)


def decoder(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`import_path: aevae.services.serve_app:decoder` in the Serve config)."""
    ServeArgs.parse(args)
    return DecoderDeployment.bind(args)
