"""A stream's pipeline on its own (services/streams.pipelined): answers in request order, at most `depth`
of them alive at once, the one being sent included, and nothing read ahead for a client that stops reading."""

from __future__ import annotations

import asyncio
import random
from typing import AsyncIterator

import pytest

from aevae.errors import DeadlineExceeded
from aevae.services.streams import pipelined


class Source:
    """An async request stream of `n` integers that counts how many have been pulled: it breaks at `fail_at`,
    pauses `pause` seconds before each one after the first, and, if `hang`, never ends (an open stream whose
    client sends nothing more)."""

    def __init__(self, n: int, fail_at: int | None = None, pause: float = 0.0, hang: bool = False):
        self.n, self.fail_at, self.pause, self.hang, self.pulled = n, fail_at, pause, hang, 0

    async def __aiter__(self) -> AsyncIterator[int]:
        for i in range(self.n):
            if i == self.fail_at:
                raise ConnectionError("the client's stream broke")
            if i and self.pause:
                await asyncio.sleep(self.pause)
            self.pulled += 1
            yield i
            await asyncio.sleep(0)
        if self.hang:
            await asyncio.Event().wait()


def test_answers_come_in_request_order_with_at_most_depth_being_computed() -> None:
    alive, most = 0, 0
    rng = random.Random(0)

    async def handle(index: int, request: int) -> int:
        nonlocal alive, most
        alive += 1
        most = max(most, alive)
        await asyncio.sleep(rng.uniform(0, 0.003))
        alive -= 1
        return request * 10

    async def main() -> list[int]:
        return [answer async for answer in pipelined(Source(40).__aiter__(), handle, depth=3)]

    assert asyncio.run(main()) == [i * 10 for i in range(40)]
    assert 1 < most <= 3  # concurrent, within the depth


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_reader_that_stops_holds_at_most_depth_answers_and_stops_the_reading(depth: int) -> None:
    source = Source(100)
    made: list[int] = []

    async def handle(index: int, request: int) -> int:
        made.append(index)
        return request

    async def main() -> None:
        answers = pipelined(source.__aiter__(), handle, depth=depth)
        assert await anext(answers) == 0  # now "on the wire": the consumer does not come back for a while
        await asyncio.sleep(0.05)
        # the answer being sent and depth - 1 more, computed; no request read beyond them
        assert made == list(range(depth)) and source.pulled == depth
        assert [await anext(answers) for _ in range(3)] == [1, 2, 3]
        await answers.aclose()

    asyncio.run(main())


def test_a_broken_request_stream_ends_with_its_error_after_the_earlier_answers() -> None:
    async def handle(index: int, request: int) -> int:
        return request

    async def main() -> list[int]:
        got: list[int] = []
        with pytest.raises(ConnectionError, match="broke"):
            async for answer in pipelined(Source(10, fail_at=4).__aiter__(), handle, depth=2):
                got.append(answer)
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3]


def test_closing_the_stream_cancels_the_answers_still_being_computed() -> None:
    started: list[int] = []
    cancelled: list[int] = []

    async def handle(index: int, request: int) -> int:
        started.append(index)
        try:
            await asyncio.sleep(0 if index == 0 else 3600)
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        return request

    async def main() -> None:
        answers = pipelined(Source(10).__aiter__(), handle, depth=2)
        assert await anext(answers) == 0
        await asyncio.sleep(0.01)
        await answers.aclose()  # the client went away
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert started == [0, 1] and cancelled == [1]


def test_a_stream_s_version_replaced_on_disk_under_the_same_number_ends_it() -> None:
    """The repository deleted and trained anew mid-stream makes another version 1: the stream stops
    (ABORTED, naming what happened) rather than label two sets of weights as one version."""
    from aevae.errors import Aborted
    from aevae.services.streams import Pinned

    pinned = Pinned()
    pinned.served("vae", 1, content=111)
    pinned.served("vae", 1, content=111)  # the same files: goes on
    pinned.served("ae", 3, content=222)
    with pytest.raises(Aborted, match="model 'vae' version 1 changed on disk during this stream"):
        pinned.served("vae", 1, content=999)

    async def asked() -> int | None:
        async with pinned.asking("vae", True) as version:
            return version

    assert asyncio.run(asked()) == 1


