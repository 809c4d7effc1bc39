"""Dynamic batching: concurrent requests for the same model, version and layout run as one forward pass.

No request waits for company when the server is idle: a small request of a caller alone runs at once, on the
event loop (no future, no thread hop). Otherwise a request is queued, and the queue is flushed at the next turn
of the event loop (after every request that arrived in the same turn has joined it), or after `window_s` when
that is set. With other calls in flight a batch runs in the executor, so that the event loop keeps accepting
requests meanwhile: they queue up and go together as the next batch. Each request was validated on its own
before it joined (one bad request never fails its neighbours), and each caller gets exactly its own rows back.

Small unary calls on a busy server gather (`gather_s`). On grpc.aio concurrent calls reach the handler one at a
time, each after the previous one's handler has returned (measured: with 16 one-latent calls in flight the
next call reaches the batcher 200-530 us after the last one left it), so a small call that ran at once would
always run alone, paying a whole forward pass per latent. When the event loop has other work ready at the
moment such a call arrives (the sign that other calls are on their way: a caller alone finds it empty), the
call waits up to `gather_s` for others to join it and the batch then runs on the event loop. How many it waits
for adapts (`Gathering`), so that a steady load flushes as soon as its usual company is in instead of waiting
out the window (docs/measurements.md).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

from aevae.services.admission import Engine, Runner

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Group(Generic[Item, Result]):
    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    busy: bool = False
    gathering: asyncio.TimerHandle | None = None  # the deadline of a batch gathering company


def loop_busy(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the event loop has callbacks ready to run besides the current one: other calls' work. Reads
    asyncio's ready queue (`BaseEventLoop._ready`, private but unchanged since Python 3.4); a loop without one
    (uvloop) never looks busy, and small calls then run at once as on an idle server."""
    return bool(getattr(loop, "_ready", None))


class Gathering:
    """How many small calls a busy server waits for before running them, learnt from the load.

    A batch that reaches `target` runs at once; one whose window ends first sets `target` to the calls it
    gathered. Every `probe_every` batches that reached it, `target` grows by one to find out whether more
    company would come; a probe that ends in the window doubles that interval (up to 256), so that a steady load
    of 4 callers loses a window once in hundreds of batches rather than once in four. A window that ends with
    the call still alone means that the ready work was not other calls (a stream, a big call): the next
    `skip` small calls run at once, `skip` doubling on each lonely window up to 64 and cleared by a batch of two
    or more."""

    MAX_PROBE_EVERY = 256
    MAX_SKIP = 64

    def __init__(self, most: int):
        self.most = most
        self.target = 2
        self.probe_every = 4
        self._since_probe = 0  # batches that reached the target since the last probe
        self._probing = False
        self.skip = 0
        self._skipping = 0
        # how gathering batches ended, for metrics: on reaching the target, at the window's end with company,
        # at the window's end alone
        self.ended = {"target": 0, "window": 0, "alone": 0}

    def wanted(self) -> bool:
        """Whether the next small call on a busy server should gather (not during a skip after lonely windows)."""
        if self._skipping:
            self._skipping -= 1
            return False
        return self.most > 1

    def reached(self) -> None:
        self.ended["target"] += 1
        self.skip = 0
        if self._probing:  # more company came: probe again soon
            self.probe_every = 4
        self._probing = False
        self._since_probe += 1
        if self._since_probe >= self.probe_every and self.target < self.most:
            self._since_probe = 0
            self.target += 1
            self._probing = True

    def timed_out(self, gathered: int) -> None:
        self._since_probe = 0
        if self._probing:
            self.probe_every = min(2 * self.probe_every, self.MAX_PROBE_EVERY)
        self._probing = False
        if gathered <= 1:
            self.ended["alone"] += 1
            self.skip = min(max(1, 2 * self.skip), self.MAX_SKIP)
            self._skipping = self.skip
            return
        self.ended["window"] += 1
        self.skip = 0
        self.target = max(2, min(gathered, self.most))


