"""The dynamic batcher on its own (services/batching.py): who shares a forward pass, where it runs, and that
each caller gets exactly its own rows or its own error."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Sequence

import numpy as np
import pytest

from aevae.services.batching import Batcher, Gathering, loop_busy
from aevae.services.admission import Runner


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


class NoLoading(Executor):
    """The Runner's loader threads are for work that may wait on the disk; a batch must never run there (the
    executor's few threads bound how many forward passes run at once)."""

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a batch was sent to the loader threads")


def batcher(model: Model, calls: int, executor: ThreadPoolExecutor, max_rows: int = 256,
            gather_s: float = 0.0) -> Batcher:
    return Batcher(model.run, key=lambda item: item.dtype.str, rows=len,
                   runner=Runner(executor, inline_max=64, loader=NoLoading()),
                   max_requests=32, max_rows=max_rows, calls=lambda: calls, gather_s=gather_s)


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
    assert sorted(model.batches) == [[4, 1], [4, 4], [30]]  # the big one in its own group: the 1 joins a 4


def test_small_calls_do_not_wait_behind_a_big_request_of_the_same_model(executor) -> None:
    """A request bigger than a batch queued with the small ones: a one-latent call waited out another
    client's huge messages (1.2-1.9 s behind a stream of 16,000-latent messages). It now has a group of its
    own, and the small calls' passes run beside it on the executor's other thread."""
    done: list[int] = []

    def run(batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        time.sleep(0.5 if len(batch[0]) > 10 else 0.0)
        done.append(len(batch[0]))
        return [x * 2 for x in batch]

    async def main() -> None:
        b = Batcher(run, key=lambda item: item.dtype.str, rows=len,
                    runner=Runner(executor, inline_max=0, loader=NoLoading()), max_requests=32, max_rows=10,
                    calls=lambda: 3)
        big = [asyncio.ensure_future(b.submit(np.ones(30, np.float32))) for _ in range(2)]
        await asyncio.sleep(0.05)  # the first big pass is running, the second waits for it
        small = await b.submit(np.ones(1, np.float32))
        assert small.tolist() == [2.0] and not any(f.done() for f in big)
        await asyncio.gather(*big)

    asyncio.run(main())
    assert done == [1, 30, 30]


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


# -- gathering: small unary calls on a busy server wait a moment for company --------------------------------
def busy_loop() -> None:
    """Leaves a callback ready on the running loop, as other calls' work would."""
    asyncio.get_running_loop().call_soon(lambda: None)


def test_loop_busy_reads_the_default_event_loops_ready_queue() -> None:
    """The signal gathering rests on (a private attribute of asyncio's loop): if a Python release renames it,
    this fails rather than gathering silently turning itself off."""

    async def main() -> tuple[bool, bool]:
        idle = loop_busy(asyncio.get_running_loop())
        busy_loop()
        return idle, loop_busy(asyncio.get_running_loop())

    assert asyncio.run(main()) == (False, True)


def test_unary_calls_on_a_busy_loop_gather_and_run_together_on_the_loop_without_waiting_out_the_window(
        executor) -> None:
    model = Model()
    sent = items(1, 5)

    async def main() -> tuple[list[np.ndarray], float, int, Batcher]:
        b = batcher(model, calls=2, executor=executor, gather_s=30.0)
        busy_loop()
        start = time.perf_counter()
        got = await asyncio.gather(*(b.submit(x, company=True) for x in sent))
        return list(got), time.perf_counter() - start, threading.get_ident(), b

    got, seconds, loop_thread, b = asyncio.run(main())
    assert model.batches == [[1, 5]] and model.threads == [loop_thread]
    assert seconds < 5  # the second call completed the batch: no waiting out the 30 s window
    for x, y in zip(sent, got):
        np.testing.assert_array_equal(y, x * 2)
    assert (b.batches, b.merged, b.gathering.target) == (1, 2, 2)
    assert b.gathering.ended == {"target": 1, "window": 0, "alone": 0}


def test_a_call_alone_on_an_idle_loop_and_a_streams_message_never_gather(executor) -> None:
    model = Model()

    async def main() -> tuple[float, float]:
        b = batcher(model, calls=1, executor=executor, gather_s=30.0)
        start = time.perf_counter()
        await b.submit(np.ones(2, np.float32), company=True)  # nothing else ready: runs at once
        alone = time.perf_counter() - start
        busy_loop()
        start = time.perf_counter()
        await b.submit(np.ones(3, np.float32))  # a stream's message: never waits for company
        stream = time.perf_counter() - start
        return alone, stream

    alone, stream = asyncio.run(main())
    assert model.batches == [[2], [3]]
    assert alone < 5 and stream < 5


def test_a_lonely_window_runs_the_call_alone_and_the_next_busy_calls_skip_gathering(executor) -> None:
    model = Model()

    async def main() -> tuple[float, float, int, dict[str, int]]:
        b = batcher(model, calls=1, executor=executor, gather_s=0.05)
        busy_loop()
        start = time.perf_counter()
        await b.submit(np.ones(2, np.float32), company=True)  # nobody comes
        lonely = time.perf_counter() - start
        busy_loop()
        start = time.perf_counter()
        await b.submit(np.ones(3, np.float32), company=True)  # skipped: runs at once
        return lonely, time.perf_counter() - start, b.gathering.skip, dict(b.gathering.ended)

    lonely, next_call, skip, ended = asyncio.run(main())
    assert model.batches == [[2], [3]]
    assert lonely >= 0.05 and next_call < 0.05 and skip == 1
    assert ended == {"target": 0, "window": 0, "alone": 1}


def test_gathering_learns_its_target_probes_higher_and_backs_off_probes_that_fail() -> None:
    g = Gathering(most=32)
    g.timed_out(5)  # five came within the window: wait for five next time
    assert g.target == 5
    for _ in range(g.probe_every):
        g.reached()
    assert g.target == 6  # every probe_every-th batch tries one more
    g.timed_out(5)  # the probe failed: five is what comes; probe half as often
    assert (g.target, g.probe_every) == (5, 8)
    for _ in range(8):
        g.reached()
    assert g.target == 6
    g.reached()  # the probe succeeded: probe again soon
    assert g.probe_every == 4
    big = Gathering(most=3)
    big.timed_out(10)
    assert big.target == 3  # never more than a batch holds
    for _ in range(10):
        big.reached()
    assert big.target == 3


def test_lonely_windows_double_the_skip_and_company_clears_it() -> None:
    g = Gathering(most=32)
    skips = []
    for _ in range(8):
        g.timed_out(1)
        skipped = 0
        while not g.wanted():
            skipped += 1
        skips.append(skipped)
    assert skips == [1, 2, 4, 8, 16, 32, 64, 64]
    g.timed_out(3)
    assert g.skip == 0 and g.wanted() and g.target == 3
    assert not Gathering(most=1).wanted()  # batching off: never gathers
