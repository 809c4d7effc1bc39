"""Typed errors onto gRPC status codes, one mapping for every servicer (aevae.v1's, the Open Inference
Protocol's, and the request parsing of registration): a WireError is INVALID_ARGUMENT, a ServiceError its own
code, anything else INTERNAL, logged with its traceback at most once a second, so that a bug answers its call
without taking the server down or flooding the log."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from typing import Any, Awaitable, NoReturn, Protocol, TypeVar

import grpc

from aevae.errors import ServiceError
from aevae.inference import NonFiniteOutput
from aevae.v1.tensors import WireError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Aborts(Protocol):
    """What `guarded` needs of a call's context: grpc.aio's, or the Ray Serve adapter's."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> Any: ...


async def guarded(context: Aborts, work: Awaitable[T]) -> T:
    """Awaits `work`, turning typed errors into their status; anything else is INTERNAL and logged."""
    try:
        return await work
    except StopAsyncIteration:
        raise
    except Exception as exc:  # noqa: BLE001 - a bug must not take the server down
        status = status_of(exc)  # aborted below, outside this block: no chain back to `exc`'s frames
    await abort(context, *status)


async def abort(context: Aborts, code: grpc.StatusCode, details: str) -> NoReturn:
    """`context.abort`, and the aborted call's locals released as soon as the call is done.

    grpc.aio keeps the exception `context.abort` raises on the call's state, which the frames of its traceback
    reach again through the context: a reference cycle holding every local of the aborted handler (the
    request, up to twice --max-message-bytes of it) until Python's cyclic collector next runs, which counts
    objects, not bytes (measured: 20 refused requests of a 60 MiB model name left 2.4 GB behind for as long as
    no other traffic came). Once the call's task is done its frames have all returned, and clearing their
    locals breaks the cycle."""
    try:
        await context.abort(code, details)
    except BaseException as aborted:
        task = asyncio.current_task()
        if task is not None:  # read once the call is done: its traceback grows as it is raised further
            task.add_done_callback(functools.partial(_clear_frames, aborted))
        raise
    raise AssertionError("unreachable: context.abort raises")


def _clear_frames(aborted: BaseException, _: object) -> None:
    traceback.clear_frames(aborted.__traceback__)


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """An error's status and details: typed errors their own, anything else INTERNAL (and logged)."""
    code, details = _status_of(exc)
    return code, sendable(details)


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.code], str(exc)
    if isinstance(exc, NonFiniteOutput):
        return grpc.StatusCode.INTERNAL, f"{exc}; the result was withheld"
    _log_internal(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


# UTF-8 bytes of a status's details. gRPC sends them percent-encoded in the grpc-message header (up to three
# bytes a byte) and refuses headers past its metadata limit (8 KiB soft, 16 KiB hard): details over it turned
# the call's status into RESOURCE_EXHAUSTED about metadata, and ones that are no UTF-8 (a lone surrogate quoted
# from a file name) left the call unanswered until its deadline.
DETAILS_MAX_BYTES = 2048


def sendable(details: str) -> str:
    """`details` as gRPC can send it: valid UTF-8 (what is not becomes a backslash escape) of at most
    DETAILS_MAX_BYTES bytes, cut with "..." at a character boundary."""
    data = details.encode("utf-8", "backslashreplace")
    if len(data) <= DETAILS_MAX_BYTES:
        return data.decode("utf-8")
    return data[:DETAILS_MAX_BYTES - 3].decode("utf-8", "ignore") + "..."


_last_logged = [0.0]


def _log_internal(exc: Exception) -> None:
    """A real bug: its traceback, at most once a second (a flood of one bug must not flood the log)."""
    now = time.monotonic()
    if now - _last_logged[0] >= 1.0:
        _last_logged[0] = now
        log.error("internal error", exc_info=exc)


def prefixed(error: Exception, prefix: str) -> Exception:
    """The same error with the position in a stream in front of its message."""
    if isinstance(error, (ServiceError, WireError)):
        return type(error)(f"{prefix}: {error}")
    return error
