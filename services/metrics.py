"""Prometheus metrics for the services and the UI: the official prometheus_client, a grpc.aio server
interceptor for every RPC (aevae.v1, the Open Inference Protocol, health, reflection), collectors read at
scrape time for the model store and the dynamic batchers, and the HTTP endpoint on `--metrics-port`.

Off unless a port is set: then nothing here is imported by the server and no interceptor runs.

Label values are bounded: the `model` label is a name the repository served (or was asked for and served
at least once); anything else a caller sends counts as "other", so a client cannot grow the series.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import socket
import sys
import threading
import time
from socketserver import ThreadingMixIn
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from aevae.store import ModelStore

disable_created_metrics()  # no *_created series: half the lines of a scrape, and nothing uses them here

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384, 65536)

REQUESTS = Counter("aevae_grpc_requests", "RPCs finished, by service, method, model and status code",
                   ["service", "method", "model", "code"])
LATENCY = Histogram("aevae_grpc_request_duration_seconds", "RPC latency from the handler's start to its end "
                    "(a stream: the whole stream)", ["service", "method", "model"], buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("aevae_grpc_requests_in_flight", "RPCs being handled now", ["service", "method"])
ROWS = Histogram("aevae_grpc_request_rows", "images or latents per request message (the batch size a client "
                 "sends)", ["service", "method", "model"], buckets=ROW_BUCKETS)
RECEIVED = Counter("aevae_grpc_received_bytes", "request message bytes received", ["service", "method"])
SENT = Counter("aevae_grpc_sent_bytes", "response message bytes sent", ["service", "method"])
MODEL_FIELDS = ("model", "model_name", "name")  # aevae.v1 requests; OIP inference; OIP metadata/readiness


class Models:
    """The model names allowed as label values: those a call succeeded with and the repository holds
    (`exists`), bounded. A call can succeed without the name being a model (ModelReady answers "not ready"
    with OK), so success alone would let any caller fill the labels with names of its own."""

    def __init__(self, limit: int = 200, exists: Callable[[str], bool] | None = None):
        self.known: set[str] = set()
        self.limit = limit
        self.exists = exists

    def label(self, name: str, ok: bool) -> str:
        if name in self.known or not name:
            return name
        if ok and len(self.known) < self.limit and (self.exists is None or self.exists(name)):
            self.known.add(name)
            return name
        return "other"


def model_of(request: Any) -> str:
    for field in MODEL_FIELDS:
        value = getattr(request, field, None)
        if isinstance(value, str):
            return value
    return ""


def rows_of(request: Any) -> int | None:
    """The batch a request message carries: aevae.v1's images or latents tensor, or OIP's first input."""
    for field in ("images", "latents"):
        tensor = getattr(request, field, None)
        shape = getattr(tensor, "shape", None)
        if shape:
            return int(shape[0])
    tensors = getattr(request, "inputs", None)
    if tensors:
        shape = getattr(tensors[0], "shape", None)
        if shape:
            return int(shape[0])
    return None


def size_of(message: Any) -> int:
    """A message's size on the wire; a response the servicer serialized itself is its bytes."""
    if isinstance(message, bytes):
        return len(message)
    size = getattr(message, "ByteSize", None)
    return int(size()) if size is not None else 0


class Call:
    """The bookkeeping of one RPC: started, messages seen, finished with a code."""

    __slots__ = ("interceptor", "service", "method", "model", "received", "sent", "rows", "start")

    def __init__(self, interceptor: "MetricsInterceptor", service: str, method: str):
        self.interceptor = interceptor
        self.service = service
        self.method = method
        self.model = ""
        self.received = 0
        self.sent = 0
        self.rows: list[int] = []
        self.start = time.perf_counter()
        IN_FLIGHT.labels(service, method).inc()

    def request(self, message: Any) -> None:
        if not self.model:
            self.model = model_of(message)
        self.received += size_of(message)
        rows = rows_of(message)
        if rows is not None:
            self.rows.append(rows)

    def response(self, message: Any) -> None:
        self.sent += size_of(message)

    def finish(self, code: str) -> None:
        service, method = self.service, self.method
        IN_FLIGHT.labels(service, method).dec()
        model = self.interceptor.models.label(self.model, code == "OK")
        REQUESTS.labels(service, method, model, code).inc()
        LATENCY.labels(service, method, model).observe(time.perf_counter() - self.start)
        if self.rows:
            histogram = ROWS.labels(service, method, model)
            for rows in self.rows:
                histogram.observe(rows)
        if self.received:
            RECEIVED.labels(service, method).inc(self.received)
        if self.sent:
            SENT.labels(service, method).inc(self.sent)


