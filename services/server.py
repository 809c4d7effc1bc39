"""Server bootstrap for either service: the servicer, health, reflection, limits and graceful shutdown.

On SIGTERM (or SIGINT) health turns NOT_SERVING at once, so load balancers stop sending; after
`shutdown_delay` seconds the server stops taking new calls, lets the calls in flight finish within `grace`
seconds, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from google.protobuf.descriptor import ServiceDescriptor

import grpc
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from aevae.errors import stops_on_hangup
from aevae.services.admission import Admission, Engine, Runner
from aevae.services.decoder import DecoderLogic
from aevae.services.encoder import EncoderLogic
from aevae.services.grpc_decoder import DecoderServicer
from aevae.services.grpc_encoder import EncoderServicer
from aevae.services.grpc_inference import DESCRIPTOR as OIP, InferenceServicer, ServingState
from aevae.services.registration import Parsing, register
from aevae.services import reflection_v1, security
from aevae.services.settings import PORTS, ServiceSettings, host_port, listen_problem, listeners_problem
from aevae.services.status import abort
from aevae.repository import models_dir
from aevae.store import ModelStore
from aevae.v1 import decoder_pb2, encoder_pb2

log = logging.getLogger(__name__)


class _EndedCallWrites(logging.Filter):
    """grpc.aio logs an ERROR with a traceback when a response cannot be written because its call has
    already ended: the client cancelled, its deadline passed or its connection closed while the server was
    answering (grpc/grpc#32551 turned the exception into that log line). That is the client's doing and
    routine for a streaming service, so it becomes one INFO line naming the method (shown with --log-level
    INFO)."""

    PREFIX = "ExecuteBatchError raised in core by servicer method"
    CUT = "Exception not handled by _handle_exceptions in servicer method"  # with a CancelledError

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.CUT) and record.exc_info and record.exc_info[0] is asyncio.CancelledError:
            # a call still running when the shutdown's --grace ended, cancelled by server.stop as intended
            method = message[len(self.CUT):].strip(" []")
            record.msg, record.args = "a call of %s still running at the end of the grace was cut", (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        if message.startswith(self.PREFIX):
            method = message[len(self.PREFIX):].strip(" []")
            record.msg, record.args = "an answer of %s was not sent: the call had ended (cancelled by the " \
                                      "client, past its deadline or disconnected)", (method,)
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info = record.exc_text = None
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)  # as if logged at INFO
        return True


def quiet_ended_call_writes() -> None:
    """Installs _EndedCallWrites on grpc's Cython logger, once."""
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _EndedCallWrites) for f in logger.filters):
        logger.addFilter(_EndedCallWrites())


# How long the calls cut at the end of the grace get to unwind (their handlers' cleanup: a few turns of the
# event loop) before serve() returns; a bound, so that a handler that will not end cannot hold up the exit.
CUT_CALLS_SECONDS = 1.0

async def settle_calls(timeout: float) -> None:
    """Waits, at most `timeout` seconds, for the tasks still running on the loop (the calls that server.stop cut at
    the end of the grace, their handlers unwinding) to end. server.stop returns once gRPC's core has ended the
    calls, before their Python tasks have: asyncio.run then cancelled those tasks, and for each grpc.aio printed
    a bare CancelledError traceback on stderr with traceback.print_exc (after its log line, which
    _EndedCallWrites rewrites, but a print is no log record: no filter reaches it)."""
    current = asyncio.current_task()
    others = [task for task in asyncio.all_tasks() if task is not current and not task.done()]
    if others:
        await asyncio.wait(others, timeout=timeout)


# The names grpc.aio (1.7x) gives the asyncio task of each call it serves, from the call's arrival (its request
# not yet read) to its end; tests/test_audit_services.py checks that a call in flight is seen by them.
CALL_TASK_NAMES = ("HandleExceptions[", "rpc_task")
DRAIN_POLL_SECONDS = 0.05


def calls_in_flight() -> int:
    """The calls the gRPC servers of this event loop are serving now."""
    return sum(1 for task in asyncio.all_tasks() if not task.done() and task.get_name().startswith(CALL_TASK_NAMES))


async def drain(server: grpc.aio.Server, grace: float, admission: Admission) -> None:
    """server.stop(grace), ended as soon as no call is in flight (twice in a row, DRAIN_POLL_SECONDS apart, and
    none admitted). gRPC's core sends every connection a GOAWAY and then waits for each to be closed by its
    client: one that ignored it (an idle HTTP/2 connection that sent no call, a client stuck elsewhere) held
    every SIGTERM for the whole --grace, 10 s, with nothing left to finish. A second stop(0) closes them."""
    stopping = asyncio.ensure_future(server.stop(grace))
    quiet = 0
    while quiet < 2:
        await asyncio.wait({stopping}, timeout=DRAIN_POLL_SECONDS)
        if stopping.done():
            break
        quiet = quiet + 1 if calls_in_flight() == 0 and admission.calls == 0 else 0
    else:
        await server.stop(0)
    await stopping


