"""Fan-out: one client over several replicas of a service.

`DecoderClient(["10.0.0.1:50052", "10.0.0.2:50052"])`, `DecoderClient("a:50052,b:50052")` or
`DecoderClient("dns:///decoders.example:50052")` (every address the name resolves to) give a client whose big
batches are cut into contiguous spans of rows that run as parallel streams, one per replica; each replica
takes the next span when it finishes one, so a faster replica takes more. Results land at their rows' offsets,
so the order is the input's. When a replica fails (unreachable, reset, deadline), its unfinished span goes
back to the queue for the others; it retries after a backoff and is given up after the client's `retries`
failures in a row; one that lacks the model or version (NOT_FOUND) at once, for this call. A batch fails only
when every replica has been given up, or at once on an error that another replica would repeat (a bad
argument, a broken version). The call's timeout is one total deadline (`Deadline`): each replica attempt gets
what is left of it, and past it the call ends with DEADLINE_EXCEEDED. A replica that stalls (accepts a span
and never answers) is found by the pings of its connection (client.core.KEEPALIVE_MS) and failed over.

Each replica is a single-target client built by the same constructor with the same options, so whatever that
constructor does per target (the channel, its credentials) is done for each replica in one place.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

import grpc
import numpy as np

from aevae import allocation
from aevae.client.core import Retry, prepare_images, prepare_latents, wire_version
from aevae.client.errors import AevaeError, bad_answer, invalid
from aevae.client.results import DecodeResult, EncodeResult

DNS_SCHEME = "dns:///"
# host:port or [v6]:port, the forms whose port this client can check: gRPC reads a port past 65535 modulo 2^16
# (99999 is 34463), so a typo would reach whatever listens there, and errors would name the wrapped port.
_HOST_PORT = re.compile(r"(?:dns:///)?(\[[^\]]*\]|[^:\[\]/]*):([0-9]+)")
# Failures of one replica, not of the request: another replica may well succeed. RESOURCE_EXHAUSTED: a replica
# at its limit of calls or bytes in flight (the request's size is planned from the servers' own limits);
# NOT_FOUND: a replica whose repository lacks the model or the version, as in a fleet half way through an
# upgrade (such a replica is left out for the rest of the call: NOT_EVERYWHERE). Failed everywhere, a call
# ends with the replicas' own error.
FAILOVER_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.ABORTED,
                            grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.NOT_FOUND})
NOT_EVERYWHERE = frozenset({grpc.StatusCode.NOT_FOUND})
OWN_WORDS = NOT_EVERYWHERE | {grpc.StatusCode.RESOURCE_EXHAUSTED}  # failed everywhere alike: the servers' error
SPANS_PER_REPLICA = 4  # spans per replica in a big batch: enough to balance, few enough to keep streams long
MAX_SPAN_CHUNKS = 16  # a span is at most this many stream chunks


def parse_targets(target: str | Sequence[str]) -> list[str]:
    """A list of host:port, a comma-separated string, or dns:///host:port (all the addresses of the name)."""
    try:
        items = [target] if isinstance(target, str) else list(target)
    except TypeError:  # None, or a port number: was a TypeError saying "'int' object is not iterable"
        raise invalid(f"target: expected \"host:port\", a list of them or \"dns:///name:port\", got {target!r}"
                      ) from None
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise invalid(f"target: expected host:port strings, got {item!r}")
        for part in (p.strip() for p in item.split(",")):
            if part:
                _check_port(part)
                out.extend(resolve_all(part) if part.startswith(DNS_SCHEME) else [part])
    if not out:
        raise invalid(f"target: expected at least one host:port, got {target!r}")
    return list(dict.fromkeys(out))  # the same address twice is one replica


