"""The UI server's only way to the encoder and decoder: aevae.client's async clients, kept usable across outages.

Each service gets a `ServiceLink` holding its `AsyncEncoderClient` or `AsyncDecoderClient`. A call that fails
with a status code meaning "not there" (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED) marks the service down; any
other `AevaeError` is the service's answer about the request (bad shape, unknown model...). A watcher probes
health every second with a fresh channel while the service is down, so that a service restarted on the same
port is picked up at the first probe after it is back (within a second) instead of after gRPC's reconnect
backoff (up to minutes); each client has its own connection (aevae.client.core.CHANNEL_OPTIONS), so the
fresh one does not inherit the backoff of the old.

The probes run on a thread of their own with the synchronous client, so that they time the service and not
this server's event loop: run on the loop, a probe of a healthy service found no answer in time whenever pages
kept the loop busy (20 pages each sending decodes as fast as they could), and every page was told that both
services were down and had its calls refused until a probe got through.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from aevae.client import AevaeError, AsyncDecoderClient, AsyncEncoderClient, DecoderClient, EncoderClient

log = logging.getLogger(__name__)

CALL_TIMEOUT = 5.0
PROBE_TIMEOUT = 1.0
# Closing a channel waits on gRPC; bounded, so that the UI's shutdown never hangs on one. Past it, the channel
# is left to gRPC.
CLOSE_TIMEOUT = 2.0
# Status codes that mean the service is not reachable, rather than that the request was wrong.
UNREACHABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED})

Client = TypeVar("Client", AsyncEncoderClient, AsyncDecoderClient)
T = TypeVar("T")
# the synchronous client the probes of each service use
PROBER: dict[type, type[EncoderClient] | type[DecoderClient]] = {AsyncEncoderClient: EncoderClient,
                                                                 AsyncDecoderClient: DecoderClient}


async def bounded(awaitable: Awaitable[T], seconds: float) -> T:
    """`awaitable`'s result, or asyncio.TimeoutError after `seconds`. Not asyncio.wait_for, which before Python
    3.12 can swallow a cancellation that arrives as the awaited call ends (a UI's shutdown once hung on it), and
    which waits for the cancelled call to finish: here a cancellation always propagates, and a call past its
    time is cancelled and left, not waited for."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        raise asyncio.TimeoutError
    return task.result()


class ServiceDown(Exception):
    """The service did not answer; the page keeps working and says so."""

    def __init__(self, service: str, message: str):
        super().__init__(f"{service} unavailable: {message}")
        self.service = service


class RequestRejected(Exception):
    """The service answered with an error about the request itself (bad shape, unknown model...)."""

    def __init__(self, service: str, code: grpc.StatusCode, message: str):
        super().__init__(f"{service}: {code.name}: {message}")
        self.service, self.code, self.message = service, code, message


@dataclass
class Status:
    state: str = "unknown"  # "up" | "down" | "unknown"
    message: str = ""
    since: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"state": self.state, "message": self.message, "since": self.since}