@dataclass(frozen=True)
class Service:
    """One of the two services: its logic, its aevae.v1 servicer and service, where it listens."""

    logic: Callable[..., Any]
    servicer: Callable[..., Any]
    descriptor: ServiceDescriptor
    default_port: int

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


SERVICES = {
    "encoder": Service(EncoderLogic, EncoderServicer, encoder_pb2.DESCRIPTOR.services_by_name["Encoder"],
                       PORTS["encoder"]),
    "decoder": Service(DecoderLogic, DecoderServicer, decoder_pb2.DESCRIPTOR.services_by_name["Decoder"],
                       PORTS["decoder"]),
}


# Threads for work that may wait on the disk (Runner): a call waiting for a version to load holds one.
LOADER_THREADS = 32


class Health(health.aio.HealthServicer):
    """grpc_health's servicer, whose NOT_FOUND for a service it has no status of said nothing: it names the
    ones it has; and whose Watch streams end when the server drains (`close_watches`)."""

    def __init__(self, known: tuple[str, ...]):
        super().__init__()
        self.known = known
        self._closing = asyncio.Event()

    async def Watch(self, request: Any, context: Any) -> None:  # noqa: N802 - gRPC's name
        """grpc_health's stream of status changes, ended with UNAVAILABLE once the server drains: a watch has no
        work to finish, and one left open (a load balancer's, a client's health checking) made every SIGTERM
        wait out the whole --grace (11.8 s against 1.5 s)."""
        watch = asyncio.ensure_future(super().Watch(request, context))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            await asyncio.wait({watch, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closing.cancel()
            if not watch.done():
                watch.cancel()
                await asyncio.gather(watch, return_exceptions=True)
        if not watch.cancelled():
            return watch.result()  # the watch's own end (its client gone): as grpc_health ends it
        await abort(context, grpc.StatusCode.UNAVAILABLE, "the server is shutting down (its status went "
                                                          "NOT_SERVING): watch another replica")

    def close_watches(self) -> None:
        """Ends every Watch stream, after the drain's NOT_SERVING has gone out to them."""
        self._closing.set()

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        if request.service not in self.known:
            await abort(context, grpc.StatusCode.NOT_FOUND,
                        f"no health status for service {request.service[:200]!r}; this server reports "
                        f"{' and '.join(repr(k) for k in self.known)} ('': the server as a whole)")
        return await super().Check(request, context)


def engine(settings: ServiceSettings, executor: ThreadPoolExecutor) -> Engine:
    loader = ThreadPoolExecutor(max_workers=LOADER_THREADS, thread_name_prefix="aevae-load")
    return Engine(Runner(executor, settings.inline_max, loader),
                  Admission(settings.max_concurrent_rpcs, settings.max_inflight_bytes, settings.max_unsent_bytes,
                            settings.stream_idle_s),
                  batch_size=settings.batch_size, batch_rows=settings.batch_rows, batch_wait_s=settings.batch_wait_s,
                  batch_gather_s=settings.batch_gather_s)


def open_store(settings: ServiceSettings) -> ModelStore:
    """The model store both front ends (aevae serve, Ray Serve) build from the settings."""
    # Request tensors are read-only views on the message bytes; the model only reads them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    root = models_dir(settings.models_dir)
    if root.exists() and not root.is_dir():
        # a folder that does not exist yet may be filled later (a volume, a first `aevae train`); a file never
        raise NotADirectoryError(f"the model repository {root} (--models-dir or AEVAE_MODELS_DIR) is a file, "
                                 "not a folder")
    return ModelStore(settings.models_dir, refresh_seconds=settings.refresh_seconds, runtime=settings.runtime,
                      threads=settings.threads, allow_symlinks=settings.allow_symlinks, precision=settings.precision)


def check_listeners(kind: str, settings: ServiceSettings) -> None:
    """OSError in one line when a port this service would listen on cannot be had: before anything loads,
    and before gRPC tries (its error names no cause)."""
    problem = listeners_problem(settings.listeners(kind))
    if problem:
        raise OSError(problem)


def build(kind: str, settings: ServiceSettings, store: ModelStore, work: Engine,
          state: ServingState | None = None) -> tuple[grpc.aio.Server, Service]:
    """The servicer for `kind` on a grpc.aio server, and the Open Inference Protocol over the same logic."""
    service = SERVICES[kind]
    size = settings.max_message_bytes
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.metrics_port is not None:
        from aevae.services import metrics

        interceptors = metrics.interceptors(settings.metrics_port, store)
    # after the metrics, so that refused calls are counted as UNAUTHENTICATED
    server = grpc.aio.server(interceptors=[*interceptors, *security.interceptors(settings)], options=[
        # The transport's own cap is a backstop at twice the limit: messages up to it reach the handler,
        # which answers one over the limit with RESOURCE_EXHAUSTED naming it (in a stream, its position).
        ("grpc.max_receive_message_length", min(2 * size, 2**31 - 1)),  # a 32-bit int
        ("grpc.max_send_message_length", size),
        ("grpc.so_reuseport", 0),
        *security.connection_options(settings),
    ])
    logic = service.logic(store, settings.limits)
    servicer = service.servicer(logic, work)
    register(servicer, server, service.descriptor, size)
    register(InferenceServicer(kind, servicer, state), server, OIP, size)
    if settings.metrics_port is not None:
        metrics.watch(store, [servicer.batcher], servicer.engine.admission)
    return server, service


async def serve(kind: str, settings: ServiceSettings) -> int:
    check_listeners(kind, settings)  # before anything loads or warns: a port that cannot be had, saying why
    protection = security.check_binding(settings, kind)  # and a public plaintext port
    # From here on SIGTERM and SIGINT stop the service the same graceful way: one that comes while the models
    # load or the server starts is handled once it serves (before, its default action killed the process
    # mid-start with -15, where the shutdown promised an exit 0).
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # SIGHUP too (a closed terminal), unless started with it ignored (nohup)
    for sig in (signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if stops_on_hangup() else [])):
        loop.add_signal_handler(sig, stop.set)
    credentials = security.server_credentials(settings)
    executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix=f"aevae-{kind}")
    store = open_store(settings)
    state = ServingState()
    work = engine(settings, executor)
    server, service = build(kind, settings, store, work, state)
    quiet_ended_call_writes()

    reported = ("", service.full_name)  # the health statuses this server keeps: itself, and its service
    health_servicer = Health(reported)
    size = settings.max_message_bytes
    health_service = health_pb2.DESCRIPTOR.services_by_name["Health"]

    def add_health(on: grpc.aio.Server) -> None:
        register(Parsing(health_servicer, health_service), on, health_service, size)

    add_health(server)
    names = (service.full_name, OIP.full_name, health.SERVICE_NAME, reflection.SERVICE_NAME, reflection_v1.add_v1())
    reflection_service = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]
    reflecting = Parsing(reflection.aio.ReflectionServicer(names), reflection_service)
    register(reflecting, server, reflection_service, size)
    # grpc.reflection.v1 too, which grpcurl, Postman and grpcui ask first (v1alpha is its wire-identical
    # predecessor, the only one grpcio-reflection ships): they then need no fallback
    register(reflecting, server, reflection_service, size, name=reflection_v1.SERVICE_NAME)
    if settings.metrics_port is not None:
        from aevae.services.metrics import serve_metrics

        serve_metrics(settings.metrics_port, settings.metrics_address, kind)

    address = host_port(settings.host, settings.port_for(kind))
    try:
        bound = (server.add_insecure_port(address) if credentials is None
                 else server.add_secure_port(address, credentials))
    except RuntimeError as exc:  # taken since check_listeners, or a cause it did not find
        problem = listen_problem(settings.host, settings.port_for(kind), "--port", kind)
        raise OSError(problem or f"cannot listen on {address}: {exc}") from None
    probes = await security.serve_health(settings, add_health)
    await server.start()
    for name in reported:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    print(f"aevae {kind} serving {service.full_name} on {host_port(settings.host, bound)} "
          f"(models in {store.repository.root.resolve()}: {store.describe()}; {protection})", flush=True)
    preloading = loop.run_in_executor(work.run.loader, store.preload, stop.is_set)

    await stop.wait()

    log.info("shutting down: NOT_SERVING, then draining for up to %.1f s", settings.grace)
    print(f"aevae {kind}: stopping (NOT_SERVING, draining)", file=sys.stderr, flush=True)
    state.stop()  # OIP ServerReady and ModelReady answer false from now on
    await health_servicer.enter_graceful_shutdown()
    await asyncio.sleep(settings.shutdown_delay)
    health_servicer.close_watches()  # told NOT_SERVING: nothing for the drain to wait for
    # Calls still running after the grace are cancelled; model work queued for them is dropped, never
    # computed: the process exits within the grace plus the one forward pass each worker may be in (and at
    # most CUT_CALLS_SECONDS for the cut calls' handlers to unwind; measured: under a millisecond).
    await drain(server, settings.grace, work.admission)
    if probes is not None:
        await probes.stop(0)
    await settle_calls(CUT_CALLS_SECONDS)  # after every server has stopped: their own tasks are done too
    preloading.cancel()
    executor.shutdown(wait=True, cancel_futures=True)
    work.run.loader.shutdown(wait=True, cancel_futures=True)
    return 0
