"""The UI's service links without a network: closing never hangs the UI's shutdown, and a service's refusal
becomes the HTTP status of whose fault it is."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from aevae.ui import services
from aevae.ui.server import BadRequest, bounded_int, error_body, model_version
from aevae.ui.services import ServiceLink


class _StuckClient:
    """A client whose close never returns, as a channel whose gRPC poller is stuck (grpc/grpc#40989)."""

    closed = False

    async def close(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            self.closed = True  # cancelled by the timeout, not left running


def test_a_client_whose_close_hangs_does_not_hang_aclose(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(services, "CLOSE_TIMEOUT", 0.2)
    link = ServiceLink("decoder", "127.0.0.1:1", _StuckClient)  # type: ignore[type-var]
    stuck = _StuckClient()
    link._client = stuck  # type: ignore[assignment]

    started = time.monotonic()
    asyncio.run(asyncio.wait_for(link.aclose(), 10))
    assert time.monotonic() - started < 5
    assert stuck.closed and link._client is None
    assert "closing the decoder client took over" in caplog.text


class _SlowProber:
    """A synchronous client whose health check takes 50 ms on the probing thread."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def health(self, timeout: float) -> str:
        time.sleep(0.05)
        return "SERVING"

    def close(self) -> None:
        pass


class _AsyncStandIn:
    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("cancelled", [True, False])
def test_a_watcher_stops_inside_a_probe_by_cancellation_or_by_its_flag_alone(
        cancelled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flag ends the loop even when a cancellation is lost (gRPC's own code may await with wait_for, which
    can swallow one in Python 3.11); a cancellation during a probe on its thread ends it at once."""
    monkeypatch.setitem(services.PROBER, _AsyncStandIn, _SlowProber)

    async def scenario() -> None:
        link = ServiceLink("decoder", "127.0.0.1:1", _AsyncStandIn)  # type: ignore[type-var]
        watcher = asyncio.create_task(link.watch(0.01))
        await asyncio.sleep(0.02)  # inside a probe
        assert link.status.state in ("unknown", "up")
        link.stop_watching()
        if cancelled:
            watcher.cancel()
        done, _ = await asyncio.wait({watcher}, timeout=5)  # a loop that the flag does not end runs on
        assert watcher in done
        await link.aclose()

    asyncio.run(scenario())


def test_bounded_times_out_without_waiting_and_always_passes_a_cancellation_on() -> None:
    from aevae.ui.services import bounded

    async def stubborn() -> str:  # ignores the first cancellation: wait_for would wait for it to end
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(10)
        return "late"

    async def scenario() -> None:
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await bounded(stubborn(), 0.05)
        assert time.monotonic() - started < 1  # not waited for
        assert await bounded(asyncio.sleep(0, "now"), 1) == "now"
        outer = asyncio.create_task(bounded(stubborn(), 5))
        await asyncio.sleep(0.01)
        outer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await outer

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("code, status", [
    ("INVALID_ARGUMENT", 400), ("FAILED_PRECONDITION", 400), ("NOT_FOUND", 404), ("RESOURCE_EXHAUSTED", 429),
    ("UNAUTHENTICATED", 502), ("INTERNAL", 502),
])
def test_a_service_refusal_maps_to_the_http_status_of_whose_fault_it_is(code: str, status: int) -> None:
    got, body = error_body(services.RequestRejected("decoder", grpc.StatusCode[code], "why"))
    assert got == status and body == {"error": "why", "service": "decoder", "code": code}


def test_a_message_s_repeated_key_and_ragged_latents_are_refused_saying_so() -> None:
    """{"model": "vae", "model": "ae"} encoded with "ae" without a word; ragged latents were refused as not
    finite or past float32's range."""
    from aevae.ui.guard import BadMessage, parse_json
    from aevae.ui.server import BadRequest, parse_latents

    assert parse_json('{"model": "vae", "shape": {"h": 1, "w": 2}}') == {"model": "vae", "shape": {"h": 1, "w": 2}}
    with pytest.raises(BadMessage, match="key 'model' given more than once"):
        parse_json('{"model": "vae", "model": "ae"}')
    with pytest.raises(BadMessage, match="key 'w' given more than once"):
        parse_json('{"a": [{"w": 1, "w": 2}]}')
    with pytest.raises(BadRequest, match=r"equal-length lists of numbers: got rows of \[1, 2\] numbers"):
        parse_latents([[1.0, 2.0], [1.0]])


def test_a_latent_past_float32_s_range_is_refused_as_such_without_a_warning() -> None:
    """1e39 is finite: it was refused as "no NaN or Infinity", after numpy's overflow warning went to the log."""
    import warnings

    import numpy as np

    from aevae.ui.server import BadRequest, parse_latents

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning fails the test
        with pytest.raises(BadRequest, match=r"within float32's range .*latents\[1\]\[0\] is -1e\+39"):
            parse_latents([[0.0, 1.0], [-1e39, 0.0]])
        with pytest.raises(BadRequest, match="finite numbers"):
            parse_latents([[float("nan"), 1.0]])
        z = parse_latents([[0.5, -3.4e38]])
    assert z.dtype == np.float32 and z.tolist() == [[0.5, np.float32(-3.4e38)]]


@pytest.mark.parametrize("value, expected", [(1.0, 1), (7, 7), (0.0, None), (None, None), (3e3, 3000)])
def test_a_version_written_as_a_whole_float_is_that_version(value: object, expected: int | None) -> None:
    """Some JSON encoders write 1 as 1.0; it was refused as "not a model version"."""
    assert model_version({"version": value}) == expected


@pytest.mark.parametrize("value", [1.5, -1.0, float("inf"), float("nan"), 1e300, "1", True])
def test_a_version_that_is_no_whole_number_is_refused_naming_it(value: object) -> None:
    with pytest.raises(BadRequest, match=r"'version' must be a model version \(a whole number from 1\)"):
        model_version({"version": value})


def test_a_count_written_as_a_whole_float_is_that_count() -> None:
    assert bounded_int({"count": 16.0}, "count", 4, 1, 64) == 16
    with pytest.raises(BadRequest, match=r"'count' must be an integer in 1..64, got 16.5"):
        bounded_int({"count": 16.5}, "count", 4, 1, 64)