def test_an_idle_stream_ends_with_deadline_exceeded_after_its_answers() -> None:
    async def handle(index: int, request: int) -> int:
        return request

    async def main() -> list[int]:
        got: list[int] = []
        with pytest.raises(DeadlineExceeded, match="idle for 0.05 s.*--stream-idle-s"):
            async for answer in pipelined(Source(3, hang=True).__aiter__(), handle, depth=2, idle_s=0.05):
                got.append(answer)
        return got

    assert asyncio.run(asyncio.wait_for(main(), 10)) == [0, 1, 2]  # bounded: a stream that never ends fails


def test_without_idle_s_an_idle_stream_stays_open() -> None:
    async def handle(index: int, request: int) -> int:
        return request

    async def main() -> None:
        answers = pipelined(Source(1, hang=True).__aiter__(), handle, depth=2)
        assert await anext(answers) == 0
        with pytest.raises(TimeoutError):  # the test's own wait, not the stream's end
            await asyncio.wait_for(anext(answers), 0.2)
        await answers.aclose()

    asyncio.run(main())


@pytest.mark.parametrize("slow", ["model", "reader", "pauses"])
def test_slow_answers_a_slow_reader_and_short_pauses_are_not_idle(slow: str) -> None:
    """The idle clock runs only while every answer has been taken and no request came: a computation or a
    reader slower than idle_s, or pauses between requests shorter than it, keep the stream open."""
    async def handle(index: int, request: int) -> int:
        if slow == "model":
            await asyncio.sleep(0.15)
        return request

    async def main() -> list[int]:
        got = []
        source = Source(4, pause=0.03 if slow == "pauses" else 0.0)
        async for answer in pipelined(source.__aiter__(), handle, depth=2, idle_s=0.08):
            got.append(answer)
            if slow == "reader":
                await asyncio.sleep(0.15)
        return got

    assert asyncio.run(main()) == [0, 1, 2, 3]


@pytest.mark.parametrize("first", [1, None])
def test_every_message_asking_for_the_newest_gets_the_version_the_first_of_them_got(first: int | None) -> None:
    """A stream [v1, newest, newest] with v3 written while the second computed was answered [1, 2, 3]: only
    message 0 held the others back, and the third resolved "newest" on its own. Also when message 0 asks for
    the newest itself, and when the message resolving it fails (the next one resolves it then)."""
    from aevae.services.streams import Pinned

    newest = {"vae": 2}

    async def message(pinned: Pinned, asked: int | None, compute_s: float, fails: bool = False) -> int | None:
        async with pinned.asking("vae", not asked) as version:
            served = asked or version or newest["vae"]  # as the store resolves it when asked at once
            await asyncio.sleep(compute_s)
            if fails:
                return None
            pinned.served("vae", served, newest=not asked)
            return served

    async def stream(fails: bool) -> list[int | None]:
        pinned = Pinned()
        calls = [asyncio.create_task(message(pinned, first, 0.0)),
                 asyncio.create_task(message(pinned, None, 0.05, fails)),
                 asyncio.create_task(message(pinned, None, 0.0))]
        await asyncio.sleep(0.01)
        newest["vae"] = 3  # written while the second message computes
        return await asyncio.gather(*calls)

    newest["vae"] = 2
    answers = asyncio.run(stream(fails=False))
    assert answers == ([1, 2, 2] if first else [2, 2, 2]), answers
    if first:
        newest["vae"] = 2
        assert asyncio.run(stream(fails=True)) == [1, None, 3]  # the failed resolver pinned nothing
