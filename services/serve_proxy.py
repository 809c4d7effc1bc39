"""What Ray Serve's gRPC proxy registers for aevae.v1 (`grpc_servicer_functions` in deploy/serve/config.yaml):
the generated add_*Servicer_to_server, but parsing requests as `aevae serve` does, and with two answers of
Serve's proxy put right.

With the generated functions the proxy parsed with protobuf's own FromString, and request bytes that are no
valid message failed in the proxy: UNKNOWN, "Unexpected DecodeError", where `aevae serve` answers
INVALID_ARGUMENT naming the message. Here such bytes become `Unreadable`, which the proxy passes to the replica
like any request, and the servicer answers it as `aevae serve` does. The proxy replaces the handlers' behaviour
with its routing (the servicer it passes is a stand-in) and keeps their parsing. Sizes are the replicas' to
check (serve_app._sized): the proxy takes messages up to 2 GiB.

The proxy's own handlers (made by its `service_handler_factory`, one per method and kind) are wrapped here,
for aevae.v1 only (`_wrapped`):
- a call cut by its replica dying is UNAVAILABLE, saying so and that it may be retried (`_retryable`), where
  the proxy answered INTERNAL with Ray's "The actor died unexpectedly"; and an UNAVAILABLE is sent so that
  gRPC clients do retry it (no response headers before it);
- a stream's message `STATUS_ONLY` is not sent: it only carries the status the replica set (serve_app).
"""

from __future__ import annotations

import inspect
import re
from typing import Any, AsyncIterator, Callable

import grpc

from aevae.services.registration import register
from aevae.v1 import decoder_pb2, encoder_pb2

PROXY_MAX_BYTES = 2**31 - 1

# What a replica's stream yields to end with an error status that is the client's (bad input, an unknown
# model...) rather than raise it, which logged a traceback in the replica and another in the proxy for each bad
# message (serve_app._answers). Serve sends a status set on the context only along with a message; this one
# carries it, and the proxy's handler (`_wrapped`) drops it. No serialized protobuf message starts with a zero
# byte (field number 0 is invalid), so no answer can be taken for it.
STATUS_ONLY = b"\x00aevae.v1 status only"

# The messages of ray.exceptions' RayActorError (the base), ActorDiedError and ActorUnavailableError, which
# Serve's proxy answers INTERNAL when its replica died under a call (ray.serve._private.grpc_util.
# get_grpc_response_status, whose `else` branch makes any exception INTERNAL with str(exc) as the details).
# Plain strings: this module runs in Serve's proxy and needs no Ray; tests/test_serve_faults.py checks them
# against Ray's.
ACTOR_ERROR = "The actor experienced an error before finishing this task."
ACTOR_DIED = "The actor died unexpectedly before finishing this task."
ACTOR_UNAVAILABLE = re.compile(r"The actor \S+ is unavailable: .*The task may or may not have been executed "
                               r"on the actor\.", re.DOTALL)


def replica_died(details: str) -> bool:
    """Whether an INTERNAL status's details are Ray's for a replica actor that died (or became unreachable)
    under the call, before answering it. Not the actor that died in its constructor ("The actor died because
    of an error raised in its creation task"): a call is never in flight on it, and a retry would not help."""
    return details.startswith((ACTOR_DIED, ACTOR_ERROR)) or ACTOR_UNAVAILABLE.match(details) is not None


def _code(context: Any) -> grpc.StatusCode | None:
    """The status code set on a grpc.aio servicer context (which holds it as the enum or as its number)."""
    code = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), None)


async def _retryable(context: Any) -> None:
    """Ends a call whose status the proxy has set (it sends it when the handler returns) as a client can retry
    it, when it is one to retry.

    A call the proxy failed because its replica died becomes UNAVAILABLE, which clients retry (aevae's client,
    like gRPC's retry policies, retries only UNAVAILABLE), where Serve's proxy answers INTERNAL, which no client
    retries. Every aevae.v1 method is idempotent (Decode, Encode and their streams compute, ListModels and
    GetLatentStats read), so running the call again, on another replica or the dead one's replacement, is
    safe; a stream cut this way after some answers is resumed by aevae's client after its last answer.

    An UNAVAILABLE (this one, or Serve's own for a deployment that failed to deploy) is sent with
    context.abort: gRPC clients retry a call only while no response headers came, and grpc.aio sends headers
    before a status set with set_code when the handler returns, but none with abort's (a Trailers-Only
    response), so with the proxy's way no client ever retried (measured: 1 attempt of 4)."""
    code = _code(context)
    details = context.details() or ""
    if isinstance(details, bytes):
        details = details.decode(errors="replace")
    if code == grpc.StatusCode.INTERNAL and replica_died(details):
        code = grpc.StatusCode.UNAVAILABLE
        details = (f"the Ray Serve replica serving this call died before answering it ({details.splitlines()[0]}); "
                   "the call may be retried, and another replica or its replacement will serve it")
    if code == grpc.StatusCode.UNAVAILABLE:
        await context.abort(code, details)


def _wrapped(handler: Callable[..., Any]) -> Callable[..., Any]:
    """One of the proxy's handlers (it routes the call to a replica and sets the status on the context when the
    call ends): the same, with `_retryable` and `STATUS_ONLY` applied."""
    if inspect.isasyncgenfunction(handler):
        async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
            async for message in handler(request, context):
                if message == STATUS_ONLY:  # its status is on the context; the stream ends after it
                    continue
                yield message
            await _retryable(context)
        return streaming

    async def unary(request: Any, context: Any) -> Any:
        response = await handler(request, context)
        await _retryable(context)
        return response
    return unary


def _register(servicer: Any, server: Any, service: Any) -> None:
    """Registers `service` on Serve's gRPC server, its proxy handlers `_wrapped`. Serve's server (ray.serve.
    _private.grpc_util.gRPCGenericServer) replaces each registered handler with what its
    `service_handler_factory` makes; that factory is wrapped for this registration only, so Serve's own
    services keep theirs. A server without one (any other) registers the handlers as they are."""
    factory = getattr(server, "service_handler_factory", None)
    if factory is None:
        register(servicer, server, service, PROXY_MAX_BYTES, split=False)
        return

    def wrapped_factory(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        return _wrapped(factory(*args, **kwargs))

    server.service_handler_factory = wrapped_factory
    try:
        register(servicer, server, service, PROXY_MAX_BYTES, split=False)
    finally:
        server.service_handler_factory = factory


def add_EncoderServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - the generated name
    _register(servicer, server, encoder_pb2.DESCRIPTOR.services_by_name["Encoder"])


def add_DecoderServicer_to_server(servicer: Any, server: Any) -> None:  # noqa: N802 - the generated name
    _register(servicer, server, decoder_pb2.DESCRIPTOR.services_by_name["Decoder"])
