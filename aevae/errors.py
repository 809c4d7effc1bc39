"""The typed errors of aevae, transport-independent.

`UserError` is what the CLI prints without a traceback. The `ServiceError` family is what the model store and
the service logic raise; each is named after the gRPC status code it maps to, so the gRPC servicers map
`code` onto grpc.StatusCode in one place, and a Ray Serve deployment or an HTTP front end can map it onto
its own statuses.
"""

import math
import signal
import threading


class UserError(Exception):
    """An error caused by the input or the environment; the message says what was wrong and what is accepted."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what `kill`, a container stop and a scheduler send), raised like Ctrl-C's KeyboardInterrupt, so a
    command stops as it does on Ctrl-C: it stops what it started and says what is kept (a batch job, its shards
    on disk). With the default action the process died at once and its children ran on without it; under Ray,
    whose ray.init installs sys.exit as the handler, the exit skipped every `except KeyboardInterrupt` and Ray
    printed its workers' stacks."""


class HungUp(Terminated):
    """SIGHUP (the terminal a command ran in closed, an ssh session dropped): stopped as on SIGTERM, exit 129.
    With the default action the process died at once: a batch job without its "interrupted" line and with
    Ray's agents left running for a minute, a service without its drain."""


# The stop signal this command received (SIGTERM or SIGHUP), once one came: a library that catches the
# KeyboardInterrupt raised for it and raises a plain one of its own (Ray Train while it starts) must not turn a
# SIGTERM into "stopped by Ctrl-C" and exit 130. Cleared by raise_on_sigterm, at each command's start.
_received: list[int] = []


def stop_signal(exc: BaseException) -> int:
    """The signal that stopped the command with `exc`: SIGHUP, SIGTERM (as raised, or as received before a
    library raised its own KeyboardInterrupt in its place), else SIGINT (Ctrl-C)."""
    if isinstance(exc, HungUp):
        return signal.SIGHUP
    if isinstance(exc, Terminated):
        return signal.SIGTERM
    return _received[0] if _received else signal.SIGINT


def _raise_hung_up(signum: int, frame: object) -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # once, as SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append(signal.SIGHUP)
    raise HungUp()


def stops_on_hangup() -> bool:
    """Whether SIGHUP should stop this process the graceful way: not when it started with SIGHUP ignored (under
    `nohup`, or a supervisor's choice), which must stay so."""
    return signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN


def _raise_terminated(signum: int, frame: object) -> None:
    # Once: what the first SIGTERM started (stopping workers, shutting Ray down, removing temporaries) is not
    # cut short by another. Another came from impatient operators, and from the kernel, which may deliver
    # `aevae up`'s parent-death signal twice: a second Terminated inside ray.shutdown left Ray's agents running.
    # SIGKILL still ends the process at once.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _received.append(signal.SIGTERM)
    raise Terminated()


def raise_on_sigterm() -> None:
    """Makes SIGTERM raise Terminated (and SIGHUP HungUp, unless it is ignored) in the main thread; called at start and again after ray.init, which
    replaces the handler. From another thread it does nothing (Python sets handlers in the main thread only)."""
    if threading.current_thread() is threading.main_thread():
        _received.clear()
        signal.signal(signal.SIGTERM, _raise_terminated)
        if stops_on_hangup():
            signal.signal(signal.SIGHUP, _raise_hung_up)


def require_positive(flag: str, value: float | None) -> None:
    """A numeric flag's check: positive and finite. argparse's float() accepts "nan" and "inf", and nan passes
    `value <= 0`; left through, they fail late and obscurely (a learning rate of nan trains to nothing, a
    timeout of nan reads as an expired deadline)."""
    if value is not None and not (value > 0 and math.isfinite(value)):
        raise UserError(f"{flag} must be positive and finite, got {value}")


def port_problem(flag: str, value: int | None) -> str | None:
    """What is wrong with a port flag, or None: 0..65535, 0 for a free port. A message rather than an exception,
    for callers that raise UserError (the CLIs) and ValueError (ServiceSettings, also read from files)."""
    if value is not None and not 0 <= value <= 65535:
        return f"{flag} must be 0..65535 (0 picks a free port), got {value}"
    return None


def require_port(flag: str, value: int | None) -> None:
    problem = port_problem(flag, value)
    if problem:
        raise UserError(problem)


def cpus_problem(workers_flag: str, workers: float, cpus_per_worker: float, cluster_cpus: float) -> str | None:
    """Why `workers` Ray workers of `cpus_per_worker` CPUs each cannot all start on a cluster of `cluster_cpus`
    (None: they can). Ray waits for resources without a word, so such a job would hang; the callers refuse it
    on a local cluster, which cannot grow, and say that they wait on a named one, which may."""
    needed = workers * cpus_per_worker
    if needed <= cluster_cpus:
        return None
    return (f"{workers_flag} {workers:g} x --cpus-per-worker {cpus_per_worker:g} needs {needed:g} CPUs, and the Ray "
            f"cluster has {cluster_cpus:g}")


def check_cpus(workers_flag: str, workers: float, cpus_per_worker: float, cluster_cpus: float,
               address: str | None) -> None:
    """`cpus_problem` acted on: UserError without `address` (the local cluster has what it has), a line saying
    it waits with one (an autoscaler may add nodes)."""
    problem = cpus_problem(workers_flag, workers, cpus_per_worker, cluster_cpus)
    if problem and not address:
        raise UserError(f"{problem} (this machine's CPUs): lower {workers_flag} or --cpus-per-worker, or pass "
                        "--address of a bigger cluster")
    if problem:
        print(f"{problem} now: waiting for it to grow (an autoscaler adds nodes; Ctrl-C stops)", flush=True)


class ServiceError(Exception):
    code = "INTERNAL"


class InvalidArgument(ServiceError):
    code = "INVALID_ARGUMENT"


class NotFound(ServiceError, LookupError):
    code = "NOT_FOUND"


class ResourceExhausted(ServiceError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(ServiceError):
    code = "FAILED_PRECONDITION"


class Unavailable(ServiceError):
    code = "UNAVAILABLE"


class DeadlineExceeded(ServiceError):
    """The call's time ran out on the server's side (a stream left idle past `--stream-idle-s`)."""
    code = "DEADLINE_EXCEEDED"


class Aborted(ServiceError):
    """The call cannot go on as it began (a stream's version changed on disk under it): retry it anew."""
    code = "ABORTED"


def shorten(text: object, limit: int = 80) -> str:
    """A caller's string as it may be echoed into an error: repr'd and cut to `limit` characters."""
    value = repr(text)
    return value if len(value) <= limit else f"{value[:limit - 15]}...' ({len(str(text))} chars)"