# Targets in gRPC's other name forms (a Unix socket, an address gRPC is not to resolve), passed on as they are.
OTHER_SCHEMES = ("unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def _check_port(target: str) -> None:
    """INVALID_ARGUMENT for a target that is no host:port (or [v6]:port, dns:///host:port, or one of gRPC's
    OTHER_SCHEMES): gRPC takes "localhost" and "host:" as port 443, "host:-1" as 65535 and a port past 65535
    modulo 2^16, and "host:notaport", "[::1" or "http://host:port" fail every call as UNAVAILABLE, which
    callers retry: a typo was a call retried for ever, or a replica silently left out of a fleet."""
    if target.startswith(OTHER_SCHEMES):
        return
    match = _HOST_PORT.fullmatch(target)
    if match is None or not match.group(1).strip("[]") or not 1 <= int(match.group(2)) <= 65535:
        raise invalid(f"target: expected host:port with a port from 1 to 65535 (e.g. localhost:50052, "
                      f"[::1]:50052 or dns:///decoders.example:50052), got {target!r:.200}")


def resolve_all(target: str) -> list[str]:
    """dns:///host:port -> one ip:port per address the name resolves to (looked up once, now)."""
    rest = target[len(DNS_SCHEME):]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise invalid(f"target: {target!r} needs a port, as in dns:///decoders.example:50052")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as exc:
        raise AevaeError(grpc.StatusCode.UNAVAILABLE, f"cannot resolve {host!r}: {exc}") from None
    addresses = dict.fromkeys(str(info[4][0]) for info in infos)
    if len(addresses) == 1:
        return [target]  # one address: gRPC resolves it itself (and again when it changes)
    return [f"[{a}]:{port}" if ":" in a else f"{a}:{port}" for a in addresses]


def span_rows(n: int, replicas: int, chunk: int) -> int:
    """Rows per span: about SPANS_PER_REPLICA spans per replica, whole chunks, 1 to MAX_SPAN_CHUNKS chunks."""
    chunks = -(-n // max(1, chunk))
    per_span = -(-chunks // (replicas * SPANS_PER_REPLICA))
    return chunk * max(1, min(MAX_SPAN_CHUNKS, per_span))


class Assembler:
    """Writes each span's arrays at its offset into arrays preallocated on the first span that arrives."""

    def __init__(self, n: int):
        self.n = n
        self.out: dict[str, np.ndarray | None] = {}
        self._lock = threading.Lock()

    def array(self, name: str) -> np.ndarray:
        array = self.out.get(name)
        if array is None:
            raise AevaeError(grpc.StatusCode.INTERNAL, f"no replica returned {name}")
        return array

    def put(self, start: int, parts: dict[str, np.ndarray | None]) -> None:
        with self._lock:
            for name, part in parts.items():
                if name not in self.out:
                    self.out[name] = None if part is None else allocation.empty((self.n, *part.shape[1:]), part.dtype)
            target = {name: self.out[name] for name in parts}
        for name, part in parts.items():
            array = target[name]
            if (part is None) != (array is None):
                raise AevaeError(grpc.StatusCode.INTERNAL, f"replicas disagree on whether {name} is present")
            if array is not None and part is not None:
                if part.shape[1:] != array.shape[1:] or part.dtype != array.dtype:
                    raise bad_answer(f"replicas disagree on {name}: {part.dtype} rows of {list(part.shape[1:])} "
                                     f"at row {start}, {array.dtype} rows of {list(array.shape[1:])} before")
                array[start:start + len(part)] = part


@dataclass
class _Replica:
    client: Any
    failures: int = 0
    error: AevaeError | None = None


@dataclass
class _Work:
    """The spans still to do, shared by the replicas' workers (threads or tasks)."""

    todo: list[tuple[int, int]]
    running: int = 0
    fatal: AevaeError | None = None
    done: list[tuple[int, int]] = field(default_factory=list)

    def take(self) -> tuple[int, int]:
        span = self.todo.pop(0)
        self.running += 1
        return span

    def finish(self, span: tuple[int, int], ok: bool) -> None:
        self.running -= 1
        if ok:
            self.done.append(span)
        else:
            self.todo.insert(0, span)  # first in line for the next free replica

    def idle(self) -> bool:
        """Nothing to take now, but a running span may still come back."""
        return not self.todo and self.running > 0 and self.fatal is None

    def over(self) -> bool:
        return self.fatal is not None or (not self.todo and self.running == 0)


class Deadline:
    """One total deadline for a fan-out call, its failovers and backoffs included: each replica attempt gets
    what is left. `seconds` None: none."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.end = None if seconds is None else time.monotonic() + seconds

    def timeout(self) -> float:
        """What a replica's call gets: the time left (0 once passed), or no deadline (inf: core.grpc_timeout
        reads anything over MAX_TIMEOUT as none)."""
        return math.inf if self.end is None else max(0.0, self.end - time.monotonic())

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() >= self.end

    def cap(self, delay: float) -> float:
        """A backoff, cut to the time left."""
        return delay if self.end is None else max(0.0, min(delay, self.end - time.monotonic()))

    def error(self, last: AevaeError | None) -> AevaeError:
        reason = f" (the last failure: {last.details() or last.code().name})" if last is not None else ""
        limit = "" if self.seconds is None else f" of {self.seconds:g} s"
        return AevaeError(grpc.StatusCode.DEADLINE_EXCEEDED,
                          f"the call's deadline{limit} passed before a replica answered{reason}")


def _failover(error: AevaeError) -> bool:
    return error.code() in FAILOVER_CODES


def _give_up(replicas: list[_Replica], work: _Work) -> AevaeError:
    if work.fatal is not None:
        return work.fatal
    same = _same_error([r.error for r in replicas])
    if same is not None:
        return same
    reasons = "; ".join(f"{r.client.target}: {r.error.details() or r.error.code().name}"
                        for r in replicas if r.error is not None)
    return AevaeError(grpc.StatusCode.UNAVAILABLE,
                      f"all {len(replicas)} replicas failed with {len(work.todo)} spans left ({reasons})")


def _same_error(errors: list[AevaeError | None]) -> AevaeError | None:
    """The first error, when every replica failed with the same code and it is the request's own on each
    (NOT_FOUND, RESOURCE_EXHAUSTED): the server's words, not "all replicas failed"."""
    codes = {e.code() if e is not None else None for e in errors}
    first = errors[0] if errors else None
    if len(codes) == 1 and first is not None and first.code() in OWN_WORDS:
        return first
    return None


def _left_out(error: AevaeError, replica: _Replica, retries: int) -> None:
    """After a failure: a replica that lacks the model or version is given up for the call at once."""
    replica.failures = retries + 1 if error.code() in NOT_EVERYWHERE else replica.failures + 1
    replica.error = error


class _Replicas:
    """The single-target clients of a fleet, one per target, made by the same constructor, and whose turn
    it is: what the sync and the asyncio fan-outs share."""

    def __init__(self, make_client: Callable[[str], Any], targets: list[str], retry: Retry):
        self.targets = targets
        self.retry = retry
        self.replicas = [make_client(t) for t in targets]
        self._next = itertools.count()

    def rotation(self) -> list[Any]:
        """The replicas, starting from the next one in turn (spreads small calls over the fleet)."""
        k = next(self._next) % len(self.replicas)
        return self.replicas[k:] + self.replicas[:k]


class SyncFanOut(_Replicas):
    """Several single-target sync clients and the thread-per-replica loop that spreads spans over them."""

    def first(self, call: Callable[[Any, float], Any], deadline: Deadline) -> Any:
        """One whole call, `call(replica, timeout)`, on one replica, the next in turn; on a replica failure,
        the next replica, within the deadline."""
        last: AevaeError | None = None
        for attempt in range(self.retry.retries + 1):
            errors: list[AevaeError] = []
            for client in self.rotation():
                if deadline.expired():
                    raise deadline.error(last)
                try:
                    return call(client, deadline.timeout())
                except AevaeError as error:
                    if not _failover(error):
                        raise
                    last = error
                    errors.append(error)
            if errors and all(e.code() in NOT_EVERYWHERE for e in errors):
                raise errors[0]  # no replica has it: asking again will not help
            if attempt < self.retry.retries:
                time.sleep(deadline.cap(self.retry._delay(attempt)))
        assert last is not None
        raise last

    def health(self, check: Callable[[Any, float], str], deadline: Deadline) -> str:
        """"SERVING" when any replica serves; else the first status heard; else the last error."""
        statuses: list[str] = []
        last: AevaeError | None = None
        for client in self.replicas:
            if deadline.expired():
                break
            try:
                statuses.append(check(client, deadline.timeout()))
            except AevaeError as error:
                last = error
            if statuses and statuses[-1] == "SERVING":
                return "SERVING"
        if statuses:
            return statuses[0]
        raise last or deadline.error(None)

    def spans(self, n: int, rows: int, run: Callable[[Any, int, int, float], None], deadline: Deadline) -> None:
        """Runs run(client, start, stop, timeout) over all spans of `rows` rows, spread over the replicas,
        within the deadline."""
        work = _Work(todo=[(s, min(n, s + rows)) for s in range(0, n, rows)])
        replicas = [_Replica(c) for c in self.rotation()]
        cond = threading.Condition()

        def worker(replica: _Replica) -> None:
            while True:
                with cond:
                    while work.idle():
                        cond.wait()
                    if work.over() or not work.todo:
                        return
                    if deadline.expired():
                        work.fatal = work.fatal or deadline.error(replica.error)
                        cond.notify_all()
                        return
                    span = work.take()
                try:
                    run(replica.client, *span, deadline.timeout())
                except AevaeError as error:
                    with cond:
                        work.finish(span, ok=False)
                        if not _failover(error):
                            work.fatal = work.fatal or error
                        _left_out(error, replica, self.retry.retries)
                        if deadline.expired():  # not this replica's failure: the call's time is up
                            work.fatal = work.fatal or deadline.error(error)
                        cond.notify_all()
                        if work.fatal is not None or replica.failures > self.retry.retries:
                            return
                    time.sleep(deadline.cap(self.retry._delay(replica.failures - 1)))
                    continue
                except BaseException as error:  # noqa: BLE001 - a bug or an interrupt: stop everything
                    with cond:
                        work.finish(span, ok=False)
                        work.fatal = work.fatal or AevaeError(grpc.StatusCode.INTERNAL, repr(error))
                        cond.notify_all()
                    return
                with cond:
                    work.finish(span, ok=True)
                    replica.failures = 0
                    cond.notify_all()

        threads = [threading.Thread(target=worker, args=(r,), daemon=True, name=f"aevae-fanout-{r.client.target}")
                   for r in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if work.todo or work.fatal is not None:
            raise _give_up(replicas, work)

    def close(self) -> None:
        for client in self.replicas:
            client.close()


class AsyncFanOut(_Replicas):
    """The asyncio twin: one task per replica."""

    async def first(self, call: Callable[[Any, float], Awaitable[Any]], deadline: Deadline) -> Any:
        last: AevaeError | None = None
        for attempt in range(self.retry.retries + 1):
            errors: list[AevaeError] = []
            for client in self.rotation():
                if deadline.expired():
                    raise deadline.error(last)
                try:
                    return await call(client, deadline.timeout())
                except AevaeError as error:
                    if not _failover(error):
                        raise
                    last = error
                    errors.append(error)
            if errors and all(e.code() in NOT_EVERYWHERE for e in errors):
                raise errors[0]  # no replica has it: asking again will not help
            if attempt < self.retry.retries:
                await asyncio.sleep(deadline.cap(self.retry._delay(attempt)))
        assert last is not None
        raise last

    async def health(self, check: Callable[[Any, float], Awaitable[str]], deadline: Deadline) -> str:
        statuses: list[str] = []
        last: AevaeError | None = None
        for client in self.replicas:
            if deadline.expired():
                break
            try:
                statuses.append(await check(client, deadline.timeout()))
            except AevaeError as error:
                last = error
            if statuses and statuses[-1] == "SERVING":
                return "SERVING"
        if statuses:
            return statuses[0]
        raise last or deadline.error(None)

    async def spans(self, n: int, rows: int, run: Callable[[Any, int, int, float], Awaitable[None]],
                    deadline: Deadline) -> None:
        work = _Work(todo=[(s, min(n, s + rows)) for s in range(0, n, rows)])
        replicas = [_Replica(c) for c in self.rotation()]
        cond = asyncio.Condition()

        async def worker(replica: _Replica) -> None:
            while True:
                async with cond:
                    await cond.wait_for(lambda: not work.idle())
                    if work.over() or not work.todo:
                        return
                    if deadline.expired():
                        work.fatal = work.fatal or deadline.error(replica.error)
                        cond.notify_all()
                        return
                    span = work.take()
                try:
                    await run(replica.client, *span, deadline.timeout())
                except AevaeError as error:
                    async with cond:
                        work.finish(span, ok=False)
                        if not _failover(error):
                            work.fatal = work.fatal or error
                        _left_out(error, replica, self.retry.retries)
                        if deadline.expired():
                            work.fatal = work.fatal or deadline.error(error)
                        cond.notify_all()
                        if work.fatal is not None or replica.failures > self.retry.retries:
                            return
                    await asyncio.sleep(deadline.cap(self.retry._delay(replica.failures - 1)))
                    continue
                except BaseException as error:
                    async with cond:
                        work.finish(span, ok=False)
                        work.fatal = work.fatal or AevaeError(grpc.StatusCode.INTERNAL, repr(error))
                        cond.notify_all()
                    raise
                async with cond:
                    work.finish(span, ok=True)
                    replica.failures = 0
                    cond.notify_all()

        await asyncio.gather(*(worker(r) for r in replicas))
        if work.todo or work.fatal is not None:
            raise _give_up(replicas, work)

    async def close(self) -> None:
        for client in self.replicas:
            await client.close()


# The batch operations over a fan-out: small batches go whole to one replica (the next in turn), big ones are
# split into spans. A call that names no version is pinned first to the newest version a replica lists, so
# that every span of one batch is served by the same version (none when no version loads: each span then gets
# the server's reason). Every replica call gets what is left of the call's one deadline.

def _newest(infos: list[Any], model: str) -> int | None:
    return next((info.version or None for info in infos if info.name == model), None)


def decode(fan: SyncFanOut, latents: object, model: str, version: int | None, dtype: str,
           deadline: Deadline, chunk: int) -> DecodeResult:
    z = prepare_latents(latents)
    if z.ndim != 2 or len(z) <= chunk:
        return fan.first(lambda c, t: c.decode_result(z, model, version, dtype, timeout=t), deadline)
    if wire_version(version) == 0:  # a bad version is refused here, as the one-replica path refuses it
        version = fan.first(lambda c, t: _newest(c.list_models(timeout=t), model), deadline)
    out = Assembler(len(z))
    served: list[DecodeResult] = []

    def run(client: Any, start: int, stop: int, timeout: float) -> None:
        result = client.decode_result(z[start:stop], model, version, dtype, timeout=timeout)
        out.put(start, {"images": result.images})
        served.append(result)

    fan.spans(len(z), span_rows(len(z), len(fan.replicas), chunk), run, deadline)
    return DecodeResult(out.array("images"), served[0].model, served[0].version)


async def decode_async(fan: AsyncFanOut, latents: object, model: str, version: int | None, dtype: str,
                       deadline: Deadline, chunk: int) -> DecodeResult:
    z = prepare_latents(latents)
    if z.ndim != 2 or len(z) <= chunk:
        return await fan.first(lambda c, t: c.decode_result(z, model, version, dtype, timeout=t), deadline)
    if wire_version(version) == 0:  # a bad version is refused here, as the one-replica path refuses it
        version = _newest(await fan.first(lambda c, t: c.list_models(timeout=t), deadline), model)
    out = Assembler(len(z))
    served: list[DecodeResult] = []

    async def run(client: Any, start: int, stop: int, timeout: float) -> None:
        result = await client.decode_result(z[start:stop], model, version, dtype, timeout=timeout)
        out.put(start, {"images": result.images})
        served.append(result)

    await fan.spans(len(z), span_rows(len(z), len(fan.replicas), chunk), run, deadline)
    return DecodeResult(out.array("images"), served[0].model, served[0].version)


def _encoded(out: Assembler, model: str, version: int | None) -> EncodeResult:
    return EncodeResult(mean=out.array("mean"), logvar=out.out["logvar"], sample=out.out["sample"], model=model,
                        version=int(version or 0))


def _parts(result: EncodeResult) -> dict[str, np.ndarray | None]:
    return {"mean": result.mean, "logvar": result.logvar, "sample": result.sample}


def _whole(images: np.ndarray, sample: bool, seed: int | None, chunk: int) -> bool:
    """Seeded samples come from one generator per stream: split, they would differ from one replica's."""
    return images.ndim != 3 or len(images) <= chunk or (sample and seed is not None)


def encode(fan: SyncFanOut, images: object, model: str, version: int | None, sample: bool, seed: int | None,
           deadline: Deadline, chunk: int) -> EncodeResult:
    x = prepare_images(images)
    if _whole(x, sample, seed, chunk):
        return fan.first(lambda c, t: c.encode(x, model, version, sample, seed, timeout=t), deadline)
    if wire_version(version) == 0:  # a bad version is refused here, as the one-replica path refuses it
        version = fan.first(lambda c, t: _newest(c.list_models(timeout=t), model), deadline)
    out = Assembler(len(x))
    served: list[EncodeResult] = []

    def run(client: Any, start: int, stop: int, timeout: float) -> None:
        result = client.encode(x[start:stop], model, version, sample, None, timeout=timeout)
        out.put(start, _parts(result))
        served.append(result)

    fan.spans(len(x), span_rows(len(x), len(fan.replicas), chunk), run, deadline)
    return _encoded(out, served[0].model, served[0].version)


async def encode_async(fan: AsyncFanOut, images: object, model: str, version: int | None, sample: bool,
                       seed: int | None, deadline: Deadline, chunk: int) -> EncodeResult:
    x = prepare_images(images)
    if _whole(x, sample, seed, chunk):
        return await fan.first(lambda c, t: c.encode(x, model, version, sample, seed, timeout=t), deadline)
    if wire_version(version) == 0:  # a bad version is refused here, as the one-replica path refuses it
        version = _newest(await fan.first(lambda c, t: c.list_models(timeout=t), deadline), model)
    out = Assembler(len(x))
    served: list[EncodeResult] = []

    async def run(client: Any, start: int, stop: int, timeout: float) -> None:
        result = await client.encode(x[start:stop], model, version, sample, None, timeout=timeout)
        out.put(start, _parts(result))
        served.append(result)

    await fan.spans(len(x), span_rows(len(x), len(fan.replicas), chunk), run, deadline)
    return _encoded(out, served[0].model, served[0].version)
