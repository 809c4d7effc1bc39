"""The one source of the services' settings: a dataclass whose fields, defaults and help texts make the
`aevae serve` flags, the server's configuration and the Ray Serve application arguments alike.

Standard library only: the CLI imports it to show the defaults, and the client and the UI import the default
ports from here.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import socket
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Iterable, Mapping, NamedTuple

from aevae.errors import ResourceExhausted, port_problem

# The default ports, written once.
PORTS = {"encoder": 50051, "decoder": 50052, "ui": 8080}

# Bounds that gRPC and the runtimes impose. gRPC's channel arguments are 32-bit ints: the transport's receive cap
# is twice max_message_bytes, and keepalive is given in milliseconds. Past them grpc.aio.server raised an
# OverflowError traceback.
MAX_MESSAGE_BYTES = 1 << 30
MAX_KEEPALIVE_SECONDS = (2**31 - 1) // 1000
MAX_THREADS = 1024  # more intra-op threads than any machine's cores only cost memory: a start of 100000 hung


def host_port(host: str, port: int | str) -> str:
    """host:port as gRPC and URLs write it: an IPv6 literal in brackets ("::1" -> "[::1]:50052")."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def connectable(host: str) -> str:
    """The address a client on this machine reaches a listener bound to `host` at: 127.0.0.1 for the wildcard
    addresses (what `aevae up` and the metrics endpoint print and wait on)."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::", "[::]") else host


def listen_problem(host: str, port: int, flag: str, what: str, host_flag: str = "--host") -> str | None:
    """Why this process cannot listen on host:port (`flag` names the port's option, `what` the listener), found
    by binding a socket of its own before gRPC does; None: it can. gRPC reports every failure to bind alike,
    "Failed to bind to address", after an E line of its core on stderr: a host that does not resolve or is not
    this machine's read as a port in use. `aevae up` asks the same before it trains or starts anything."""
    bare = host.strip("[]")  # "[::1]", as gRPC takes it, is "::1" to a socket
    try:
        addresses = socket.getaddrinfo(bare or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return (f"{host_flag} {host} does not resolve ({exc.strerror}); give an address of this machine or a name "
                "that resolves to one: 127.0.0.1 (this machine only), 0.0.0.0 (all interfaces) or an interface's")
    failures: list[int] = []
    for family, socktype, proto, _, address in addresses:
        try:
            with socket.socket(family, socktype, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds
                probe.bind(address)
            return None  # gRPC listens when one of the addresses binds
        except OSError as exc:
            failures.append(exc.errno or 0)
    where = host_port(host, port)
    if errno.EADDRINUSE in failures:
        return (f"{where} is in use by another process (another aevae {what}?): stop it, or pass another {flag} "
                "(0 picks a free one)")
    if errno.EADDRNOTAVAIL in failures:
        resolved = ", ".join(sorted({str(a[4][0]) for a in addresses}))
        return (f"{host_flag} {host} is not an address of this machine{'' if resolved == bare else f' ({resolved})'}; "
                "give one of its own: 127.0.0.1 (this machine only), 0.0.0.0 (all interfaces) or an interface's")
    if errno.EACCES in failures:
        return (f"cannot listen on {where}: permission denied (ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE); pass {flag} 1024 or above (0 picks a free one)")
    return f"cannot listen on {where} ({flag}): {os.strerror(failures[0]) if failures else 'no address'}"


class Listener(NamedTuple):
    """One port a process would listen on: its option, the port (None: not listening; 0: any free one), what
    listens, and the address with its option."""

    flag: str
    port: int | None
    what: str
    host: str
    host_flag: str = "--host"


def listeners_problem(listeners: Iterable[Listener]) -> str | None:
    """The first reason the `listeners` cannot all listen: two flags on one port (named as such, not as a port
    in use), or `listen_problem`'s; None when they can. `aevae serve` and `aevae up` ask it before anything
    loads or trains."""
    taken: dict[int, str] = {}
    for flag, port, what, host, host_flag in listeners:
        if port is None:
            continue
        if port and port in taken:
            return f"{taken[port]} and {flag} are both {port}: each needs a port of its own (0 picks a free one)"
        taken[port] = flag
        problem = listen_problem(host, port, flag, what, host_flag)
        if problem:
            return problem
    return None


def _opt(default: Any, help: str, *, flag: bool = True, minimum: float | None = 0,
         maximum: float | None = None) -> Any:
    """A setting: its default, its help text, whether `aevae serve` has a flag for it, and its least and
    greatest values (None: no bound)."""
    return field(default=default, metadata={"help": help, "flag": flag, "minimum": minimum, "maximum": maximum})


@dataclass(frozen=True)
class Limits:
    """What one request or response may hold; beyond it, RESOURCE_EXHAUSTED with the limit in the message."""

    max_message_bytes: int
    max_batch: int

    def check_batch(self, n: int, field: str) -> None:
        if n > self.max_batch:
            raise ResourceExhausted(
                f"{field}: batch of {n} exceeds the maximum batch per request of {self.max_batch}; "
                "split it: a bigger batch goes as several requests (the messages of one stream, for example)"
            )

    # Room an answer keeps beside its images: the model's name (a folder name, at most 255 bytes), the version,
    # the dtype and the shape. Counting the images alone let through a batch of exactly max / bytes-per-image,
    # whose answer gRPC then refused with "Sent message larger than max", saying nothing of what to change.
    ENVELOPE = 1024

    def check_response(self, n: int, bytes_per_item: int, field: str) -> None:
        size = n * bytes_per_item
        if size + self.ENVELOPE > self.max_message_bytes:
            fits = max(1, (self.max_message_bytes - self.ENVELOPE) // bytes_per_item)
            raise ResourceExhausted(
                f"{field}: the response would be {size} bytes of images and up to {self.ENVELOPE} of its other "
                f"fields, over the max message size of {self.max_message_bytes} bytes; send at most {fits} per "
                "request: a bigger batch goes as several requests (the messages of one stream, for example)"
            )


@dataclass(frozen=True)
class ServiceSettings:
    models_dir: str | None = _opt(None, "model repository (or AEVAE_MODELS_DIR; default ./models)", minimum=None)
    host: str = _opt("127.0.0.1", "address to listen on; 0.0.0.0 for all interfaces", minimum=None)
    port: int | None = _opt(None, "port (default: 50051 for the encoder, 50052 for the decoder); 0 picks a free "
                                  "one, printed on start")
    # At most 1 GiB: gRPC takes message lengths as 32-bit ints and the server's transport cap is twice the
    # limit; beyond it, grpc.aio.server failed with "OverflowError: value too large to convert to int".
    max_message_bytes: int = _opt(64 * 1024 * 1024, "largest request or response message; RESOURCE_EXHAUSTED "
                                                     "beyond; at least 64 KiB, or the metadata answers (ListModels, "
                                                     "GetLatentStats) could not be sent, and at most 1 GiB",
                                  minimum=64 * 1024, maximum=MAX_MESSAGE_BYTES)
    max_batch: int = _opt(65536, "most images or latents per request message; RESOURCE_EXHAUSTED beyond",
                          minimum=1)
    max_concurrent_rpcs: int = _opt(256, "most Encode/Decode calls and streams in flight (streams at most 3/4 of "
                                         "them, the rest kept for unary calls); RESOURCE_EXHAUSTED beyond (health "
                                         "and ListModels always answer)", minimum=1)
    max_inflight_bytes: int = _opt(256 * 1024 * 1024, "most request bytes held by calls in flight, and most answer "
                                                      "bytes between the model and the wire (answers wait); "
                                                      "RESOURCE_EXHAUSTED beyond", minimum=1)
    max_unsent_bytes: int = _opt(512 * 1024 * 1024, "most answer bytes of streams computed and not yet sent "
                                                     "(their clients read slower than the server answers, or not "
                                                     "at all); beyond, streams wait before computing their next "
                                                     "answer (unary calls do not)", minimum=1)
    # A stream holds one of max_concurrent_rpcs while it is open: without an end to idle ones, clients that open
    # streams and send nothing could hold them all (Envoy's stream idle timeout is 5 min by default too).
    stream_idle_s: float = _opt(300.0, "seconds a stream may stay idle (no request message while every answer "
                                       "has been sent) before the server ends it with DEADLINE_EXCEEDED, giving "
                                       "back its slot of --max-concurrent-rpcs; 0: never")
    workers: int = _opt(2, "threads running the model off the event loop", minimum=1)
    # Each loaded version opens its pools at once: 100000 threads took 16 GB and the start never finished.
    threads: int | None = _opt(None, "intra-op threads of the model runtime, ONNX Runtime or torch (default: "
                                     "the CPUs the process may use: its affinity, capped by its cgroup's CPU "
                                     "quota, such as a container's --cpus or a pod's CPU limit)", minimum=1, maximum=MAX_THREADS)
    inline_max: int = _opt(64, "batches up to this size run on the event loop (saves a thread hop); 0: never")
    refresh_seconds: float = _opt(2.0, "how often the repository is re-read, so new versions appear and changed "
                                       "ones are reloaded without a restart")
    keepalive_seconds: float = _opt(60.0, "seconds of silence on a connection (with calls or without) after which "
                                          "the server pings the client; one that does not answer within as long (at "
                                          "most 20 s) is dropped and its calls end, so a client gone without closing "
                                          "its connection holds neither its calls' slots and memory nor a file "
                                          "descriptor", minimum=0.001,
                                  maximum=MAX_KEEPALIVE_SECONDS)
    # The one end for a stream whose client stops reading: grpc.aio cannot end a call whose write waits on
    # flow control, but the transport can close its connection. It also spreads long-lived clients over replicas.
    max_connection_age_s: float = _opt(3600.0, "seconds after which the server asks a client to reconnect "
                                               "(GOAWAY, give or take a tenth): its new calls go on a new "
                                               "connection, and the calls in flight get --max-connection-age-grace-s "
                                               "more to finish; 0: never", maximum=MAX_KEEPALIVE_SECONDS)
    max_connection_age_grace_s: float = _opt(600.0, "seconds calls in flight on a connection past "
                                                    "--max-connection-age-s get before it is closed, which ends "
                                                    "them (a stream whose client stopped reading included)",
                                             maximum=MAX_KEEPALIVE_SECONDS)
    grace: float = _opt(10.0, "seconds calls in flight get to finish on SIGTERM")
    shutdown_delay: float = _opt(0.5, "seconds between NOT_SERVING and refusing new calls on SIGTERM")
    runtime: str = _opt("auto", "model runtime: auto (ONNX Runtime when the version has graphs and "
                                "onnxruntime is installed, else torch), onnx or torch", minimum=None)
    precision: str = _opt("fp32", "decoding precision: fp32, int8 (ONNX Runtime over the version's "
                                  "decoder.int8.onnx; fp32 for versions without one) or bf16 (torch autocast); "
                                  "encoding is always fp32. Measured cost: docs/measurements.md, Reduced "
                                  "precision", minimum=None)
    allow_symlinks: bool = _opt(False, "serve version folders or files that are symlinks out of the "
                                       "repository root (refused by default)", minimum=None)
    # Dynamic batching of unary calls: requests that arrive while the model is busy, or while the server is busy
    # (within batch_gather_s), or within batch_wait_s are merged into one forward pass.
    batch_size: int = _opt(32, "most unary requests merged into one forward pass; 1: no batching", minimum=1)
    # A batching window is milliseconds; one of seconds would hold every call for that long.
    batch_wait_s: float = _opt(0.0, "how long the first request of a batch waits for company when the model "
                                    "is idle (0: never waits)", maximum=1.0)
    batch_gather_s: float = _opt(0.002, "how long a small unary call waits for others to join it when it finds "
                                        "the server busy with other work (a caller alone never waits; 0: never; "
                                        "--batch-wait-s, when set, applies instead)", maximum=1.0)
    batch_rows: int = _opt(256, "requests with more rows than this run alone, unbatched", minimum=1)
    metrics_port: int | None = _opt(None, "serve Prometheus metrics at http://HOST:PORT/metrics (off when unset; "
                                          "0 picks a free port, printed on start)")
    # The endpoint has neither TLS nor a token: a service open to the network may keep it on this machine.
    metrics_host: str | None = _opt(None, "address the metrics port listens on (default: --host), e.g. "
                                          "127.0.0.1 to keep them on this machine while --host serves beyond it",
                                    minimum=None)
    # Security (services/security.py): TLS, mutual TLS, bearer tokens and the binding policy.
    tls_cert: str | None = _opt(None, "PEM certificate (chain) of the server: serve TLS (with --tls-key)", minimum=None)
    tls_key: str | None = _opt(None, "PEM private key of --tls-cert", minimum=None)
    tls_client_ca: str | None = _opt(None, "PEM CA certificates: mutual TLS, every client must present a "
                                           "certificate signed by one of them", minimum=None)
    token_file: str | None = _opt(None, "file of accepted bearer tokens, one per line, re-read when it changes "
                                        "(default: the AEVAE_TOKEN variable; none: no token needed); calls "
                                        "send `authorization: Bearer TOKEN`, health needs none", minimum=None)
    insecure: bool = _opt(False, "allow a non-loopback --host without TLS or without a token (warns on "
                                 "every start); only when something else protects the traffic", minimum=None)
    health_port: int | None = _opt(None, "also serve grpc.health.v1 alone, plaintext and without a token, on "
                                         "this port (for probes that speak neither TLS nor tokens, such as "
                                         "Kubernetes' grpc probes)")

    def __post_init__(self) -> None:
        for f in fields(self):
            value, minimum = getattr(self, f.name), f.metadata["minimum"]
            if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison below
                raise ValueError(f"{f.name.replace('_', '-')} must be a finite number, got {value}")
            problem = port_problem(f.name.replace("_", "-"), value) if f.name.endswith("port") else None
            if problem:
                raise ValueError(problem)
            if minimum is not None and value is not None and value < minimum:
                raise ValueError(f"{f.name.replace('_', '-')} must be at least {minimum}, got {value}")
            maximum = f.metadata["maximum"]
            if maximum is not None and value is not None and value > maximum:
                raise ValueError(f"{f.name.replace('_', '-')} must be at most {maximum}, got {value}")
        if self.runtime not in ("auto", "onnx", "torch"):
            raise ValueError(f"runtime must be auto, onnx or torch, got {self.runtime!r}")
        if self.precision not in ("fp32", "bf16", "int8"):
            raise ValueError(f"precision must be fp32, bf16 or int8, got {self.precision!r}")

    @property
    def limits(self) -> Limits:
        return Limits(max_message_bytes=self.max_message_bytes, max_batch=self.max_batch)

    def port_for(self, kind: str) -> int:
        return PORTS[kind] if self.port is None else self.port

    def listeners(self, kind: str) -> list[Listener]:
        """The ports `aevae serve` listens on for `kind`, each with its address."""
        metrics_flag = "--host" if self.metrics_host is None else "--metrics-host"
        return [Listener("--port", self.port_for(kind), kind, self.host),
                Listener("--health-port", self.health_port, kind, self.host),
                Listener("--metrics-port", self.metrics_port, kind, self.metrics_address, metrics_flag)]

    @property
    def metrics_address(self) -> str:
        """The address the metrics port listens on: --metrics-host, or --host."""
        return self.host if self.metrics_host is None else self.metrics_host

    def models_root(self) -> str:
        return self.models_dir or os.environ.get("AEVAE_MODELS_DIR") or "models"

    def replace(self, **changes: Any) -> "ServiceSettings":
        return replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    # -- the two front ends of the settings -------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """One flag per setting, its default and help from the field."""
        for f in fields(cls):
            if not f.metadata["flag"]:
                continue
            option = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not MISSING else None
            if isinstance(default, bool):
                parser.add_argument(option, action="store_true", help=f.metadata["help"])
                continue
            kind = _scalar_type(f)
            parser.add_argument(option, type=kind, default=default, help=f.metadata["help"])

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> "ServiceSettings":
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None, refused: Iterable[str] = ()) -> "ServiceSettings":
        """From a config's mapping (Ray Serve's `args:`): unknown keys and wrong types fail with a message
        naming the key and what is accepted (the `refused` ones not among them: the caller refuses those)."""
        known = {f.name: f for f in fields(cls)}
        if values is not None and not isinstance(values, Mapping):
            raise ValueError(f"the settings must be a mapping of names to values (args: in a Serve config), got "
                             f"{values!r}; accepted names: {sorted(set(known) - set(refused))}")
        values = dict(values or {})
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}; accepted: {sorted(set(known) - set(refused))}")
        parsed: dict[str, Any] = {}
        for name, value in values.items():
            kind = _scalar_type(known[name])
            # None only where it means "unset" (`threads`, `port`...): a `batch_size: null` passed every check
            # and failed in the replicas, at the first request.
            optional = known[name].default is None
            if value is None and optional or isinstance(value, kind) and not (isinstance(value, bool)
                                                                            and kind is not bool):
                parsed[name] = value
                continue
            try:
                # int(1.5) is 1: a fraction (or inf, nan) given for a count is refused, not truncated
                if kind is bool or isinstance(value, bool) or value is None or (
                        kind is int and isinstance(value, float) and not value.is_integer()):
                    raise ValueError
                parsed[name] = kind(value)
            except (TypeError, ValueError, OverflowError):
                raise ValueError(f"{name}: expected {kind.__name__}{' or null' if optional else ''}, got "
                                 f"{value!r}") from None
        return cls(**parsed)


def _scalar_type(f: Any) -> type:
    """int, float, str or bool, from the field's annotation (`int | None` -> int)."""
    annotation = str(f.type)
    for name, kind in (("bool", bool), ("float", float), ("int", int), ("str", str)):
        if annotation.startswith(name):
            return kind
    raise TypeError(f"setting {f.name} has an unsupported type {annotation}")