class Batcher(Generic[Item, Result]):
    """`run(items)` computes the results of a list of items of one group (same `key(item)`), in order."""

    def __init__(self, run: Callable[[Sequence[Item]], list[Result]], key: Callable[[Item], Hashable],
                 rows: Callable[[Item], int], runner: Runner, max_requests: int, max_rows: int,
                 window_s: float = 0.0, calls: Callable[[], int] = lambda: 1, gather_s: float = 0.0):
        """`calls()`: the calls in flight on the server, the caller's included (1: it is alone). `gather_s`:
        how long a small call that asks for company waits for it on a busy server (0: never)."""
        self.run = run
        self.key = key
        self.rows = rows
        self.runner = runner
        self.max_requests = max_requests
        self.max_rows = max_rows
        self.window_s = window_s
        self.calls = calls
        self.gather_s = gather_s
        self.gathering = Gathering(max_requests)
        self._groups: defaultdict[Hashable, _Group[Item, Result]] = defaultdict(_Group)
        self.batches = 0  # forward passes run, for metrics and tests
        self.merged = 0  # requests answered by a forward pass shared with others

    @classmethod
    def of_jobs(cls, run: Callable[[Sequence[Item]], list[Result]], engine: Engine) -> "Batcher[Item, Result]":
        """A servicer's batcher: jobs grouped by their `key` and counted by their `rows`, with the engine's
        runner, admission and batching settings."""
        return cls(run, key=lambda job: job.key, rows=lambda job: job.rows,  # type: ignore[attr-defined]
                   runner=engine.run, max_requests=engine.batch_size, max_rows=engine.batch_rows,
                   window_s=engine.batch_wait_s, calls=lambda: engine.admission.calls,
                   gather_s=engine.batch_gather_s)

    async def submit(self, item: Item, company: bool = False) -> Result:
        """The item's result. `company`: the item is a unary call's, which may wait for others on a busy server
        (a stream's messages come one after another from one client and would wait in vain)."""
        # A request bigger than a batch runs alone anyway: it queues in a group of its own, so that small
        # calls for the same model never wait behind it (one-latent calls waited 1.2-1.9 s behind another
        # client's stream of 16,000-latent messages); the two groups' passes run side by side on the executor.
        rows = self.rows(item)
        key = (self.key(item), rows > self.max_rows)
        loop = asyncio.get_running_loop()
        if key not in self._groups and not self.window_s:
            small = rows <= self.runner.inline_max
            if company and small and self.gather_s > 0 and loop_busy(loop) and self.gathering.wanted():
                return await self._gather(loop, key, item)
            if small and self.calls() <= 1:
                self.batches += 1  # alone and small: nobody to merge with, so no queue and no wait
                return self.run([item])[0]
        future: asyncio.Future[Result] = loop.create_future()
        group = self._groups[key]
        group.waiting.append((item, future))
        if group.gathering is not None:
            if len(group.waiting) >= self.gathering.target:  # its company is in: run now
                group.gathering.cancel()
                group.gathering = None
                self.gathering.reached()
                self._flush(key, gathered=True)
        elif not group.busy and len(group.waiting) == 1:
            if self.window_s > 0:
                loop.call_later(self.window_s, self._flush, key)
            else:
                loop.call_soon(self._flush, key)
        return await future

    async def _gather(self, loop: asyncio.AbstractEventLoop, key: Hashable, item: Item) -> Result:
        """Opens a batch that waits up to `gather_s` for `gathering.target` calls (see `submit`)."""
        future: asyncio.Future[Result] = loop.create_future()
        group = self._groups[key]
        group.waiting.append((item, future))

        def window_ended() -> None:
            group.gathering = None
            self.gathering.timed_out(len(group.waiting))
            self._flush(key, gathered=True)

        group.gathering = loop.call_later(self.gather_s, window_ended)
        return await future

    def _inline(self, rows: int) -> bool:
        """Run on the event loop: small, and no other call in flight whose request it would hold up."""
        return rows <= self.runner.inline_max and self.calls() <= 1

    def _take(self, group: _Group[Item, Result]) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The next batch: waiting requests in arrival order up to the caps (a big one, in its own group,
        goes alone)."""
        batch: list[tuple[Item, asyncio.Future[Result]]] = []
        rows = 0
        while group.waiting and len(batch) < self.max_requests:
            item, future = group.waiting[0]
            if future.cancelled():  # its caller has gone: never computed
                group.waiting.pop(0)
                continue
            n = self.rows(item)
            if batch and rows + n > self.max_rows:
                break
            batch.append(group.waiting.pop(0))
            rows += n
        return batch

    def _flush(self, key: Hashable, gathered: bool = False) -> None:
        """Runs the waiting batches of a group: small ones right here on the event loop (no thread hop, no
        task), a big one in the executor, after which the group is flushed again. A gathered batch runs on the
        event loop even with other calls in flight: they are its own members, and the executor's thread hop
        cost more than it let overlap (16 one-latent calls in flight: 2,620-2,685 calls/s against
        3,071-3,287 inline, docs/measurements.md)."""
        group = self._groups[key]
        while not group.busy:
            batch = self._take(group)
            if not batch:
                self._groups.pop(key, None)
                return
            items = [item for item, _ in batch]
            rows = sum(map(self.rows, items))
            if self._inline(rows) or (gathered and rows <= self.runner.inline_max):
                try:
                    results: list[Any] = self.run(items)
                except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
                    results = [exc] * len(batch)
                self._deliver(batch, results)
            else:
                group.busy = True
                asyncio.ensure_future(self._run_off_loop(key, group, batch, rows))

    async def _run_off_loop(self, key: Hashable, group: _Group[Item, Result],
                            batch: list[tuple[Item, asyncio.Future[Result]]], rows: int) -> None:
        items = [item for item, _ in batch]
        try:
            results: list[Any] = await self.runner.compute(lambda: self.run(items))
        except Exception as exc:  # noqa: BLE001 - every caller of this batch gets the error
            results = [exc] * len(batch)
        finally:
            group.busy = False
        self._deliver(batch, results)
        self._flush(key)

    def _deliver(self, batch: list[tuple[Item, asyncio.Future[Result]]], results: list[Any]) -> None:
        self.batches += 1
        self.merged += len(batch) if len(batch) > 1 else 0
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
