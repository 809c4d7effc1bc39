"""The UI server's only way to the encoder and decoder: aevae.client, wrapped to survive a service going away.

Each service gets a `ServiceLink`: calls run off the event loop (the async client when the package has one,
else the sync client in a thread), a failure that means "not there" marks the service down, and a watcher
probes its health every second with a fresh channel while it is down, so that a restarted service on the
same port is picked up within a second or two instead of after gRPC's reconnect backoff (up to minutes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
PROBE_TIMEOUT = 1.0
# gRPC codes that mean the service is not reachable, rather than that the request was wrong.
UNREACHABLE = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "UNKNOWN"}


class ServiceDown(Exception):
    """The service did not answer; the page keeps working and says so."""

    def __init__(self, service: str, message: str):
        super().__init__(f"{service} unavailable: {message}")
        self.service = service


class RequestRejected(Exception):
    """The service answered with an error about the request itself (bad shape, unknown model...)."""

    def __init__(self, service: str, code: str, message: str):
        super().__init__(f"{service}: {code}: {message}")
        self.service, self.code, self.message = service, code, message


@dataclass
class Status:
    state: str = "unknown"  # "up" | "down" | "unknown"
    message: str = ""
    since: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message, "since": self.since}


def _code_name(exc: BaseException) -> str | None:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:  # noqa: BLE001 - a code() that fails tells us nothing more
            return None
        return getattr(value, "name", str(value))
    return None


class ServiceLink:
    """One service (encoder or decoder) at one address, with its client and its up/down status."""

    def __init__(self, service: str, target: str, on_change: Callable[[], Awaitable[None]] | None = None):
        self.service = service
        self.target = target
        self.status = Status()
        self._on_change = on_change
        self._client: Any = None
        self._is_async = False
        self._retired: list[tuple[Any, bool, float]] = []  # replaced clients, closed once their calls are done

    # -- clients --------------------------------------------------------------------------------------
    def _make_client(self, timeout: float) -> tuple[Any, bool]:
        import aevae.client as client

        names = {"encoder": ("AsyncEncoderClient", "EncoderClient"),
                 "decoder": ("AsyncDecoderClient", "DecoderClient")}[self.service]
        for name, is_async in zip(names, (True, False)):
            cls = getattr(client, name, None)
            if cls is not None:
                try:  # one quick retry: the page would rather hear "down" now than after a long backoff
                    return cls(self.target, timeout=timeout, retries=1, backoff=0.05), is_async
                except TypeError:
                    return cls(self.target, timeout=timeout), is_async
        raise RuntimeError(f"aevae.client has no {names[1]}")

    async def _invoke(self, client: Any, is_async: bool, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(client, method)
        if is_async:
            return await fn(*args, **kwargs)
        return await asyncio.to_thread(fn, *args, **kwargs)

    async def _close(self, client: Any, is_async: bool) -> None:
        close = getattr(client, "close", None)
        if close is None:
            return
        try:
            result = close()
            if is_async and asyncio.iscoroutine(result):
                await result
        except Exception:  # noqa: BLE001 - closing a dead channel may fail; nothing to do about it
            log.debug("closing %s client failed", self.service, exc_info=True)

    # -- status ---------------------------------------------------------------------------------------
    async def _set(self, state: str, message: str) -> None:
        if state == self.status.state and message == self.status.message:
            return
        if state != self.status.state:
            level = logging.WARNING if state == "down" else logging.INFO
            log.log(level, "%s at %s is %s%s", self.service, self.target, state, f": {message}" if message else "")
        self.status = Status(state, message, time.time())
        if self._on_change is not None:
            await self._on_change()

    # -- calls ----------------------------------------------------------------------------------------
    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Runs one client method; raises ServiceDown or RequestRejected with a message for the page."""
        if self._client is None:
            self._client, self._is_async = self._make_client(CALL_TIMEOUT)
        try:
            result = await self._invoke(self._client, self._is_async, method, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - sorted into the two kinds the page understands
            code = _code_name(exc)
            if code is None or code in UNREACHABLE:
                await self._set("down", _short(exc))
                raise ServiceDown(self.service, _short(exc)) from exc
            raise RequestRejected(self.service, code, _short(exc)) from exc
        if self.status.state != "up":
            await self._set("up", "")
        return result

    async def probe(self) -> None:
        """One health check. While down, it uses a fresh channel and, when that answers, adopts it."""
        if self.status.state == "up" and self._client is not None:
            client, is_async, fresh = self._client, self._is_async, False
        else:
            try:
                client, is_async = self._make_client(PROBE_TIMEOUT)
            except Exception as exc:  # noqa: BLE001 - a bad target stays a status, not a crash
                await self._set("down", _short(exc))
                return
            fresh = True
        try:
            answer = await asyncio.wait_for(self._invoke(client, is_async, "health"), PROBE_TIMEOUT + 1.0)
            serving = str(getattr(answer, "name", answer))  # "SERVING", "NOT_SERVING", ...
            healthy, message = serving == "SERVING", ("" if serving == "SERVING" else f"health: {serving}")
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means not usable now
            healthy, message = False, _short(exc)
        if fresh:
            if healthy:
                old, old_async = self._client, self._is_async
                # the probe client has a short timeout; calls get their own normal one
                await self._close(client, is_async)
                self._client, self._is_async = self._make_client(CALL_TIMEOUT)
                if old is not None:  # a call may still be running on it: close it later, not now
                    self._retired.append((old, old_async, time.monotonic() + CALL_TIMEOUT + 1))
            else:
                await self._close(client, is_async)
        await self._set("up" if healthy else "down", message)
        now = time.monotonic()
        for client, is_async, due in [r for r in self._retired if r[2] <= now]:
            await self._close(client, is_async)
        self._retired = [r for r in self._retired if r[2] > now]

    async def watch(self, interval: float) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        for client, is_async, _ in self._retired:
            await self._close(client, is_async)
        self._retired = []
        if self._client is not None:
            await self._close(self._client, self._is_async)
            self._client = None


def _short(exc: BaseException) -> str:
    """A message a person can read in the status line (gRPC's connection errors are long and repetitive)."""
    details = getattr(exc, "details", None)
    text = details() if callable(details) else str(exc)
    text = (text or type(exc).__name__).strip().splitlines()[0]
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "failed to connect" in lowered or "connect failed" in lowered:
        return "cannot connect"
    if "deadline exceeded" in lowered:
        return "no answer in time"
    return text[:300]