def code_of(context: Any, error: BaseException | None) -> str:
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
        # The call ended under its handler: the client cancelled, its deadline passed or it went away. A stream
        # ends so by gRPC closing its response generator (GeneratorExit at the yield), which was counted as
        # UNKNOWN, a code no client saw; a deadline's end is told apart by the time left.
        return "DEADLINE_EXCEEDED" if _past_deadline(context) else "CANCELLED"
    try:
        code = context.code()
    except Exception:  # noqa: BLE001 - an older grpc without ServicerContext.code()
        code = None
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio may keep the raw integer
        return next((c.name for c in grpc.StatusCode if c.value[0] == code), "UNKNOWN")
    return "OK" if error is None else "UNKNOWN"


def _past_deadline(context: Any) -> bool:
    try:
        left = context.time_remaining()
    except Exception:  # noqa: BLE001 - a context without it (an adapter): no deadline known
        return False
    return left is not None and left <= 0


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler to count calls, codes, latency, rows and bytes; the handler itself is
    called unchanged."""

    def __init__(self, exists: Callable[[str], bool] | None = None) -> None:
        self.models = Models(exists=exists)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        service, _, method = details.method.lstrip("/").rpartition("/")
        kinds = (handler.request_streaming, handler.response_streaming)
        behavior = {(False, False): handler.unary_unary, (False, True): handler.unary_stream,
                    (True, False): handler.stream_unary, (True, True): handler.stream_stream}[kinds]
        wrapped = self._wrap(behavior, service, method, *kinds)
        make = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[kinds]
        return make(wrapped, request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)

    def _wrap(self, behavior: Callable[..., Any], service: str, method: str, streaming_in: bool,
              streaming_out: bool) -> Callable[..., Any]:
        def inbound(request: Any, call: Call) -> Any:
            if not streaming_in:
                call.request(request)
                return request
            return _counted(request, call)

        if streaming_out and inspect.isasyncgenfunction(behavior):
            async def generator(request: Any, context: Any) -> AsyncIterator[Any]:
                call = Call(self, service, method)
                failed: str | None = None  # the code, not the exception: kept, it would tie this frame into a cycle
                try:
                    async for response in behavior(inbound(request, call), context):
                        call.response(response)
                        yield response
                except BaseException as exc:
                    failed = code_of(context, exc)
                    raise
                finally:
                    call.finish(failed or code_of(context, None))
            return generator

        async def coroutine(request: Any, context: Any) -> Any:
            call = Call(self, service, method)
            failed: str | None = None  # as in `generator`: a frame that kept its exception would wait for the GC
            try:
                result = behavior(inbound(request, call), context)
                if inspect.isawaitable(result):
                    result = await result
                if not streaming_out:
                    call.response(result)
                return result
            except BaseException as exc:
                failed = code_of(context, exc)
                raise
            finally:
                call.finish(failed or code_of(context, None))
        return coroutine


async def _counted(requests: AsyncIterator[Any], call: Call) -> AsyncIterator[Any]:
    async for message in requests:
        call.request(message)
        yield message


class ServiceCollector(Collector):
    """Read at scrape time: the model versions loaded and known broken (the store), the forward passes of the
    dynamic batchers, and what the admission control holds (calls, request and answer bytes)."""

    def __init__(self, store: ModelStore, batchers: Iterable[Any], admission: Any = None):
        self.store = store
        self.batchers = list(batchers)
        self.admission = admission  # admission.Admission: what the limits hold right now

    def collect(self) -> Iterator[Any]:
        loaded = GaugeMetricFamily("aevae_model_versions_loaded", "model versions held in memory, by runtime",
                                   labels=["model", "version", "runtime"])
        for model in self.store.loaded():
            loaded.add_metric([model.name, str(model.number), model.runtime.name], 1)
        yield loaded
        # by model, not by version: a repository can hold any number of broken versions, and a label value
        # each would grow the scrape with them (the log and ListModels name them)
        broken = GaugeMetricFamily("aevae_model_versions_broken", "model versions known to be broken (checksum, "
                                   "unsafe or unreadable weights, missing files); never served", labels=["model"])
        counts: dict[str, int] = {}
        for name, _ in self.store.broken():
            counts[name] = counts.get(name, 0) + 1
        for name, count in sorted(counts.items()):
            broken.add_metric([name], count)
        yield broken
        passes = CounterMetricFamily("aevae_batch_forward_passes", "forward passes run by the dynamic batcher")
        merged = CounterMetricFamily("aevae_batch_merged_requests", "requests answered by a forward pass shared "
                                     "with other requests")
        passes.add_metric([], sum(getattr(b, "batches", 0) for b in self.batchers))
        merged.add_metric([], sum(getattr(b, "merged", 0) for b in self.batchers))
        yield passes
        yield merged
        gatherings = [b.gathering for b in self.batchers if hasattr(b, "gathering")]
        windows = CounterMetricFamily("aevae_batch_gather_windows", "batches of small unary calls that gathered "
                                      "company on a busy server (--batch-gather-s), by how they ended: on reaching "
                                      "their target, at the window's end with company, at the window's end alone",
                                      labels=["ended"])
        for how in ("target", "window", "alone"):
            windows.add_metric([how], sum(g.ended[how] for g in gatherings))
        yield windows
        target = GaugeMetricFamily("aevae_batch_gather_target", "calls a gathering batch now waits for (learnt "
                                   "from the load), the largest over the services' batchers")
        target.add_metric([], max((g.target for g in gatherings), default=0))
        yield target
        if self.admission is not None:
            for name, help, now in (
                    ("calls", "Encode/Decode calls and streams in flight (limit: --max-concurrent-rpcs)",
                     self.admission.calls),
                    ("request_bytes", "request bytes held by calls in flight (limit: --max-inflight-bytes)",
                     self.admission.bytes),
                    ("answer_bytes", "answer bytes reserved by answers being computed (limit: --max-inflight-bytes)",
                     self.admission.output),
                    ("unsent_bytes", "answer bytes of streams computed and not yet sent (limit: --max-unsent-bytes)",
                     self.admission.unsent)):
                gauge = GaugeMetricFamily(f"aevae_admission_{name}", help)
                gauge.add_metric([], now)
                yield gauge


def interceptors(port: int | None, store: ModelStore | None = None) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a server gets for its metrics: none when metrics are off. With the store, a model
    label is only ever a name its repository holds."""
    return [] if port is None else [MetricsInterceptor(None if store is None else store.holds)]


