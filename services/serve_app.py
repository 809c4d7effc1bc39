"""aevae.v1.Encoder and aevae.v1.Decoder as Ray Serve deployments behind Serve's gRPC proxy.

The replicas run the same servicers as `aevae serve` (EncoderServicer / DecoderServicer over EncoderLogic /
DecoderLogic), their dynamic batching included: validation, error messages, streams, seeds and batching
cannot drift between the two transports. What Serve adds is replicas with autoscaling.

Serve's proxy routes by the gRPC metadata ("application", "encoder" | "decoder"), so one port serves both. It
registers aevae.v1 through serve_proxy (SERVICER_FUNCTIONS), which also answers a call cut by its replica dying
UNAVAILABLE (clients retry it) and carries a stream's error status without a traceback in the logs (`_answers`).
Run it with `serve run deploy/serve/config.yaml` (see docs/deploy.md), or build an app in Python:
`serve.run(decoder({"models_dir": "models"}), name="decoder", route_prefix="/decoder")`.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from aevae.services.decoder import DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.services.grpc_decoder import DecoderServicer
from aevae.services.grpc_encoder import EncoderServicer
from aevae.services.registration import Unreadable, oversized
from aevae.services.serve_proxy import STATUS_ONLY
from aevae.services.server import engine, open_store
from aevae.services.settings import ServiceSettings
from aevae.v1 import decoder_pb2, encoder_pb2, tensor_pb2

T = TypeVar("T")
C = TypeVar("C", bound=type)

# What Serve's gRPC proxy must register (gRPCOptions.grpc_servicer_functions, grpc_options in the config).
SERVICER_FUNCTIONS = [
    "aevae.services.serve_proxy.add_EncoderServicer_to_server",
    "aevae.services.serve_proxy.add_DecoderServicer_to_server",
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
# Calls Serve queues for a deployment beyond its replicas' max_ongoing_requests (Ray's default: no bound): they
# wait in the proxy, outside every replica's --max-inflight-bytes; past the bound Serve refuses them at once.
MAX_QUEUED_REQUESTS = 256


# Settings of `aevae serve`'s own gRPC server. Under Ray Serve its proxy owns the port, the connections,
# TLS, tokens, metrics and shutdown (docs/deploy.md), so one of these in `args:` would be silently ignored:
# it is refused instead, naming what to use.
SERVER_ONLY = ("host", "port", "grace", "shutdown_delay", "keepalive_seconds", "max_connection_age_s",
               "max_connection_age_grace_s", "metrics_port", "metrics_host",
               "tls_cert", "tls_key", "tls_client_ca", "token_file", "insecure", "health_port")


def settings(args: dict[str, Any] | None) -> ServiceSettings:
    """The deployments' settings from their `args:`: those of ServiceSettings that apply behind Serve's proxy."""
    given = sorted(set(args or {}) & set(SERVER_ONLY))
    if given:
        raise ValueError(f"{given} configure `aevae serve`'s own server and do not apply under Ray Serve, whose "
                         "proxy owns ports, connections and shutdown (grpc_options and http_options in the Serve "
                         "config) and has no TLS or tokens of its own: put an authenticating gateway or a mesh "
                         "with mutual TLS in front of it (docs/deploy.md, Security); remove them from args")
    return ServiceSettings.from_mapping(args, refused=SERVER_ONLY)


class _Aborted(Exception):
    """The call failed; its status (`code`) is already set on Serve's context.

    A unary call then returns an empty message (Serve's documented way to fail a gRPC call; raising would
    log a traceback per bad request). A stream ends with `STATUS_ONLY` (`_answers`), or, for a server error,
    lets it propagate: Serve sends a status set on the context only along with a message, but keeps the code
    and details of an exception raised after setting them (and logs its traceback)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code


class _ServeContext:
    """The part of grpc.aio.ServicerContext that the servicers use (abort), over Ray Serve's gRPC context."""

    def __init__(self, context: RayServegRPCContext):
        self.context = context

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.context.set_code(code)
        self.context.set_details(details)
        raise _Aborted(code, details)


# A stream failing with one of these is a fault of the server: its traceback is logged (by Serve, in the
# replica's and the proxy's logs). Any other status is an answer to the client (bad input, an unknown model
# or version, a limit...), which logs no more than Serve's access log line, as a unary call's does.
SERVER_ERRORS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS})


