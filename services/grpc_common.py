"""What the gRPC servicers share: registration with request parsing that never fails the call, admission
control, running logic off the event loop, mapping typed errors onto status codes, streams, ListModels."""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, NamedTuple, NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import DecodeError

from aevae.errors import Aborted, ResourceExhausted, ServiceError
from aevae.inference import NonFiniteOutput
from aevae.services.settings import Limits
from aevae.store import ModelSummary
from aevae.v1 import tensor_pb2
from aevae.v1.tensors import DTYPES, TensorError, WireError, from_tensor, split_payload

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")


# -- registration: request bytes that do not parse become a clear status, not UNKNOWN -----------------------
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

    def parse(data: bytes) -> Any:
        too_big = oversized(len(data), max_bytes)
        if too_big is not None:
            return too_big
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
             split: bool = True) -> None:
    """Adds `servicer`'s methods for `service` to `server`, like the generated add_*_to_server, but with
    request parsing that turns bad bytes and over-limit messages into `Unreadable` for the handler (`split`:
    see _parser)."""
    handlers = {}
    implemented = [method.name for method in service.methods if hasattr(servicer, method.name)]
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        make = _HANDLERS[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name, None) or _unimplemented(service.full_name, method, implemented)
        handlers[method.name] = make(behavior, request_deserializer=_parser(request_class, max_message_bytes, split),
                                     response_serializer=_serializer(response_class))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


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
    await context.abort(*status_of(error))
    raise AssertionError("unreachable: context.abort raises")


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
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, details)

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


# -- admission control ----------------------------------------------------------------------------------
class Admission:
    """Caps the model calls in flight and the request bytes they hold: past a cap, RESOURCE_EXHAUSTED naming
    it; health and ListModels are not counted, so they still answer. Answers wait for room in the same byte
    budget before they are computed and hold it until they are built (backpressure, not an error), so that many
    big calls at once compute at most about `max_bytes` of answers.

    A stream's answers are also counted from before they are computed until gRPC has sent them (`unsent`, at
    most `max_unsent`; see `Unsent`): a reader slower than the server keeps its answers waiting in the
    server's memory, and a flood of streams whose clients stop reading would otherwise hold a stream depth of
    answers each, without bound. Past the cap, streams wait before computing their next answer; unary calls
    never wait for it, so readers that stop can hold up other streams, not the other calls."""

    def __init__(self, max_calls: int, max_bytes: int, max_unsent: int | None = None):
        self.max_calls = max_calls
        self.max_bytes = max_bytes
        self.max_unsent = 2 * max_bytes if max_unsent is None else max_unsent
        self.calls = 0
        self.bytes = 0
        self.output = 0
        self.unsent = 0
        self._waiting: list[asyncio.Future[None]] = []

    def reserved(self, nbytes: int) -> "_Reserved":
        """An async context manager: waits until `nbytes` of answers fit the budget (one answer bigger than it
        waits for an empty one), and holds them for the block. Given back when the block ends, however it
        ends: a call cancelled or timed out while its batch runs must not keep its share until the garbage
        collector finds its frame (the budget would stay full and the next big answer would wait for ever)."""
        return _Reserved(self, nbytes)

    async def _take(self, nbytes: int) -> None:
        while self.output and self.output + nbytes > self.max_bytes:
            await self._room()
        self.output += nbytes

    async def _take_unsent(self, nbytes: int) -> None:
        while self.unsent and self.unsent + nbytes > self.max_unsent:
            await self._room()
        self.unsent += nbytes

    async def _room(self) -> None:
        """Until some bytes are given back (of either count: each waiter checks its own again)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        await waiter

    def _give_back(self, nbytes: int, unsent: int = 0) -> None:
        self.output -= nbytes
        self.unsent -= unsent
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)

    def call(self) -> "_Call":
        """A context manager holding one of the `max_calls` slots for its block; RESOURCE_EXHAUSTED when none
        is free."""
        return _Call(self)

    def hold(self, nbytes: int) -> "_Held":
        """A context manager holding `nbytes` of request bytes for its block; RESOURCE_EXHAUSTED when they
        would pass the budget (one request bigger than it is let in alone)."""
        return _Held(self, nbytes)


class _Call:
    """Admission.call's context manager. This one and the three below are classes rather than contextlib's
    generators: they are on every call's path, and cost about 1-2 us less each."""

    __slots__ = ("admission",)

    def __init__(self, admission: Admission):
        self.admission = admission

    def __enter__(self) -> None:
        admission = self.admission
        if admission.calls >= admission.max_calls:
            raise ResourceExhausted(f"the server has {admission.calls} calls in flight, its limit "
                                    f"(--max-concurrent-rpcs {admission.max_calls}); retry with backoff")
        admission.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.admission.calls -= 1


