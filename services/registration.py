"""Registering a servicer on a grpc.aio server with request parsing that never fails the call: request bytes
that do not parse, and a message over the size limit, become `Unreadable` for the handler, which answers a
clear status naming the message (INVALID_ARGUMENT, RESOURCE_EXHAUSTED) where grpc's generated registration
answers UNKNOWN and logs a traceback. A big request's tensor stays in the bytes received (`Bulk`,
`request_array`). Also what the servicers read a parsed request with (`readable`, `rows`), and `Parsing`,
which fits grpc's own servicers (health, reflection) to the same parsing."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, NoReturn, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from aevae.errors import InvalidArgument, ResourceExhausted
from aevae.services.field_limit import check_for
from aevae.services.status import Aborts, abort, status_of
from aevae.v1 import tensor_pb2
from aevae.v1.tensors import DTYPES, TensorError, WireError, from_tensor, split_payload

R = TypeVar("R")


@dataclass(frozen=True)
class Unreadable:
    """Request bytes that could not become a message; the handler answers with `error`'s status, in a stream
    after the answers to the earlier messages and naming the message's position."""

    error: Exception


class Bulk:
    """A request whose Tensor data was split off its bytes at parsing (`split_payload`): it reads and writes
    as the message, and `request_array` gives the Tensor as an array viewing the received bytes. Without it
    a request's tensor exists three times over (the received bytes, protobuf's copy, and a copy per read)."""

    __slots__ = ("message", "field", "payload", "size")

    def __init__(self, message: Any, field: str, payload: memoryview, size: int):
        object.__setattr__(self, "message", message)
        object.__setattr__(self, "field", field)
        object.__setattr__(self, "payload", payload)
        object.__setattr__(self, "size", size)  # of the bytes received

    def __getattr__(self, name: str) -> Any:
        return getattr(self.message, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.message, name, value)

    def ByteSize(self) -> int:  # noqa: N802 - protobuf's name
        return self.size


BULK_MIN_BYTES = 256 * 1024  # smaller requests parse whole: their copies cost less than splitting them


def request_array(request: Any, field: str, dtypes: tuple[str, ...] = tuple(DTYPES)) -> np.ndarray:
    """The request's Tensor `field` as a read-only array (validated: see from_tensor). A shape that passes
    from_tensor's checks but that numpy refuses (see `describable`) is INVALID_ARGUMENT, not INTERNAL."""
    bulk = isinstance(request, Bulk) and request.field == field
    tensor = getattr(request.message if bulk else request, field)
    try:
        return from_tensor(tensor, field, dtypes, data=request.payload if bulk else None)
    except WireError:
        raise
    except ValueError:  # numpy's, after from_tensor's checks passed: so the dtype is one of DTYPES
        describable(field, tuple(tensor.shape), DTYPES[tensor.dtype].itemsize)
        raise  # another refusal of numpy's: a bug, INTERNAL


ARRAY_BYTES = 2**63 - 1  # numpy's limit on an array's bytes (its index type), counted without the zero dimensions


def describable(field: str, shape: tuple[int, ...], itemsize: int) -> None:
    """TensorError when numpy cannot make an array of `shape`, not even an empty one: it refuses a shape whose
    dimensions other than 0 multiply past ARRAY_BYTES, and a 0 among them makes the data's length (0) check
    out, so that a request such as [2**40, 2**40, 0] reached numpy and came back INTERNAL, with a traceback."""
    span = math.prod(d for d in shape if d) * itemsize
    if span > ARRAY_BYTES:
        raise TensorError(f"{field}.shape: {list(shape)} is no array's shape, not even an empty one's: its "
                          f"dimensions other than 0 multiply to {span} bytes, past the 2**63 bytes an array can "
                          "span; send the batch's real shape (a batch of none: 0 rows, the other dimensions "
                          "the model's)")


def _bulk_field(message_class: Any) -> tuple[str, int] | None:
    """The request's one aevae.v1.Tensor field (name, number), if it has exactly one."""
    tensors = [(f.name, f.number) for f in message_class.DESCRIPTOR.fields
               if f.message_type is not None and f.message_type.full_name == tensor_pb2.Tensor.DESCRIPTOR.full_name]
    return tensors[0] if len(tensors) == 1 else None


def oversized(size: int, max_bytes: int) -> Unreadable | None:
    """A request message of `size` bytes over `max_bytes`: its error for the handler to answer (None: it fits).
    One wording for `aevae serve`'s parser and the Ray Serve replicas, which get their requests parsed."""
    if size <= max_bytes:
        return None
    return Unreadable(ResourceExhausted(f"a request message of {size} bytes is over the max message size of "
                                        f"{max_bytes} bytes; split the batch into smaller messages"))