class ServiceLink(Generic[Client]):
    """One service at one address: its async client (of type `Client`) and its up/down status."""

    def __init__(self, service: str, target: str, client_type: type[Client],
                 on_change: Callable[[], Awaitable[None]] | None = None, security: Any = None):
        """`security`: the aevae.client ChannelSecurity (TLS, token) every client of this link gets (None:
        from the environment, as any client)."""
        self.security = security
        self.service = service
        self.target = target
        self.status = Status()
        self._client_type: type[Client] = client_type
        self._on_change = on_change
        self._client: Client | None = None
        self._retired: list[tuple[Client, float]] = []  # replaced clients, closed once their calls are done
        self._stopping = False
        # The last health check got no answer in time: the service is hung (a stopped process, a host gone),
        # not refusing. Calls then fail at once with the probe's words until a probe is answered: each waited
        # out its timeout (5 s, 6 with the retry) while the page already said "down".
        self._hung = False
        self._prober: EncoderClient | DecoderClient | None = None
        self._probing = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"aevae-ui-probe-{service}")

    def _new_client(self, timeout: float) -> Client:
        # one quick retry: the page would rather hear "down" now than after a long backoff
        return self._client_type(self.target, timeout=timeout, retries=1, backoff=0.05, security=self.security)

    async def _close(self, client: Client) -> None:
        try:
            await bounded(client.close(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            log.warning("closing the %s client took over %.0f s: left to gRPC", self.service, CLOSE_TIMEOUT)
        except (grpc.RpcError, RuntimeError, OSError):  # a dead channel may fail to close; nothing to do
            log.debug("closing %s client failed", self.service, exc_info=True)

    async def _set(self, state: str, message: str) -> None:
        if state == self.status.state and message == self.status.message:
            return
        if state != self.status.state:
            level = logging.WARNING if state == "down" else logging.INFO
            log.log(level, "%s at %s is %s%s", self.service, self.target, state, f": {message}" if message else "")
        self.status = Status(state, message, time.time())
        if self._on_change is not None:
            await self._on_change()

    async def call(self, request: Callable[[Client], Awaitable[T]]) -> T:
        """Runs `request(client)`, e.g. `link.call(lambda c: c.decode(z, model="vae"))`; raises ServiceDown or
        RequestRejected with a message for the page."""
        if self._hung and self.status.state == "down":
            raise ServiceDown(self.service, f"{self.status.message} (it does not answer its health checks; asked "
                                            "again once it does)")
        if self._client is None:
            self._client = self._new_client(CALL_TIMEOUT)
        try:
            result = await request(self._client)
        except AevaeError as exc:
            if exc.code() in UNREACHABLE:
                await self._set("down", short_message(exc))
                raise ServiceDown(self.service, short_message(exc)) from exc
            raise RequestRejected(self.service, exc.code(), exc.details()) from exc
        if self.status.state != "up":
            await self._set("up", "")
        return result

    def _check(self, fresh: bool) -> str:
        """The health check, on the probing thread: with a new channel when `fresh`."""
        if fresh or self._prober is None:
            if self._prober is not None:
                self._prober.close()
            self._prober = PROBER[self._client_type](self.target, timeout=PROBE_TIMEOUT, retries=0,
                                                     security=self.security)
        return self._prober.health(timeout=PROBE_TIMEOUT)

    async def probe(self) -> None:
        """One health check, on the probing thread (see the module's docstring). While down, it uses a fresh
        channel and, when that answers, adopts a new client for the calls."""
        fresh = self.status.state != "up" or self._client is None
        try:
            # bounded far past the check's own deadline: only a thread that never returns meets it
            serving = await bounded(asyncio.get_running_loop().run_in_executor(self._probing, self._check, fresh),
                                    PROBE_TIMEOUT + 5.0)
            healthy, message = serving == "SERVING", ("" if serving == "SERVING" else f"health: {serving}")
        except AevaeError as exc:
            healthy, message = False, short_message(exc)
            self._hung = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        except asyncio.TimeoutError:
            healthy, message = False, "no answer in time"
            self._hung = True
        if healthy:
            self._hung = False
        if fresh and healthy:
            if self._client is not None:  # a call may still be running on it: close it later, not now
                self._retired.append((self._client, time.monotonic() + CALL_TIMEOUT + 1))
            self._client = self._new_client(CALL_TIMEOUT)
        await self._set("up" if healthy else "down", message)
        now = time.monotonic()
        for old, due in [r for r in self._retired if r[1] <= now]:
            await self._close(old)
        self._retired = [r for r in self._retired if r[1] > now]

    async def watch(self, interval: float) -> None:
        """Probes until `stop_watching`: the flag ends the loop even if a cancellation is lost below (see
        `bounded`; gRPC's own code may await with wait_for too)."""
        while not self._stopping:
            await self.probe()
            await asyncio.sleep(interval)

    def stop_watching(self) -> None:
        self._stopping = True

    async def aclose(self) -> None:
        for old, _ in self._retired:
            await self._close(old)
        self._retired = []
        if self._client is not None:
            await self._close(self._client)
            self._client = None
        self._probing.shutdown(wait=False, cancel_futures=True)
        if self._prober is not None:
            self._prober.close()
            self._prober = None


def short_message(exc: AevaeError) -> str:
    """A message a person can read in the status line (gRPC's connection errors are long and repetitive)."""
    text = (exc.details() or exc.code().name).strip().splitlines()[0]
    lowered = text.lower()
    if "connection refused" in lowered:
        return "connection refused"
    if "failed to connect" in lowered or "connect failed" in lowered:
        return "cannot connect"
    if "deadline exceeded" in lowered or exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "no answer in time"
    return text[:300]
