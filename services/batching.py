"""Dynamic batching: concurrent requests for the same model, version and layout run as one forward pass.

No request waits for company when the model is idle: a small request of a caller alone on the server runs at
once, on the event loop (no future, no thread hop). Otherwise a request is queued, and the queue is flushed at
the next turn of the event loop (after every request that arrived in the same turn has joined it), or after
`window_s` when that is set. With other calls in flight a batch runs in the executor, so that the event loop
keeps accepting requests meanwhile: they queue up and go together as the next batch (a batch run on the loop
would block their arrival, and each would then run alone). Each request was validated on its own before it
joined (one bad request never fails its neighbours), and each caller gets exactly its own rows back.

Measured on grpc.aio (README, Measured): many concurrent one-latent calls reach the handler one at a time, so
each finds itself alone and runs inline. Requests over `--inline-max` rows run in the executor, and those
arriving meanwhile merge; for one-latent calls a window (or `--inline-max 0`) costs more than it saves.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Hashable, Sequence, TypeVar

from aevae.services.grpc_common import Runner

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Group(Generic[Item, Result]):
    waiting: list[tuple[Item, asyncio.Future[Result]]] = field(default_factory=list)
    busy: bool = False


class Batcher(Generic[Item, Result]):
    """`run(items)` computes the results of a list of items of one group (same `key(item)`), in order."""

    def __init__(self, run: Callable[[Sequence[Item]], list[Result]], key: Callable[[Item], Hashable],
                 rows: Callable[[Item], int], runner: Runner, max_requests: int, max_rows: int,
                 window_s: float = 0.0, calls: Callable[[], int] = lambda: 1):
        """`calls()`: the calls in flight on the server, the caller's included (1: it is alone)."""
        self.run = run
        self.key = key
        self.rows = rows
        self.runner = runner
        self.max_requests = max_requests
        self.max_rows = max_rows
        self.window_s = window_s
        self.calls = calls
        self._groups: defaultdict[Hashable, _Group[Item, Result]] = defaultdict(_Group)
        self.batches = 0  # forward passes run, for metrics and tests
        self.merged = 0  # requests answered by a forward pass shared with others

    async def submit(self, item: Item) -> Result:
        key = self.key(item)
        if key not in self._groups and not self.window_s and self._inline(self.rows(item)):
            self.batches += 1  # alone and small: nobody to merge with, so no queue and no wait
            return self.run([item])[0]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        group = self._groups[key]
        group.waiting.append((item, future))
        if not group.busy and len(group.waiting) == 1:
            if self.window_s > 0:
                loop.call_later(self.window_s, self._flush, key)
            else:
                loop.call_soon(self._flush, key)
        return await future

    def _inline(self, rows: int) -> bool:
        """Run on the event loop: small, and no other call in flight whose request it would hold up."""
        return rows <= self.runner.inline_max and self.calls() <= 1

    def _take(self, group: _Group[Item, Result]) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The next batch: waiting requests in arrival order up to the caps (a big request goes alone)."""
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

    def _flush(self, key: Hashable) -> None:
        """Runs the waiting batches of a group: small ones right here on the event loop (no thread hop, no
        task), a big one in the executor, after which the group is flushed again."""
        group = self._groups[key]
        while not group.busy:
            batch = self._take(group)
            if not batch:
                self._groups.pop(key, None)
                return
            items = [item for item, _ in batch]
            rows = sum(map(self.rows, items))
            if self._inline(rows):
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
            results: list[Any] = await self.runner(lambda: self.run(items), rows, False)
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