class _Held:
    """Admission.hold's context manager."""

    __slots__ = ("admission", "nbytes")

    def __init__(self, admission: Admission, nbytes: int):
        self.admission = admission
        self.nbytes = nbytes

    def __enter__(self) -> None:
        admission, nbytes = self.admission, self.nbytes
        if admission.bytes and admission.bytes + nbytes > admission.max_bytes:
            raise ResourceExhausted(f"the server holds {admission.bytes} request bytes in flight; {nbytes} more "
                                    f"would pass its limit (--max-inflight-bytes {admission.max_bytes}); retry "
                                    "with backoff")
        admission.bytes += nbytes

    def __exit__(self, *exc: object) -> None:
        self.admission.bytes -= self.nbytes


class _Reserved:
    """Admission.reserved's context manager."""

    __slots__ = ("admission", "nbytes")

    def __init__(self, admission: Admission, nbytes: int):
        self.admission = admission
        self.nbytes = nbytes

    async def __aenter__(self) -> None:
        await self.admission._take(self.nbytes)

    async def __aexit__(self, *exc: object) -> None:
        self.admission._give_back(self.nbytes)


class Runner:
    """Runs model work in the executor, or inline when it is tiny and needs no disk (one thread hop saved)."""

    def __init__(self, executor: Executor, inline_max: int):
        self.executor = executor
        self.inline_max = inline_max

    async def __call__(self, work: Callable[[], T], n: int, ready: bool) -> T:
        if ready and n <= self.inline_max:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.executor, work)


@dataclass
class Engine:
    """What every servicer of one server shares: the runner, the admission control and the batching
    settings (from ServiceSettings)."""

    run: Runner
    admission: Admission
    batch_size: int = 32
    batch_rows: int = 256
    batch_wait_s: float = 0.0
    batch_gather_s: float = 0.0
    stream_depth: int = 2
    # Bulk responses leave as bytes serialized with one copy of their data (aevae.v1.tensors); off where
    # another layer serializes the response itself (Ray Serve's proxy).
    raw_responses: bool = True

    def answered(self, batcher: Any, job: Any, company: bool = False) -> "_Answered":
        """An async context manager giving the job's result from its batcher, with the answer's bytes
        (`job.output_bytes`) held in the budget from before it is computed to the end of the block, where the
        servicer builds its response; after that, a reader's pace is the stream depth's job. Every servicer's
        one way to compute an answer. `company`: a unary call's job, which may wait for others on a busy
        server (Batcher.submit)."""
        return _Answered(self.admission, batcher, job, company)


class _Answered(_Reserved):
    """Engine.answered's context manager: the job's bytes reserved, then its result; the bytes are given back
    when the block ends, or at once if the batch fails or the call is cancelled while it waits."""

    __slots__ = ("batcher", "job", "company")

    def __init__(self, admission: Admission, batcher: Any, job: Any, company: bool):
        super().__init__(admission, job.output_bytes)
        self.batcher = batcher
        self.job = job
        self.company = company

    async def __aenter__(self) -> Any:
        slot = _SLOT.get()
        if slot is not None:  # a stream's answer: counted until sent (Unsent), room for it first
            await slot.owner.take(slot, self.nbytes)
        await super().__aenter__()
        try:
            return await self.batcher.submit(self.job, self.company)
        except BaseException:
            await super().__aexit__()
            raise


class AnswerSlot:
    """The unsent bytes of one stream message's answer, its position, and the stream's Unsent that counts them."""

    __slots__ = ("owner", "index", "nbytes")

    def __init__(self, owner: "Unsent", index: int):
        self.owner = owner
        self.index = index
        self.nbytes = 0