class _Deadline(io.RawIOBase):
    """A socket's reads that end, all of them together, at a deadline: TimeoutError past it."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self.sock = sock
        self.deadline = time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request was not received in time")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Handler(WSGIRequestHandler):
    """One scrape connection. `timeout`: the whole request must arrive within it, or the connection is closed,
    so that idle or half-sent requests cannot hold threads and descriptors for ever. A per-read timeout alone
    would not do: a client sending a byte every few seconds (a slowloris) would keep its slot as long as it
    likes, and MAX_CONNECTIONS of them would keep every scrape out."""

    timeout = 10.0

    def setup(self) -> None:
        super().setup()
        self.rfile.close()  # the socket's own file: it would keep the descriptor open until collected
        self.rfile = io.BufferedReader(_Deadline(self.connection, self.timeout))

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        self.server.received(self.connection)  # type: ignore[attr-defined]  # a _Server
        self.connection.settimeout(self.timeout)  # the answer gets its own time, not what the request left
        return parsed

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Silent, as prometheus_client's own handler: a scrape every few seconds is not news."""


class _Server(ThreadingMixIn, WSGIServer):
    """The /metrics endpoint: a thread per connection, at most MAX_CONNECTIONS at once. Without a bound, slow
    or idle clients could take every file descriptor of the process and starve its gRPC port (the server's
    accept loop fails with "too many open files"). A Prometheus scraper holds one connection.

    When every slot is taken, a new connection takes the slot of the oldest one still sending its request
    (closed), and is itself closed only when every slot is answering. Before, a connection past the bound was
    closed at once: MAX_CONNECTIONS idle connections, opened again as the handler's timeout closed them, kept
    every scrape out for as long as they went on. A scrape sends its request at once; to keep it out now, idle
    connections must come faster than its request."""

    daemon_threads = True
    MAX_CONNECTIONS = 16

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._slots = threading.BoundedSemaphore(self.MAX_CONNECTIONS)
        self._receiving: dict[Any, float] = {}  # connections whose request has not all arrived: when accepted
        self._lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            if not (self._close_oldest_receiving() and self._slots.acquire(timeout=1.0)):
                self.shutdown_request(request)
                return
        with self._lock:
            self._receiving[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.received(request)
            self._slots.release()
            raise

    def received(self, request: Any) -> None:
        """The connection's request has arrived (or the connection ended): it is no longer evictable."""
        with self._lock:
            self._receiving.pop(request, None)

    def _close_oldest_receiving(self) -> bool:
        """Ends the oldest connection still sending its request (its thread then ends and gives its slot
        back); False when every connection is past its request."""
        with self._lock:
            if not self._receiving:
                return False
            oldest = min(self._receiving, key=self._receiving.__getitem__)
            del self._receiving[oldest]
        try:
            oldest.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed meanwhile: its slot is coming back all the same
            pass
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.received(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that went silent (the timeout) or away is routine: no traceback on stderr."""
        if isinstance(sys.exc_info()[1], (TimeoutError, ConnectionError)):
            return
        super().handle_error(request, client_address)


class MetricsUnavailable(OSError):
    """The /metrics endpoint cannot listen; the message names the address and --metrics-port."""


def serve_metrics(port: int, host: str, what: str) -> int:
    """Starts the /metrics endpoint (a daemon thread) and prints where it is; returns the bound port.
    MetricsUnavailable (an OSError) naming the address and the flag when it cannot listen."""
    from aevae.services.settings import connectable, host_port

    bare = host.strip("[]")  # "[::1]", as gRPC takes it, is "::1" to a socket
    try:
        family = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("MetricsServer", (_Server,), {"address_family": family})
        server: WSGIServer = make_server(bare, port, make_wsgi_app(REGISTRY), server_class, handler_class=_Handler)
    except OSError as exc:
        raise MetricsUnavailable(f"cannot serve metrics on {host_port(bare, port)} (--metrics-port): "
                      f"{exc.strerror or exc}") from None
    threading.Thread(target=server.serve_forever, name="aevae-metrics", daemon=True).start()
    bound = int(server.server_address[1])
    print(f"aevae {what} metrics on http://{host_port(connectable(bare), bound)}/metrics", file=sys.stdout,
          flush=True)
    return bound


def watch(store: Any, batchers: Iterable[Any], admission: Any = None) -> None:
    REGISTRY.register(ServiceCollector(store, batchers, admission))


# -- the web UI (aevae ui --metrics-port) ------------------------------------------------------------------
UI_HTTP = Counter("aevae_ui_http_requests", "UI HTTP requests finished, by route and status", ["route", "status"])
UI_SESSIONS = Gauge("aevae_ui_websocket_sessions", "WebSocket sessions open now")
UI_SESSIONS_TOTAL = Counter("aevae_ui_websocket_sessions_opened", "WebSocket sessions opened")
UI_DECODES = Histogram("aevae_ui_decode_round_trip_seconds", "a WebSocket decode message to its reply (through "
                       "the decoder service), by outcome", ["outcome"], buckets=LATENCY_BUCKETS)


def observe_ui_decode(seconds: float, outcome: str) -> None:
    UI_DECODES.labels(outcome).observe(seconds)


def observe_ui_session(opened: bool) -> None:
    """A WebSocket session upgraded (`opened`) or ended: a handshake refused (503 past the limit, 403 from
    another origin) is a request, not a session."""
    if opened:
        UI_SESSIONS.inc()
        UI_SESSIONS_TOTAL.inc()
    else:
        UI_SESSIONS.dec()


def ui_middleware() -> Any:
    """An aiohttp middleware: requests by route and status, the UI's refusals (421, 403, 415) included: it
    runs before its checks."""
    from aiohttp import web

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> Any:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            UI_HTTP.labels(route, str(status)).inc()

    return middleware
