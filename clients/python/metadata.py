"""Metadata sent on every call, for routers in front of the services, and the token.

Ray Serve's gRPC proxy serves several applications on one port and picks one by the `application` metadata
key; an interceptor adds it to every call of a channel, so no call site has to remember it. `dynamic`, when
given, is called per call for more (the `authorization` metadata, whose token file may be rotated).
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any, Callable, Sequence

import grpc

Metadata = Sequence[tuple[str, str]]
Dynamic = Callable[[], Metadata] | None


class _CallDetails(namedtuple("_CallDetails", "method timeout metadata credentials wait_for_ready compression"),
                   grpc.ClientCallDetails):
    """grpc.ClientCallDetails is abstract; the sync interceptor API expects a concrete one."""


def _with(details: Any, metadata: Metadata) -> _CallDetails:
    return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), *metadata],
                        details.credentials, details.wait_for_ready, details.compression)


def _with_async(details: Any, metadata: Metadata) -> grpc.aio.ClientCallDetails:
    return grpc.aio.ClientCallDetails(details.method, details.timeout,
                                      grpc.aio.Metadata(*(details.metadata or ()), *metadata),
                                      details.credentials, details.wait_for_ready)


class _Sync(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
            grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: Metadata, dynamic: Dynamic = None):
        self.metadata = tuple(metadata)
        self.dynamic = dynamic

    def _call(self, continuation: Callable, details: Any, request: Any) -> Any:
        extra = self.metadata if self.dynamic is None else (*self.metadata, *self.dynamic())
        return continuation(_with(details, extra), request)

    # One method serves the four call shapes; grpc's stubs type each shape apart.
    intercept_unary_unary = intercept_unary_stream = _call  # type: ignore[assignment]
    intercept_stream_unary = intercept_stream_stream = _call  # type: ignore[assignment]


class _Async:
    def __init__(self, metadata: Metadata, dynamic: Dynamic = None):
        self.metadata = tuple(metadata)
        self.dynamic = dynamic

    async def _call(self, continuation: Callable, details: Any, request: Any) -> Any:
        extra = self.metadata if self.dynamic is None else (*self.metadata, *self.dynamic())
        return await continuation(_with_async(details, extra), request)


class _AsyncUnaryUnary(_Async, grpc.aio.UnaryUnaryClientInterceptor):
    intercept_unary_unary = _Async._call  # type: ignore[assignment]  # one method, four call shapes


class _AsyncUnaryStream(_Async, grpc.aio.UnaryStreamClientInterceptor):
    intercept_unary_stream = _Async._call  # type: ignore[assignment]  # one method, four call shapes


class _AsyncStreamUnary(_Async, grpc.aio.StreamUnaryClientInterceptor):
    intercept_stream_unary = _Async._call  # type: ignore[assignment]  # one method, four call shapes


class _AsyncStreamStream(_Async, grpc.aio.StreamStreamClientInterceptor):
    intercept_stream_stream = _Async._call  # type: ignore[assignment]  # one method, four call shapes


def sync_channel(channel: grpc.Channel, metadata: Metadata, dynamic: Dynamic = None) -> grpc.Channel:
    """The channel itself when there is no metadata to add (the common case costs nothing)."""
    return grpc.intercept_channel(channel, _Sync(metadata, dynamic)) if metadata or dynamic else channel


def async_interceptors(metadata: Metadata, dynamic: Dynamic = None) -> list | None:
    if not metadata and dynamic is None:
        return None
    return [cls(metadata, dynamic)
            for cls in (_AsyncUnaryUnary, _AsyncUnaryStream, _AsyncStreamUnary, _AsyncStreamStream)]