def _parser(message_class: Any, max_bytes: int, split: bool = True) -> Callable[[bytes], Any]:
    """Request bytes to the message, or to `Unreadable` naming what is wrong. `split`: a big request's tensor
    bytes are split off as a `Bulk` (not for Serve's proxy, which pickles what it parsed to the replica)."""
    bulk = _bulk_field(message_class) if split else None
    crowded = check_for(message_class)

    def parse(data: bytes) -> Any:
        too_big = oversized(len(data), max_bytes)
        if too_big is not None:
            return too_big
        problem = crowded(data) if crowded is not None else None
        if problem:
            return Unreadable(InvalidArgument(problem))
        try:
            if bulk is not None and len(data) >= BULK_MIN_BYTES:
                split = split_payload(data, bulk[1])
                if split is not None:
                    return Bulk(message_class.FromString(split[0]), bulk[0], split[1], len(data))
            return message_class.FromString(data)
        except (DecodeError, RuntimeError, ValueError) as exc:
            return Unreadable(WireError(f"the request bytes are not a valid {message_class.DESCRIPTOR.full_name} "
                                        f"message ({str(exc)[:120]})"))
    return parse


_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler,
}


def register(servicer: Any, server: grpc.aio.Server, service: ServiceDescriptor, max_message_bytes: int,
             split: bool = True, name: str | None = None) -> None:
    """Adds `servicer`'s methods for `service` to `server`, like the generated add_*_to_server, but with
    request parsing that turns bad bytes and over-limit messages into `Unreadable` for the handler (`split`:
    see _parser). `name`: serve them under another service name whose messages are the same on the wire
    (server reflection's v1, the same messages as the v1alpha that grpcio-reflection ships)."""
    name = name or service.full_name
    handlers = {}
    implemented = [method.name for method in service.methods if hasattr(servicer, method.name)]
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name, None) or _unimplemented(name, method, implemented)
        handlers[method.name] = make(behavior, request_deserializer=_parser(request_class, max_message_bytes, split),
                                     response_serializer=_serializer(response_class))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


class Parsing:
    """One of grpc's own servicers (health, reflection), which expect parsed messages, made fit for
    `register`: a request whose bytes do not parse is answered INVALID_ARGUMENT naming the message, where
    grpc's generated registration answers UNKNOWN and logs a traceback for each (these services take calls
    without a token, so that would be a log flood open to anyone). A method the servicer only inherits from
    the generated base class (`*_pb2_grpc`, whose stubs raise NotImplementedError: grpcio-health-checking's
    servicer lacks Health/List) is left out, so that `register` answers it UNIMPLEMENTED naming what is
    there; called, the stub was logged with a traceback on every call, the same flood. Everything else is
    the servicer's own."""

    def __init__(self, servicer: Any, service: ServiceDescriptor):
        for method in service.methods:
            behavior = getattr(servicer, method.name, None)
            if behavior is not None and not _generated_stub(servicer, method.name):
                setattr(self, method.name, _parsing(behavior, method))


def _generated_stub(servicer: Any, name: str) -> bool:
    """Whether the servicer's method `name` is the generated base class's NotImplementedError stub."""
    for klass in type(servicer).__mro__:
        if name in vars(klass):
            return klass.__module__.endswith("_pb2_grpc")
    return False


async def _refuse(context: Aborts, error: Exception) -> NoReturn:
    await abort(context, *status_of(error))


def _parsing(behavior: Callable[..., Any], method: MethodDescriptor) -> Callable[..., Any]:
    if method.client_streaming:
        async def checked(requests: AsyncIterator[Any], context: Aborts) -> AsyncIterator[Any]:
            async for message in requests:
                if isinstance(message, Unreadable):
                    await _refuse(context, message.error)
                yield message

        async def streaming_in(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
            async for response in behavior(checked(requests, context), context):
                yield response
        return streaming_in

    if inspect.isasyncgenfunction(behavior):
        async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Unreadable):
                await _refuse(context, request.error)
            async for response in behavior(request, context):
                yield response
        return generator

    async def coroutine(request: Any, context: Any) -> Any:  # unary, or a stream written with context.write
        if isinstance(request, Unreadable):
            await _refuse(context, request.error)
        return await behavior(request, context)
    return coroutine


def _unimplemented(service: str, method: MethodDescriptor, implemented: list[str]) -> Callable[..., Any]:
    """A method of the service that the servicer leaves out (the Open Inference Protocol's statistics,
    repository control, shared memory, trace and log settings): UNIMPLEMENTED saying what is there, and no
    traceback in the server's log."""
    details = (f"{service}/{method.name} is not implemented by this server; it implements "
               f"{', '.join(implemented)}")

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> NoReturn:
        await abort(context, grpc.StatusCode.UNIMPLEMENTED, details)

    if not method.server_streaming:
        return refuse

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await refuse(request, context)
        yield  # pragma: no cover - makes this an async generator, as the handler kind requires

    return refuse_stream


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """The message's own serializer, passing through responses a servicer has serialized already."""
    serialize = message_class.SerializeToString

    def serializer(response: Any) -> bytes:
        return response if isinstance(response, bytes) else serialize(response)
    return serializer


def rows(array: Any) -> int:
    """The rows of a request's array before it is validated (a 0-d array, which validation refuses, has 1)."""
    return int(array.shape[0]) if array.ndim else 1


def readable(request: R | Unreadable) -> R:
    """The request, or its parse error raised."""
    if isinstance(request, Unreadable):
        raise request.error
    return request


async def parsed(request: R | Unreadable) -> R:
    """`readable` as an awaitable, for `status.guarded`: the request, or its parse error as the call's status."""
    return readable(request)
