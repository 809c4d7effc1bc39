"""Admission control on its own (services/admission.Admission): the caps refuse with the flag to change, and
the answer budget is given back the moment a call ends, however it ends."""

from __future__ import annotations

import asyncio
import gc
from typing import Iterator

import pytest

from aevae.errors import ResourceExhausted
from aevae.services.admission import Admission, AnswerSlot, Engine, Runner, Unsent


@pytest.fixture
def no_gc() -> Iterator[None]:
    """The garbage collector off: what is given back must not depend on it finding a dead call's frame."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_cancelled_call_gives_its_answer_bytes_back_at_once(no_gc: None) -> None:
    admission = Admission(max_calls=8, max_bytes=100)

    async def main() -> None:
        computing = asyncio.Event()

        async def call() -> None:
            async with admission.reserved(80):
                computing.set()
                await asyncio.sleep(3600)  # a batch that outlives its caller's patience

        task = asyncio.create_task(call())
        await computing.wait()
        assert admission.output == 80
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert admission.output == 0
        # the next answer as big gets the room at once instead of waiting for the dead call's share
        await asyncio.wait_for(_reserve_and_leave(admission, 80), timeout=1)

    asyncio.run(main())


async def _reserve_and_leave(admission: Admission, nbytes: int) -> None:
    async with admission.reserved(nbytes):
        pass


def test_an_answer_waits_for_room_and_one_bigger_than_the_budget_waits_for_an_empty_one() -> None:
    admission = Admission(max_calls=8, max_bytes=100)
    order: list[str] = []

    async def holder(leave: asyncio.Event) -> None:
        async with admission.reserved(60):
            order.append("holder in")
            await leave.wait()
        order.append("holder out")

    async def waiter(name: str, nbytes: int) -> None:
        async with admission.reserved(nbytes):
            order.append(f"{name} in")

    async def main() -> None:
        leave = asyncio.Event()
        held = asyncio.create_task(holder(leave))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(waiter("fits", 40)), asyncio.create_task(waiter("too big", 50)),
                   asyncio.create_task(waiter("huge", 500))]
        await asyncio.sleep(0.01)
        assert order == ["holder in", "fits in"]  # 60 + 40 fit; 60 + 50 do not; 500 never fits beside others
        leave.set()
        await asyncio.gather(held, *waiting)
        assert set(order[2:]) == {"holder out", "too big in", "huge in"}
        assert admission.output == 0

    asyncio.run(main())


def test_an_error_in_the_block_gives_the_bytes_back() -> None:
    admission = Admission(max_calls=8, max_bytes=100)

    async def main() -> None:
        with pytest.raises(ValueError, match="the model failed"):
            async with admission.reserved(70):
                raise ValueError("the model failed")
        assert admission.output == 0

    asyncio.run(main())


def test_the_call_and_byte_caps_name_the_flag_to_change() -> None:
    admission = Admission(max_calls=1, max_bytes=100)
    with admission.call():
        with pytest.raises(ResourceExhausted, match="--max-concurrent-rpcs 1"):
            with admission.call():
                pass
    with admission.call():  # the slot is free again
        assert admission.calls == 1
    with admission.hold(100):  # one request as big as the budget is admitted alone
        with pytest.raises(ResourceExhausted, match="--max-inflight-bytes 100"):
            with admission.hold(1):
                pass
    assert (admission.calls, admission.bytes) == (0, 0)


def test_stream_answers_count_until_sent_and_past_the_cap_streams_wait_but_unary_calls_do_not() -> None:
    admission = Admission(max_calls=8, max_bytes=1000, max_unsent=100)
    first, second = Unsent(admission), Unsent(admission)

    async def stream_answer(unsent: Unsent, nbytes: int) -> AnswerSlot:
        slot = unsent.open(0)  # as a stream's task for its first message does
        await unsent.take(slot, nbytes)
        return slot

    async def main() -> None:
        held = await stream_answer(first, 60)
        assert admission.unsent == 60
        waiting = asyncio.create_task(stream_answer(second, 60))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # 60 + 60 would pass the cap of 100
        await asyncio.wait_for(_reserve_and_leave(admission, 900), timeout=1)  # a unary answer: its own budget
        first.sent(held)  # gRPC has written the first stream's answer
        await asyncio.wait_for(waiting, timeout=1)
        assert admission.unsent == 60
        second.close()  # the stream ends: what it still holds comes back
        assert admission.unsent == 0

    asyncio.run(main())


def test_a_message_that_gets_room_after_its_stream_ended_gives_it_back(no_gc: None) -> None:
    """The stream ends (its close runs) while one of its messages waits for room; the room that frees later
    must not be counted for a stream that will never send it."""
    admission = Admission(max_calls=8, max_bytes=1000, max_unsent=100)
    first, second = Unsent(admission), Unsent(admission)

    async def main() -> None:
        held = first.open(0)
        await first.take(held, 80)
        late = second.open(0)
        waiting = asyncio.create_task(second.take(late, 80))
        await asyncio.sleep(0.01)
        second.close()  # its stream has ended; the message's task has not run again yet
        first.sent(held)
        await asyncio.wait_for(waiting, timeout=1)
        assert admission.unsent == 0

    asyncio.run(main())


def test_an_answer_computed_for_a_stream_is_counted_in_its_slot_and_a_unary_one_is_not() -> None:
    admission = Admission(max_calls=8, max_bytes=1000, max_unsent=1000)

    class Job:
        output_bytes = 70

    class Batcher:
        async def submit(self, job: Job, company: bool) -> str:
            return "images"

    engine = Engine(Runner(None, 0), admission)  # type: ignore[arg-type]  # no executor: nothing runs off the loop
    unsent = Unsent(admission)

    async def answer(stream: bool) -> None:
        if stream:
            unsent.open(0)
        async with engine.answered(Batcher(), Job()) as out:
            assert out == "images" and admission.output == 70

    async def main() -> None:
        await asyncio.create_task(answer(stream=False))
        assert (admission.output, admission.unsent) == (0, 0)
        await asyncio.create_task(answer(stream=True))  # each task has its own context, as pipelined's
        assert (admission.output, admission.unsent) == (0, 70)
        unsent.close()
        assert admission.unsent == 0

    asyncio.run(main())


def test_a_stream_takes_room_in_message_order_so_streams_that_read_never_deadlock() -> None:
    """Message 1 asking first must not take room before message 0: answers go out in order, so message 1's
    answer could never be sent while message 0 waited for its room (reading streams deadlocked on the budget).
    A message that ends without taking room passes its turn on."""
    admission = Admission(max_calls=8, max_bytes=1000, max_unsent=100)
    unsent = Unsent(admission)

    async def main() -> None:
        first, second, third = unsent.open(0), unsent.open(1), unsent.open(2)
        later = asyncio.create_task(unsent.take(second, 60))
        await asyncio.sleep(0.01)
        assert not later.done() and admission.unsent == 0  # message 0 has not taken its room yet
        await unsent.take(first, 60)
        await asyncio.sleep(0.01)
        assert not later.done() and admission.unsent == 60  # its turn, but no room beside message 0
        unsent.sent(first)  # message 0 written: its room comes back, message 1 takes it
        await asyncio.wait_for(later, timeout=1)
        assert admission.unsent == 60
        unsent.sent(second)
        fourth = unsent.open(3)
        last = asyncio.create_task(unsent.take(fourth, 10))
        await asyncio.sleep(0.01)
        assert not last.done()  # message 2 has neither taken room nor ended
        unsent.passed(third)  # message 2 failed before it needed room
        await asyncio.wait_for(last, timeout=1)
        unsent.close()
        assert admission.unsent == 0

    asyncio.run(main())


def test_streams_leave_a_quarter_of_the_slots_to_unary_calls() -> None:
    """256 streams whose clients wrote and never read held every slot (for up to the connection's age) and
    every other client's Decode was refused: streams now hold at most three quarters of them."""
    admission = Admission(max_calls=8, max_bytes=100)
    streams = [admission.stream() for _ in range(6)]
    for stream in streams:
        stream.__enter__()
    with pytest.raises(ResourceExhausted, match=r"6 streams open, the most it lets streams hold \(6 of "
                                                r"--max-concurrent-rpcs 8; the rest are kept for unary calls\)"):
        admission.stream().__enter__()
    assert admission.streams == 6 and admission.calls == 6  # the refused one took nothing
    with admission.call(), admission.call():  # the unary calls' quarter
        with pytest.raises(ResourceExhausted, match="8 calls in flight"):
            admission.call().__enter__()
    streams[0].__exit__()
    with admission.stream():  # a stream's place, given back, is taken again
        assert admission.streams == 6 and admission.calls == 6
    assert admission.streams == 5 and admission.calls == 5


@pytest.mark.parametrize("max_calls, max_streams", [(1, 1), (3, 3), (4, 3), (256, 192)])
def test_a_small_cap_lets_streams_take_every_slot(max_calls: int, max_streams: int) -> None:
    """Under 4 slots nothing is kept back: `--max-concurrent-rpcs 1` must still serve a stream."""
    assert Admission(max_calls=max_calls, max_bytes=100).max_streams == max_streams
