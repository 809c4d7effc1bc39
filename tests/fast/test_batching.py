"""The dynamic batcher on its own (services/batching.py): who shares a forward pass, where it runs, and that
each caller gets exactly its own rows or its own error."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pytest

from aevae.services.batching import Batcher
from aevae.services.grpc_common import Runner


class Model:
    """run(items) -> each item's rows doubled; remembers every batch and the thread it ran on."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.batches: list[list[int]] = []
        self.threads: list[int] = []
        self.delay = delay
        self.fail_on = fail_on

    def run(self, items: Sequence[np.ndarray]) -> list[np.ndarray]:
        self.batches.append([len(i) for i in items])
        self.threads.append(threading.get_ident())
        time.sleep(self.delay)
        if self.fail_on is not None and any(len(i) == self.fail_on for i in items):
            raise ValueError("the model failed")
        merged = np.concatenate(items) * 2
        out, start = [], 0
        for item in items:
            out.append(merged[start:start + len(item)])
            start += len(item)
        return out


def batcher(model: Model, calls: int, executor: ThreadPoolExecutor, max_rows: int = 256) -> Batcher:
    return Batcher(model.run, key=lambda item: item.dtype.str, rows=len, runner=Runner(executor, inline_max=64),
                   max_requests=32, max_rows=max_rows, calls=lambda: calls)


@pytest.fixture
def executor():
    with ThreadPoolExecutor(2) as pool:
        yield pool


def items(*sizes: int) -> list[np.ndarray]:
    return [np.full(n, k, np.float32) for k, n in enumerate(sizes)]


def test_a_caller_alone_runs_at_once_on_the_event_loop(executor) -> None:
    model = Model()

    async def main() -> tuple[np.ndarray, int, bool]:
        b = batcher(model, calls=1, executor=executor)
        turned = asyncio.Event()
        asyncio.get_running_loop().call_soon(turned.set)  # runs at the next turn of the loop
        out = await b.submit(np.ones(3, np.float32))
        return out, threading.get_ident(), turned.is_set()

    out, loop_thread, yielded = asyncio.run(main())
    assert out.tolist() == [2, 2, 2] and model.batches == [[3]] and model.threads == [loop_thread]
    assert not yielded  # answered without waiting for a turn of the loop


def test_concurrent_requests_share_one_pass_off_the_loop_and_each_gets_its_own_rows(executor) -> None:
    model = Model()
    sent = items(1, 5, 2, 7)

    async def main() -> tuple[list[np.ndarray], Batcher, int]:
        b = batcher(model, calls=4, executor=executor)
        return list(await asyncio.gather(*(b.submit(x) for x in sent))), b, threading.get_ident()

    got, b, loop_thread = asyncio.run(main())
    assert model.batches == [[1, 5, 2, 7]]  # one forward pass, in arrival order
    assert model.threads[0] != loop_thread  # others in flight: the loop keeps accepting meanwhile
    for x, y in zip(sent, got):
        np.testing.assert_array_equal(y, x * 2)
    assert (b.batches, b.merged) == (1, 4)


def test_requests_arriving_while_a_batch_runs_go_together_as_the_next(executor) -> None:
    model = Model(delay=0.05)

    async def main() -> list[np.ndarray]:
        b = batcher(model, calls=3, executor=executor)
        first = asyncio.ensure_future(b.submit(np.zeros(1, np.float32)))
        await asyncio.sleep(0.01)  # the first batch is running in the executor now
        rest = [asyncio.ensure_future(b.submit(x)) for x in items(2, 3)]
        return list(await asyncio.gather(first, *rest))

    got = asyncio.run(main())
    assert model.batches == [[1], [2, 3]]
    assert [len(g) for g in got] == [1, 2, 3]


def test_the_row_cap_splits_batches_and_a_big_request_goes_alone(executor) -> None:
    model = Model()

    async def main() -> None:
        b = batcher(model, calls=5, executor=executor, max_rows=10)
        await asyncio.gather(*(b.submit(x) for x in items(4, 4, 4, 30, 1)))

    asyncio.run(main())
    assert model.batches == [[4, 4], [4], [30], [1]]


def test_a_failed_pass_fails_its_own_callers_only(executor) -> None:
    model = Model(delay=0.05, fail_on=2)

    async def main() -> list[object]:
        b = batcher(model, calls=3, executor=executor)
        first = asyncio.ensure_future(b.submit(np.zeros(2, np.float32)))  # its pass fails
        await asyncio.sleep(0.01)
        later = asyncio.ensure_future(b.submit(np.zeros(3, np.float32)))  # the next pass
        return list(await asyncio.gather(first, later, return_exceptions=True))

    failed, ok = asyncio.run(main())
    assert isinstance(failed, ValueError) and isinstance(ok, np.ndarray) and len(ok) == 3