# The slot of the stream message the running task answers; Engine.answered counts the answer's bytes in it.
# A context variable, as the task of each message is made by `pipelined`, between the stream and the servicer.
_SLOT: ContextVar[AnswerSlot | None] = ContextVar("aevae_unsent_slot", default=None)


class Unsent:
    """A stream's answers from before each is computed until gRPC has sent it (Admission.unsent).

    gRPC asks a response stream for its next message only once it has written the one before, and writes
    only as far as the client reads (HTTP/2 flow control): an answer's bytes stay in the server, in our reply
    and in gRPC's copy, until the client has read about that far. The stream opens a slot for each message in
    the task that answers it (`open`); `sent` gives a slot's bytes back when the yield of its answer returns
    (gRPC has written it), and `close`, where the stream ends however it ends, gives back every slot still
    open (answers computed and never sent, a message that failed)."""

    __slots__ = ("admission", "_open", "_closed", "_next", "_past", "_turn")

    def __init__(self, admission: Admission):
        self.admission = admission
        self._open: set[AnswerSlot] = set()
        self._closed = False
        # Room is taken in message order: a later answer holding room while an earlier one of its stream
        # waits for it would never be sent (answers go out in order), and streams that all read would
        # deadlock on the budget. `_next`: the message whose turn it is; `_past`: later ones done with theirs.
        self._next = 0
        self._past: set[int] = set()
        self._turn: asyncio.Event | None = None

    def open(self, index: int) -> AnswerSlot:
        slot = AnswerSlot(self, index)
        self._open.add(slot)
        _SLOT.set(slot)
        return slot

    async def take(self, slot: AnswerSlot, nbytes: int) -> None:
        """Waits for the message's turn (every earlier message of the stream has taken its room or ended),
        then for room for an answer of `nbytes`, and counts it in the slot. A message whose stream has ended
        while it waited (its task is being cancelled) gives the room back at once: `close` has passed."""
        try:
            while self._next < slot.index:
                if self._turn is None:
                    self._turn = asyncio.Event()
                await self._turn.wait()
            await self.admission._take_unsent(nbytes)
        finally:
            self.passed(slot)
        if self._closed or slot not in self._open:
            self.admission._give_back(0, nbytes)
        else:
            slot.nbytes += nbytes

    def passed(self, slot: AnswerSlot) -> None:
        """The message is done taking room (it took it, or it ends without): the next one's turn may come."""
        if slot.index >= self._next:
            self._past.add(slot.index)
        while self._next in self._past:
            self._past.discard(self._next)
            self._next += 1
        if self._turn is not None:
            self._turn.set()
            self._turn = None

    def sent(self, slot: AnswerSlot) -> None:
        if slot in self._open:
            self._open.discard(slot)
            self.admission._give_back(0, slot.nbytes)

    def close(self) -> None:
        self._closed = True
        for slot in list(self._open):
            self.sent(slot)


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
        await context.abort(*status_of(exc))
    raise AssertionError("unreachable: context.abort raises")


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """An error's status and details: typed errors their own, anything else INTERNAL (and logged)."""
    if isinstance(exc, WireError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ServiceError):
        return grpc.StatusCode[exc.code], str(exc)
    if isinstance(exc, NonFiniteOutput):
        return grpc.StatusCode.INTERNAL, f"{exc}; the result was withheld"
    _log_internal(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def pipelined(
    requests: AsyncIterator[R], handle: Callable[[int, R], Awaitable[T]], depth: int = 2
) -> AsyncIterator[T]:
    """Handles each request as it arrives and yields the results in request order as soon as each is ready.

    At most `depth` answers exist at once, counting the one on the wire (the consumer's yield returns once
    gRPC has taken it): with 2, the next message is computed while the previous one is sent. A request is
    read only when a slot is free (its task is made then, not before), so a client that stops reading stops
    the reading of its requests and holds at most `depth` answers of the server's memory, each up to a whole
    message. A client that waits for an answer before sending more is answered."""
    slots = asyncio.Semaphore(max(1, depth))
    ready: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()  # bounded by the slots

    async def read() -> None:
        try:
            iterator, index = aiter(requests), 0
            while True:
                await slots.acquire()
                try:
                    request = await anext(iterator)
                except StopAsyncIteration:
                    break
                ready.put_nowait(("task", asyncio.ensure_future(handle(index, request))))
                del request
                index += 1
            ready.put_nowait(("end", None))
        except Exception as exc:  # noqa: BLE001 - the stream's reading failed: end it with that error
            ready.put_nowait(("error", exc))

    reader = asyncio.ensure_future(read())
    try:
        while True:
            kind, value = await ready.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            result = await value
            del value  # the finished task, and with it the result, must not outlive the yield
            yield result
            del result
            slots.release()  # sent: the next request may be read
    finally:
        reader.cancel()
        while not ready.empty():
            kind, value = ready.get_nowait()
            if kind == "task":
                value.cancel()


class Reply(NamedTuple):
    """One answer of a servicer: which model version served it, and the response (a message, or its bytes)."""

    model: str
    version: int
    response: Any
    content: int = 0  # LoadedModel.content of the model version that answered


class Pinned:
    """The versions of one stream: the first message resolves "newest", and later messages that name the same
    model without a version are served by the version it got, so that a version written mid-stream cannot
    mix in. The messages after the first wait their `turn` until the first has taken its version. A version
    whose files are replaced mid-stream under the same number (a repository deleted and trained anew) ends
    the stream (ABORTED) rather than mix two sets of weights under one label."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._contents: dict[tuple[str, int], int] = {}
        self._first = asyncio.Event()

    async def turn(self, index: int) -> None:
        if index > 0:
            await self._first.wait()

    def taken(self, index: int) -> None:
        """Message `index` is resolved (or failed): after the first, the others may go."""
        if index == 0:
            self._first.set()

    def version(self, model: str) -> int | None:
        return self._versions.get(model)

    def served(self, model: str, version: int, content: int = 0) -> None:
        self._versions.setdefault(model, version)
        first = self._contents.setdefault((model, version), content)
        if content and first and content != first:
            raise Aborted(f"model {model!r} version {version} changed on disk during this stream (its files were "
                          "replaced): the answers before this one came from its earlier files; send the rest "
                          "again in a new stream")


def served_stream(
    context: Aborts,
    admission: Admission,
    requests: AsyncIterator[Any],
    submit: Callable[[int, Any], Awaitable[Reply]],
    depth: int,
) -> AsyncGenerator[Any, None]:
    """An aevae.v1 streaming RPC: each request answered by one response, in order, `depth` at once.

    A whole stream is served by one version (Pinned). An error ends the stream with its status and the
    failing message's position.
    """
    pinned = Pinned()

    async def handle(index: int, message: Any) -> Any:
        await pinned.turn(index)
        try:
            request = readable(message)
            if not request.version:
                request.version = pinned.version(request.model) or 0
            reply = await submit(index, request)
            pinned.served(reply.model, reply.version, reply.content)
        except Exception as exc:  # noqa: BLE001 - re-raised with the message's position
            raise prefixed(exc, f"message {index}") from None
        finally:
            pinned.taken(index)
        return reply.response

    return answered_stream(context, admission, requests, handle, depth)


async def answered_stream(
    context: Aborts,
    admission: Admission,
    requests: AsyncIterator[Any],
    handle: Callable[[int, Any], Awaitable[Any]],
    depth: int,
) -> AsyncGenerator[Any, None]:
    """What every streaming RPC shares (aevae.v1's and the OIP's): one admission slot for the stream, each
    message answered by `handle(index, message)` in a task of its own, `depth` at once (pipelined), the
    responses yielded in order, each one's unsent bytes given back once gRPC has written it (Unsent), and
    an error ending the stream with its status (guarded)."""
    unsent = Unsent(admission)

    async def counted(index: int, message: Any) -> tuple[Any, AnswerSlot]:
        slot = unsent.open(index)  # in this message's task: its answer's bytes are counted in the slot
        try:
            return await handle(index, message), slot
        finally:
            unsent.passed(slot)  # whether or not it took room: the next message's turn

    async def admitted() -> AsyncIterator[tuple[Any, AnswerSlot]]:
        with admission.call():
            async for result in pipelined(requests, counted, depth):
                yield result
                del result  # the response's bytes must not outlive the yield

    results = admitted()
    try:
        while True:
            try:
                response, slot = await guarded(context, anext(results))
            except StopAsyncIteration:
                return
            yield response
            del response  # gRPC has written it and asks for the next
            unsent.sent(slot)
    finally:
        unsent.close()


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


