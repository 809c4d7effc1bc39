"""Admission control: caps on the calls in flight and on the request bytes they hold (past either,
RESOURCE_EXHAUSTED naming the flag to change), and room in a byte budget for the answers, waited for rather
than refused, so that many big calls, or streams whose clients stop reading, cannot run the server out of
memory. `Engine` puts it together with the `Runner` (model work off the event loop, or inline when tiny) and
the batching settings: every servicer computes its answers through `Engine.answered`, within the budget."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

from aevae.errors import ResourceExhausted

T = TypeVar("T")


# Streams may hold all but 1/STREAMS_LEAVE of the call slots: the rest stay for unary calls, so that streams
# whose clients stop reading (they hold their slots until their connection ages out) cannot refuse every call.
STREAMS_LEAVE = 4


class Admission:
    """Caps the model calls in flight and the request bytes they hold: past a cap, RESOURCE_EXHAUSTED naming
    it; health and ListModels are not counted, so they still answer. Answers wait for room in the same byte
    budget before they are computed and hold it until they are built (backpressure, not an error), so that many
    big calls at once compute at most about `max_bytes` of answers.

    A stream's answers are also counted from before they are computed until gRPC has sent them (`unsent`, at
    most `max_unsent`; see `Unsent`): a reader slower than the server keeps its answers waiting in the
    server's memory, and a flood of streams whose clients stop reading would otherwise hold a stream depth of
    answers each, without bound. Past the cap, streams wait before computing their next answer; unary calls
    never wait for it, so readers that stop can hold up other streams, not the other calls.

    A stream holds its call slot while it is open, so one whose client sends nothing more while it has nothing
    left to answer ends after `stream_idle_s` (DEADLINE_EXCEEDED; 0: never, see `streams.pipelined`): clients
    that open streams and leave them idle cannot hold every slot. Streams hold at most `max_streams` of the
    slots, the rest kept for unary calls (see STREAMS_LEAVE): 256 streams whose client wrote answers it never
    read held every slot, for up to the connection's age, and every other client's calls were refused."""

    def __init__(self, max_calls: int, max_bytes: int, max_unsent: int | None = None, stream_idle_s: float = 0.0):
        self.max_calls = max_calls
        self.max_streams = max_calls - max_calls // STREAMS_LEAVE  # a quarter kept for unary calls (of 4 and more)
        self.streams = 0
        self.max_bytes = max_bytes
        self.max_unsent = 2 * max_bytes if max_unsent is None else max_unsent
        self.stream_idle_s = stream_idle_s
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

    def stream(self) -> "_Stream":
        """Like `call`, for a stream: one of the `max_streams` slots streams may hold, and a call slot."""
        return _Stream(self)

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
            calls = f"{admission.calls} call{'' if admission.calls == 1 else 's'}"
            raise ResourceExhausted(f"the server has {calls} in flight, its limit "
                                    f"(--max-concurrent-rpcs {admission.max_calls}); retry with backoff")
        admission.calls += 1

    def __exit__(self, *exc: object) -> None:
        self.admission.calls -= 1


class _Stream:
    """Admission.stream's context manager: the stream cap first, then a call slot as any call."""

    __slots__ = ("admission", "call")

    def __init__(self, admission: Admission):
        self.admission = admission
        self.call = _Call(admission)

    def __enter__(self) -> None:
        admission = self.admission
        if admission.streams >= admission.max_streams:
            raise ResourceExhausted(f"the server has {admission.streams} streams open, the most it lets streams hold "
                                    f"({admission.max_streams} of --max-concurrent-rpcs {admission.max_calls}; the "
                                    "rest are kept for unary calls); retry with backoff, or call Decode/Encode")
        self.call.__enter__()
        admission.streams += 1

    def __exit__(self, *exc: object) -> None:
        self.admission.streams -= 1
        self.call.__exit__()


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
    """Runs model work in the executor, or inline when it is tiny and needs no disk (one thread hop saved).

    Work that may need the disk (`ready` False: a version to load, the repository to look at again) runs on
    `loader`, threads of their own: a version whose files take seconds to hash and load (a big one, slow
    storage) then holds loader threads, the calls waiting for it, and never the executor's few threads that
    every loaded model's calls run on (measured: calls for a loaded model took up to 9 s while another model's
    3 GB version loaded)."""

    def __init__(self, executor: Executor, inline_max: int, loader: Executor | None = None):
        self.executor = executor
        self.inline_max = inline_max
        self.loader = executor if loader is None else loader

    async def __call__(self, work: Callable[[], T], n: int, ready: bool) -> T:
        if ready and n <= self.inline_max:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self.executor if ready else self.loader, work)

    async def compute(self, work: Callable[[], T]) -> T:
        """The model's own work (a batch), always on the executor's threads: they bound how many forward
        passes run at once."""
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
