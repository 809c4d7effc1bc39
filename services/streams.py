"""Streaming RPCs: each message answered in a task of its own, `depth` at once, the responses in request order
(`pipelined`); one admission slot for the stream, and each answer's bytes counted until gRPC has sent it, so
that a client that stops reading holds little of the server's memory (`answered_stream`). aevae.v1's streams
are also served by one model version throughout (`Pinned`, `served_stream`). An error ends the stream with
its status and the failing message's position."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, NamedTuple, TypeVar

from aevae.errors import Aborted, DeadlineExceeded
from aevae.services.admission import Admission, AnswerSlot, Unsent
from aevae.services.registration import readable
from aevae.services.status import Aborts, guarded, prefixed

T = TypeVar("T")
R = TypeVar("R")


async def pipelined(
    requests: AsyncIterator[R], handle: Callable[[int, R], Awaitable[T]], depth: int = 2, idle_s: float = 0.0,
    first: Callable[[], None] | None = None,
) -> AsyncIterator[T]:
    """Handles each request as it arrives and yields the results in request order as soon as each is ready.

    At most `depth` answers exist at once, counting the one on the wire (the consumer's yield returns once
    gRPC has taken it): with 2, the next message is computed while the previous one is sent. A request is
    read only when a slot is free (its task is made then, not before), so a client that stops reading stops
    the reading of its requests and holds at most `depth` answers of the server's memory, each up to a whole
    message. A client that waits for an answer before sending more is answered.

    With `idle_s`, a stream idle that long (no request arrives while every answer has been taken) ends with
    DEADLINE_EXCEEDED: the clock runs only while nothing is left to answer, so neither a long computation nor
    a client that reads slowly counts as idle.

    `first` is called when the first request has come, before it is handled; what it raises ends the stream
    (the admission slot is taken there: a stream that sends nothing holds none)."""
    slots = asyncio.Semaphore(max(1, depth))
    ready: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()  # bounded by the slots
    loop = asyncio.get_running_loop()
    idle = asyncio.timeout(loop.time() + idle_s if idle_s > 0 else None)
    reading = True  # the idle clock may only be changed while `read` is within it
    outstanding = 0  # answers being computed, or computed and not yet taken by the consumer

    async def read() -> None:
        nonlocal reading, outstanding
        try:
            async with idle:
                iterator, index = aiter(requests), 0
                while True:
                    await slots.acquire()
                    try:
                        request = await anext(iterator)
                    except StopAsyncIteration:
                        break
                    if index == 0 and first is not None:
                        first()
                    outstanding += 1
                    idle.reschedule(None)  # something to answer: not idle
                    ready.put_nowait(("task", asyncio.ensure_future(handle(index, request))))
                    del request
                    index += 1
            ready.put_nowait(("end", None))
        except TimeoutError:
            if not idle.expired():
                raise
            ready.put_nowait(("error", DeadlineExceeded(
                f"stream idle for {idle_s:g} s: no request message came while every answer had been sent; "
                "the server ends idle streams after --stream-idle-s, to give back their call slot: send the "
                "next message sooner, or open a new stream when there is more to send")))
        except Exception as exc:  # noqa: BLE001 - the stream's reading failed: end it with that error
            ready.put_nowait(("error", exc))
        finally:
            reading = False

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
            outstanding -= 1
            if not outstanding and reading and idle_s > 0:
                idle.reschedule(loop.time() + idle_s)
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
    """The versions of one stream: the first message that asks for the newest version of a model resolves it,
    and every later one that does is served by the version it got, so that a version written mid-stream
    cannot mix in. While one message resolves a model's newest, the others asking for it wait for its answer
    (`asking`): with several messages computed at once, a later one resolved "newest" on its own, and a
    stream [v1, newest, newest] with v3 written meanwhile was answered [1, 2, 3]. A version asked by number
    pins nothing. A version whose files are replaced mid-stream under the same number (a repository deleted
    and trained anew) ends the stream (ABORTED) rather than mix two sets of weights under one label."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}
        self._resolving: dict[str, asyncio.Event] = {}
        self._contents: dict[tuple[str, int], int] = {}

    @contextlib.asynccontextmanager
    async def asking(self, model: str, newest: bool) -> AsyncIterator[int | None]:
        """Around one message: the version it is to ask for, the one pinned for `model` (None: the number it
        names, or, first to ask for the newest, the newest as the store resolves it, which `served` then pins;
        if it fails, the next waiting message resolves it instead)."""
        while newest and model not in self._versions and model in self._resolving:
            await self._resolving[model].wait()
        resolver = newest and model not in self._versions
        if resolver:
            self._resolving[model] = asyncio.Event()
        try:
            yield self._versions.get(model) if newest else None
        finally:
            if resolver:
                self._resolving.pop(model).set()

    def served(self, model: str, version: int, content: int = 0, newest: bool = True) -> None:
        """Message answered by `version`; `newest`: the message asked for the newest, which the version then
        stands for in this stream (a version asked by number does not: a stream [v1, newest] is answered by
        v1 and the newest)."""
        if newest:
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
        try:
            request = readable(message)
            newest = not request.version
            async with pinned.asking(request.model, newest) as version:
                request.version = version or request.version
                reply = await submit(index, request)
                pinned.served(reply.model, reply.version, reply.content, newest)
        except Exception as exc:  # noqa: BLE001 - re-raised with the message's position
            raise prefixed(exc, f"message {index}") from None
        return reply.response

    return answered_stream(context, admission, requests, handle, depth)


async def answered_stream(
    context: Aborts,
    admission: Admission,
    requests: AsyncIterator[Any],
    handle: Callable[[int, Any], Awaitable[Any]],
    depth: int,
) -> AsyncGenerator[Any, None]:
    """What every streaming RPC shares (aevae.v1's and the OIP's): one admission slot for the stream (given
    back when it ends, or after `admission.stream_idle_s` of idleness), each
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
        # The stream's slot is taken with its first message: 256 streams opened on one connection that sent
        # nothing held every slot, and every other client's calls were refused, for --stream-idle-s each time
        with contextlib.ExitStack() as slot:
            async for result in pipelined(requests, counted, depth, admission.stream_idle_s,
                                          lambda: slot.enter_context(admission.stream())):
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