class _StatusOnly:
    """A stream's last message, which carries the status set on Serve's context to the proxy; the proxy's
    handler (serve_proxy) sends the status and not the message."""

    def SerializeToString(self) -> bytes:  # noqa: N802 - protobuf's name, which Serve's replica calls
        return STATUS_ONLY


async def _answers(responses: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A stream's responses; when the servicer aborts it with an error of the client's, `_StatusOnly` after the
    answers to the earlier messages, rather than the exception, which Serve logged with a full traceback in the
    replica and again in the proxy, for each bad message. Server errors (`SERVER_ERRORS`) still raise."""
    try:
        async for response in responses:
            yield response
    except _Aborted as aborted:
        if aborted.code in SERVER_ERRORS:
            raise
        yield _StatusOnly()


async def _unary(context: RayServegRPCContext, call: Awaitable[T], empty: T) -> T:
    """A unary call: its response, or an empty message with the error status set on the context."""
    try:
        return await call
    except _Aborted:
        return empty


def _sized(request: Any, max_bytes: int) -> Any:
    """The request, or (over `max_bytes`) its error for the servicer to answer, as `aevae serve`'s request
    parser answers it (registration.oversized). Serve's proxy takes messages up to 2 GiB and hands them over parsed,
    so the max_message_bytes that ListModels advertises is the replica's to keep: without this, a request over
    it was served (Encode) or refused for another reason (Decode: its response size)."""
    if isinstance(request, Unreadable):  # bytes that did not parse in the proxy (serve_proxy): answered as such
        return request
    return oversized(request.ByteSize(), max_bytes) or request


async def _each_sized(requests: AsyncIterator[Any], max_bytes: int) -> AsyncIterator[Any]:
    """A stream's requests, each `_sized`: one over the limit ends the stream naming its position."""
    async for request in requests:
        yield _sized(request, max_bytes)


def _elsewhere(service: str, name: str, response: type | None) -> Callable[..., Any]:
    """Method `name` of the other aevae.v1 service, for calls whose metadata names this application by mistake
    (`response`: a unary method's response class; None: a stream).

    Serve's proxy registers both services on one port, routes a call by its ("application", name) metadata
    alone and then calls the method of that name on the replica: Encode sent to the decoder application
    failed INTERNAL with Ray's traceback in the details. This answers UNIMPLEMENTED (what `aevae serve`
    answers for a service it does not serve), saying which application was reached and what to send.
    Only strings and classes in the closures: Serve pickles the deployment class with them."""

    def refuse(context: RayServegRPCContext) -> None:
        here = serve.get_replica_context().app_name
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details(f"{service}/{name} is not served by the application {here!r}; send it with the "
                            f"metadata ('application', NAME) of the application serving {service} "
                            f"('{service.rsplit('.', 1)[-1].lower()}' in deploy/serve/config.yaml)")

    if response is None:
        async def stream(self: Any, requests: AsyncIterator[Any], grpc_context: RayServegRPCContext
                         ) -> AsyncIterator[Any]:
            refuse(grpc_context)
            yield _StatusOnly()  # see _answers: a stream's status travels with a message

        return stream

    async def unary(self: Any, request: Any, grpc_context: RayServegRPCContext) -> Any:
        refuse(grpc_context)
        return response()

    return unary


def _answering(other: ServiceDescriptor) -> Callable[[C], C]:
    """A class decorator: the deployment also answers each method of `other` that it lacks (`_elsewhere`)."""

    def add(cls: C) -> C:
        for method in other.methods:
            if not hasattr(cls, method.name):
                response = None if method.client_streaming else message_factory.GetMessageClass(method.output_type)
                setattr(cls, method.name, _elsewhere(other.full_name, method.name, response))
        return cls

    return add


class _Replica:
    """What both deployments share: arguments, the model cache, and the executor the model runs in."""

    servicer: Any  # each deployment's own aevae.v1 servicer

    def __init__(self, args: dict[str, Any] | None):
        self.settings = settings(args)
        self.store = open_store(self.settings)
        self.executor = ThreadPoolExecutor(max_workers=self.settings.workers, thread_name_prefix="aevae-serve")
        self.engine = engine(self.settings, self.executor)
        self.engine.raw_responses = False  # Serve's proxy serializes the messages itself

    def __del__(self) -> None:
        self.executor.shutdown(wait=False)
        self.engine.run.loader.shutdown(wait=False)

    def _checked(self, request: Any) -> Any:
        """The request, or its error when it is over max_message_bytes (`_sized`)."""
        return _sized(request, self.settings.max_message_bytes)

    def _each_checked(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        return _each_sized(requests, self.settings.max_message_bytes)

    async def __call__(self, request: Any) -> Any:
        """HTTP on Serve's port (route_prefix): these deployments speak gRPC only. Without this, every HTTP
        request was a 500 and 19 lines of traceback in the log ("__call__ does not exist")."""
        from starlette.responses import PlainTextResponse

        return PlainTextResponse("aevae serves gRPC only: call it on Serve's gRPC port (grpc_options.port, 9000 "
                                 "in deploy/serve/config.yaml) with the metadata application=encoder or decoder\n",
                                 status_code=404)

    # Both services answer ListModels alike; `self.servicer` is each deployment's own servicer.
    async def ListModels(self, request: tensor_pb2.ListModelsRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.ListModels(request, _ServeContext(grpc_context)),
                            tensor_pb2.ListModelsResponse())


@serve.deployment(name="Encoder", autoscaling_config=AUTOSCALING, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  max_queued_requests=MAX_QUEUED_REQUESTS)
@_answering(decoder_pb2.DESCRIPTOR.services_by_name["Decoder"])
class EncoderDeployment(_Replica):
    """aevae.v1.Encoder: each RPC is the standalone servicer's, unchanged."""

    def __init__(self, args: dict[str, Any] | None = None):
        super().__init__(args)
        self.servicer = EncoderServicer(EncoderLogic(self.store, self.settings.limits), self.engine)

    async def Encode(self, request: encoder_pb2.EncodeRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.Encode(self._checked(request), _ServeContext(grpc_context)),
                            encoder_pb2.EncodeResponse())

    async def EncodeStream(self, requests: AsyncIterator[encoder_pb2.EncodeRequest],
                           grpc_context: RayServegRPCContext):
        async for response in _answers(self.servicer.EncodeStream(self._each_checked(requests),
                                                                  _ServeContext(grpc_context))):
            yield response

    async def GetLatentStats(self, request: encoder_pb2.GetLatentStatsRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context,
                            self.servicer.GetLatentStats(self._checked(request), _ServeContext(grpc_context)),
                            encoder_pb2.LatentStats())


@serve.deployment(name="Decoder", autoscaling_config=AUTOSCALING, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  max_queued_requests=MAX_QUEUED_REQUESTS)
@_answering(encoder_pb2.DESCRIPTOR.services_by_name["Encoder"])
class DecoderDeployment(_Replica):
    """aevae.v1.Decoder: each RPC is the standalone servicer's, its dynamic batching of Decode included."""

    def __init__(self, args: dict[str, Any] | None = None):
        super().__init__(args)
        self.servicer = DecoderServicer(DecoderLogic(self.store, self.settings.limits), self.engine)

    async def Decode(self, request: decoder_pb2.DecodeRequest, grpc_context: RayServegRPCContext):
        return await _unary(grpc_context, self.servicer.Decode(self._checked(request), _ServeContext(grpc_context)),
                            decoder_pb2.DecodeResponse())

    async def DecodeStream(self, requests: AsyncIterator[decoder_pb2.DecodeRequest],
                           grpc_context: RayServegRPCContext):
        async for response in _answers(self.servicer.DecodeStream(self._each_checked(requests),
                                                                  _ServeContext(grpc_context))):
            yield response


def encoder(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`import_path: aevae.services.serve_app:encoder` in the Serve config)."""
    settings(args)  # fail the deploy early, in the builder, on bad args
    return EncoderDeployment.bind(args)  # type: ignore[attr-defined]  # serve.deployment makes it a Deployment


def decoder(args: dict[str, Any] | None = None) -> Application:
    """Application builder (`import_path: aevae.services.serve_app:decoder` in the Serve config)."""
    settings(args)
    return DecoderDeployment.bind(args)  # type: ignore[attr-defined]  # serve.deployment makes it a Deployment
