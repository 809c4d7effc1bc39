"""What both gRPC servicers share: running logic off the event loop, mapping typed errors onto status codes,
and the ListModels response."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Awaitable, Callable, Protocol, TypeVar

import grpc

from aevae.errors import ServiceError
from aevae.inference import NonFiniteOutput
from aevae.services.settings import Limits
from aevae.store import ModelSummary
from aevae.v1 import tensor_pb2
from aevae.v1.tensors import WireError

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


class Runner:
    """Runs model work in the executor, or inline when it is tiny and needs no disk (one thread hop saved)."""

    def __init__(self, executor: Executor, inline_max: int):
        self.executor = executor
        self.inline_max = inline_max

    async def __call__(self, work: Callable[[], T], n: int, ready: bool) -> T:
        if ready and n <= self.inline_max:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)


class Aborts(Protocol):
    """What `guarded` needs of a call's context: grpc.aio's, or the Ray Serve adapter's."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> Any: ...


async def guarded(context: Aborts, work: Awaitable[T]) -> T:
    """Awaits `work`, turning typed errors into their status; anything else is INTERNAL and logged."""
    try:
        return await work
    except StopAsyncIteration:
        raise
    except WireError as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    except ServiceError as exc:
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    except NonFiniteOutput as exc:
        await context.abort(grpc.StatusCode.INTERNAL, f"{exc}; the result was withheld")
    except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
        log.exception("internal error")
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
    raise AssertionError("unreachable: context.abort raises")


async def pipelined(
    requests: AsyncIterator[R], handle: Callable[[int, R], Awaitable[T]], depth: int = 2
) -> AsyncIterator[T]:
    """Handles each request as it arrives, up to `depth` at once, and yields the results in request order,
    so the next chunk is computed while the previous one is on the wire."""
    in_flight: deque[asyncio.Task[T]] = deque()
    try:
        index = 0
        async for request in requests:
            in_flight.append(asyncio.ensure_future(handle(index, request)))
            index += 1
            while len(in_flight) >= depth:
                yield await in_flight.popleft()
        while in_flight:
            yield await in_flight.popleft()
    finally:
        for task in in_flight:
            task.cancel()


async def served_stream(
    context: Aborts,
    requests: AsyncIterator[R],
    submit: Callable[[int, R], Awaitable[T]],
    depth: int,
) -> AsyncIterator[T]:
    """A streaming RPC: each request answered by one response, in order, `depth` at once.

    A whole stream is served by one version: the first message resolves "newest", and later messages that
    name the same model with version 0 are pinned to it, so a version written mid-stream cannot mix in.
    An error ends the stream with its status and the failing message's position.
    """
    pinned: dict[str, int] = {}
    first_done = asyncio.Event()

    async def handle(index: int, request: Any) -> T:
        if index > 0:
            await first_done.wait()
        if not request.version and request.model in pinned:
            request.version = pinned[request.model]
        try:
            response: Any = await submit(index, request)
        except Exception as exc:  # noqa: BLE001 - re-raised with the message's position
            raise prefixed(exc, f"message {index}") from None
        finally:
            if index == 0:
                first_done.set()
        pinned.setdefault(response.model, response.version)
        return response

    results = pipelined(requests, handle, depth)
    while True:
        try:
            response = await guarded(context, anext(results))
        except StopAsyncIteration:
            return
        yield response


def prefixed(error: Exception, prefix: str) -> Exception:
    """The same error with the position in a stream in front of its message."""
    if isinstance(error, (ServiceError, WireError)):
        return type(error)(f"{prefix}: {error}")
    return error


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


