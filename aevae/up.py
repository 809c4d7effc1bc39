"""`aevae up`: the main job. Trains when the repository is empty, then runs both services (and the UI),
says where they listen and how to call them, and stops everything cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from aevae.errors import Terminated, UserError, require_port
from aevae.help_format import DefaultsFormatter
from aevae.output import silence, write_text
from aevae.services.settings import PORTS, Listener, connectable, host_port, listeners_problem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="train if needed, then serve the encoder, the decoder and the web UI",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--data-root", default=None,
                   help="folder holding MNIST/raw/, for training when the repository is empty (or AEVAE_DATA_ROOT)")
    p.add_argument("--host", default="127.0.0.1", help="address the services and the UI listen on")
    for kind in ("encoder", "decoder", "ui"):
        what = "the web UI's HTTP" if kind == "ui" else f"the {kind}'s gRPC"
        p.add_argument(f"--{kind}-port", type=int, default=PORTS[kind], help=f"{what} port; 0 picks a free one")
    p.add_argument("--no-ui", action="store_true", help="serve the two gRPC services only")
    p.add_argument("--train-args", default="",
                   help="extra `aevae train` arguments for when the repository is empty, e.g. '--epochs 5'")
    p.add_argument("--serve-args", default="", help="extra `aevae serve` arguments for both services")
    p.add_argument("--no-metrics", action="store_true",
                   help="no Prometheus metrics (by default each service and the UI serve /metrics on a free port)")
    p.add_argument("--tls", action="store_true",
                   help="serve TLS with a self-signed certificate made now (its CA is printed for the clients)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without --tls (warns); the token is still required")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for flag in ("encoder_port", "decoder_port", "ui_port"):
        require_port("--" + flag.replace("_", "-"), getattr(args, flag))
    _check_protection(args)
    _check_ports(args)
    return _run(args)  # SIGTERM before it is ready: Terminated (aevae.cli), which stops what it started


def _run(args: argparse.Namespace) -> int:
    from aevae.repository import ModelRepository

    serve_args, train_args = _split("--serve-args", args.serve_args), _split("--train-args", args.train_args)
    repository = ModelRepository(args.models_dir)
    _require("serve", ("torch", "grpc_health", "grpc_reflection", "tritonclient", "prometheus_client"))
    scan = repository.scan()
    if not scan.versions:
        _require_empty(scan, repository.root)
    stack = Stack(repository.root, args.host, serve_args=serve_args, metrics=not args.no_metrics)
    stack.secure(tls=args.tls, insecure=args.insecure)
    output = _Output.install()  # `aevae up | tee up.log` and Ctrl-C: tee is gone first
    try:
        if not scan.versions:
            _require("train", ("torch", "ray"))
            options = f"--train-args {args.train_args!r}" if args.train_args.strip() else "the defaults"
            print(f"aevae up: no models in {repository.root.resolve()}: training with {options} (going on from the "
                  f"last checkpoint of a run of the same options that was stopped)", flush=True)
            if stack.train(args.data_root, train_args) != 0:
                raise UserError("training failed (see above); fix it and run `aevae up` again")
        stack.start_services(args.encoder_port, args.decoder_port)
        if not args.no_ui:
            stack.start_ui(args.ui_port)
        print(stack.summary(), flush=True)
        return stack.wait()
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    finally:
        try:
            stack.stop()
        finally:
            output.uninstall()


class Stack:
    """The processes `aevae up` runs, each a child, so that one stop ends them all."""

    def __init__(self, models_dir: Path, host: str, serve_args: list[str], metrics: bool = False):
        self.models_dir = models_dir
        self.host = host
        self.serve_args = serve_args
        # Prometheus endpoints: a free port each, chosen here so that the summary can name them
        self.metrics_ports = {name: _free_port(host) for name in ("encoder", "decoder", "ui")} if metrics else {}
        self.services: dict = {}
        self.ui: subprocess.Popen[bytes] | None = None
        self.ui_url = ""
        self._stop = threading.Event()
        self.token_file: Path | None = None
        self.certificates: dict[str, Path] = {}
        self.security: object = None  # the ChannelSecurity of the services, for the health checks
        self.insecure = False

    def secure(self, tls: bool, insecure: bool = False) -> None:
        """A token for the services and the UI (kept in aevae.client's local token file, created once, so that
        clients on this machine find it), and with `tls` a throwaway CA and certificate for the services."""
        from aevae.client.credentials import ChannelSecurity, local_token_path
        from aevae.services.security import make_certificates, new_token, write_secret

        self.token_file = local_token_path()
        if not self.token_file.is_file():
            write_secret(self.token_file, new_token() + "\n")
        if tls:
            hosts = ("localhost", "127.0.0.1", "::1", *([] if self.host in ("0.0.0.0", "::", "") else [self.host]),
                     socket.gethostname())
            try:
                self.certificates = make_certificates(self.token_file.parent / "tls", tuple(dict.fromkeys(hosts)))
            except ImportError:
                raise UserError("--tls needs the cryptography package: pip install cryptography") from None
        self.insecure = insecure
        self.security = ChannelSecurity.resolve(token_file=str(self.token_file), tls=tls,
                                                tls_ca=str(self.certificates["ca"]) if tls else None)

    def _security_args(self, ui: bool = False) -> list[str]:
        args = ["--token-file", str(self.token_file)] if self.token_file else []
        if self.certificates:
            args += (["--tls-ca", str(self.certificates["ca"])] if ui else
                     ["--tls-cert", str(self.certificates["cert"]), "--tls-key", str(self.certificates["key"])])
        return args + (["--insecure"] if self.insecure else [])

    def train(self, data_root: str | None, extra: list[str]) -> int:
        """`aevae train --resume`: a first `aevae up` stopped during its training (Ctrl-C, a closed terminal)
        goes on from its last epoch when run again, instead of training from the start."""
        command = [sys.executable, "-m", "aevae.cli", "train", "--resume", "--models-dir", str(self.models_dir),
                   *extra]
        if data_root:
            command += ["--data-root", data_root]
        process = subprocess.Popen(_dies_with_us(command))  # progress goes straight to the terminal
        try:
            return process.wait()
        except KeyboardInterrupt as exc:
            _end_training(process, signalled=not isinstance(exc, Terminated))
            raise

    def start_services(self, encoder_port: int, decoder_port: int) -> None:
        from aevae.services.process import ServiceProcess

        for kind, port in (("encoder", encoder_port), ("decoder", decoder_port)):
            metrics = ["--metrics-port", str(self.metrics_ports[kind])] if self.metrics_ports else []
            service = ServiceProcess(kind, self.models_dir, self.host, port,
                                     [*self.serve_args, *metrics, *self._security_args()], echo=f"[{kind}]",
                                     security=self.security)
            service.command = _dies_with_us(service.command, interrupts=False)
            self.services[kind] = service
            service.start()
        for service in self.services.values():
            _await_healthy(service)

    def start_ui(self, port: int, timeout: float = 60.0) -> None:
        # 0: a free port chosen here, as for the metrics, to wait on and print (this waited on port 0 for
        # `timeout` seconds, then failed, with the UI up on the port it had picked)
        port = port or _free_port(self.host)
        command = [sys.executable, "-m", "aevae.cli", "ui", "--encoder", self.services["encoder"].address,
                   "--decoder", self.services["decoder"].address, "--host", self.host, "--port", str(port)]
        if self.metrics_ports:
            command += ["--metrics-port", str(self.metrics_ports["ui"])]
        command += self._security_args(ui=True)
        self.ui = ui = subprocess.Popen(_dies_with_us(command, interrupts=False))
        host = connectable(self.host)
        deadline = time.monotonic() + timeout
        while True:
            if ui.poll() is not None:
                raise RuntimeError(f"the web UI {_ended(ui.returncode)} (see above)")
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the web UI did not listen on {host}:{port} within {timeout:.0f} s") from None
                time.sleep(0.2)
        self.ui_url = f"http://{host_port(host, port)}/"
        if self.host not in ("127.0.0.1", "localhost", "::1") and self.token_file:  # the UI asks for a login
            self.ui_url += f"?token={self.token_file.read_text().split()[0]}"

    def summary(self) -> str:
        enc, dec = self.services["encoder"].address, self.services["decoder"].address
        lines = [
            "",
            "aevae is up:",
            f"  encoder  grpc://{enc}   (aevae.v1.Encoder; health and reflection on)",
            f"  decoder  grpc://{dec}   (aevae.v1.Decoder; health and reflection on)",
        ]
        if self.ui_url:
            lines.append(f"  web UI   {self.ui_url}")
        shown = [n for n in ("encoder", "decoder", "ui") if n in self.metrics_ports and (n != "ui" or self.ui_url)]
        if shown:
            lines.append("  metrics  " + "  ".join(
                f"http://{host_port(connectable(self.host), self.metrics_ports[n])}/metrics ({n})" for n in shown))
        tls = "-cacert " + str(self.certificates["ca"]) if self.certificates else "-plaintext"
        oip_tls = f", ssl=True, root_certificates=\"{self.certificates['ca']}\"" if self.certificates else ""
        auth = f"-H \"authorization: Bearer $(cat {self.token_file})\" " if self.token_file else ""
        lines += [
            f"  OIP v2   tritonclient.grpc.InferenceServerClient(\"{enc}\"{oip_tls}) (or \"{dec}\"): models by "
            "name" + (", each call with headers={\"authorization\": \"Bearer \" + <the token below>}"
                      if self.token_file else ""),
            f"  token    {self.token_file} (every call but health and reflection sends it; clients on this "
            "machine find it there)" if self.token_file else "  token    none",
        ]
        if self.certificates:
            lines.append(f"  TLS      self-signed: clients trust {self.certificates['ca']} (export AEVAE_TLS_CA=...)")
        lines += [
            "",
            "Call them:",
            f"  grpcurl {tls} {enc} list",
            f"  grpcurl {tls} {auth}-d '{{\"model\": \"vae\"}}' {enc} aevae.v1.Encoder/GetLatentStats",
        ]
        if self.token_file:
            exports = f"AEVAE_TOKEN_FILE={self.token_file}"
            if self.certificates:
                exports += f" AEVAE_TLS_CA={self.certificates['ca']}"
            lines.append(f"  export {exports}   # elsewhere than on this machine's loopback, or with TLS")
        lines += [
            f"  aevae decode 0.5,-1.0,0.3,1.2 -o digit.png --decoder {dec}",
            "  python -c 'from aevae.client import DecoderClient; import numpy as np;",
            f"             print(DecoderClient(\"{dec}\").decode(np.zeros((1, 4)), model=\"vae\").shape)'",
            "",
            "Ctrl-C stops everything.",
        ]
        return "\n".join(lines)

    def wait(self) -> int:
        """Until Ctrl-C or SIGTERM (exit 0) or until a child dies (exit 1)."""
        previous = signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        try:
            while not self._stop.wait(0.5):
                for name, code in self._exited():
                    print(f"aevae up: the {name} {_ended(code)}; stopping the rest", file=sys.stderr, flush=True)
                    return 1
            return 0
        except KeyboardInterrupt:
            return 0
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _exited(self) -> list[tuple[str, int]]:
        gone = [(kind, s.poll()) for kind, s in self.services.items() if s.poll() is not None]
        if self.ui is not None and self.ui.poll() is not None:
            gone.append(("web UI", self.ui.returncode))
        return gone

    def stop(self) -> None:
        """SIGTERM to every child at once (they drain in parallel), then wait for each. A second Ctrl-C or
        SIGTERM meanwhile kills them instead of interrupting the wait, which left them running."""
        with _hurried(self._kill):
            self._stop_children()

    def _kill(self) -> None:
        for process in [self.ui, *(s.process for s in self.services.values())]:
            if process is not None and process.poll() is None:
                process.kill()

    def _stop_children(self) -> None:
        if self.ui is not None and self.ui.poll() is None:
            self.ui.terminate()
        for service in self.services.values():
            service.signal(signal.SIGTERM)
        if self.ui is not None:
            try:
                self.ui.wait(15)
            except subprocess.TimeoutExpired:
                self.ui.kill()
        for service in self.services.values():
            service.stop()
        if self.services or self.ui is not None:
            print("aevae up: stopped", flush=True)


@contextlib.contextmanager
def _hurried(kill: Callable[[], None]) -> Iterator[None]:
    """While children are being stopped and waited for: Ctrl-C or SIGTERM call `kill` rather than raise."""
    previous = {sig: signal.signal(sig, lambda *_: kill()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _end_training(process: subprocess.Popen[bytes], signalled: bool) -> None:
    """Stops the trainer when `aevae up` is interrupted during training, and waits for it. A Ctrl-C at the
    terminal reached it as well (`signalled`: it gets a moment to stop on its own); SIGTERM, or a SIGINT sent to
    `aevae up` alone, did not, so it gets SIGTERM (which it handles as a Ctrl-C, and says which), then
    SIGTERM again, then SIGKILL.
    Without this it trained on, and wrote versions, after `aevae up` was gone."""
    with _hurried(process.kill):
        for sig, wait in ((None if signalled else signal.SIGTERM, 10.0), (signal.SIGTERM, 30.0), (signal.SIGKILL, None)):
            if process.poll() is not None:
                return
            if sig is not None:
                process.send_signal(sig)
            try:
                process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


# Run by each child of `aevae up` before it becomes the command it runs (os.execv keeps the setting): the kernel
# sends it SIGTERM when `aevae up` ends, SIGKILL included, which no handler of ours sees. Without it a killed
# `aevae up` left the services and the UI serving on, holding their ports (and a trainer training on). The
# kernel may send it more than once (again as each of our threads still exiting ends): a service's stop is the
# same stop again. A Ctrl-C that finds the launcher ends it without a traceback, or is ignored from then on
# (execv keeps an ignored signal ignored, and Python then leaves SIGINT alone) when `aevae up` stops the child.
_DIE_WITH_PARENT = """\
import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN if sys.argv[2] == "ignore" else signal.SIG_DFL)
import ctypes, os
ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(128 + signal.SIGTERM)  # aevae up ended before that was set
os.execv(sys.argv[3], sys.argv[3:])
"""


def _split(flag: str, value: str) -> list[str]:
    """Extra arguments as a shell would split them; UserError for a quote left open (was a traceback)."""
    try:
        return shlex.split(value)
    except ValueError as exc:
        raise UserError(f"{flag} {value!r}: {exc} (it is split as a shell splits words)") from None


def _dies_with_us(command: list[str], interrupts: bool = True) -> list[str]:
    """`command` run so that it gets SIGTERM when this process ends (Linux; elsewhere `command` as it is). To be
    started from the main thread: the kernel sends it when the thread that started the child ends. A launcher
    rather than Popen's preexec_fn, which is unsafe with threads (the echo threads run).

    `interrupts=False`: the terminal's Ctrl-C, which reaches the whole process group, is ignored until the
    command sets its own handler, and `aevae up` stops it with SIGTERM: one that came while the child was still
    importing printed its KeyboardInterrupt traceback under `aevae up`'s own stop."""
    if not sys.platform.startswith("linux"):
        return command
    # -I -S: the launcher needs the standard library only, and starts in 15 ms instead of 25
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid()),
            "keep" if interrupts else "ignore", *command]


def _await_healthy(service: Any) -> None:
    """wait_healthy, its failure in one line: its RuntimeError repeated the child's whole output, which the echo
    had shown already, and did not say that the child had exited."""
    try:
        service.wait_healthy()
    except RuntimeError:
        code = service.poll()
        what = _ended(code) if code is not None else "did not become healthy"
        raise RuntimeError(f"the {service.kind} at {service.address} {what} (its output is above)") from None


def _ended(code: int) -> str:
    """How a child ended: "exited with code 1", "was killed by SIGKILL" (Popen's -9)."""
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _require_empty(scan: Any, root: Path) -> None:
    """UserError, before anything trains, for a repository with nothing to serve that is not empty either: a
    file, a folder that cannot be read, only broken versions. Taken for empty, it was said to hold "no models",
    and a training started: one that failed in the trainer, or trained for minutes beside the broken versions,
    their reason never shown."""
    unreadable = any(path == root or path.parent == root for path, _ in scan.ignored)
    if unreadable or scan.broken or _is_file(root):
        raise UserError(f"{scan.describe(root)}; aevae up trains only into an empty or new folder: fix that, or "
                        "pass another --models-dir")


def _is_file(path: Path) -> bool:
    try:
        return path.exists() and not path.is_dir()
    except OSError:
        return False


class _Output:
    """sys.stdout while `aevae up` runs, for it and for the children's echo threads: once whatever reads it has
    gone (`aevae up | tee up.log` and Ctrl-C, which ends tee too), what is written goes to /dev/null. Each write
    raised BrokenPipeError: a traceback from every echo thread and one from "aevae up: stopped", exit 1. Any
    other write error is taken the same way (a full disk: ENOSPC, a terminal hung up: EIO): it killed the echo
    thread, and `aevae up` then waited for a start line that thread would never pass on. An unencodable
    character is written escaped."""

    def __init__(self, stream: Any):
        self._stream = stream

    @classmethod
    def install(cls) -> "_Output":
        output = cls(sys.stdout)
        sys.stdout = output
        return output

    def uninstall(self) -> None:
        if sys.stdout is self:
            sys.stdout = self._stream

    def write(self, text: str) -> int:
        try:
            write_text(self._stream, text)
        except OSError:
            silence(self._stream)
        return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            silence(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _check_protection(args: argparse.Namespace) -> None:
    """UserError naming `aevae up`'s own flags for a --host beyond loopback without --tls or --insecure, before
    anything trains or starts. Found later, the service's refusal named `aevae serve`'s --tls-cert and
    --tls-key, which `aevae up` makes itself with --tls."""
    from aevae.client.credentials import is_loopback

    if not args.host.strip():
        raise UserError("--host is empty; pass the address to listen on, e.g. 127.0.0.1 (this machine only) or "
                        "0.0.0.0 (every interface, with --tls)")
    if not (args.tls or args.insecure or is_loopback(args.host)):
        raise UserError(f"--host {args.host} listens beyond this machine: pass --tls (aevae up makes a certificate; "
                        "the token is made either way), or --insecure when something else protects the traffic, "
                        "or listen on 127.0.0.1")


def _check_ports(args: argparse.Namespace) -> None:
    """UserError in one line, before anything trains or starts, for two listeners given one port or a port that
    cannot be had (--host not resolving or not this machine's, a port in use). Found later, the child's own
    error named `aevae serve`'s --port, and came after a training run of minutes."""
    listeners = [Listener("--encoder-port", args.encoder_port, "encoder", args.host),
                 Listener("--decoder-port", args.decoder_port, "decoder", args.host)]
    if not args.no_ui:
        listeners.append(Listener("--ui-port", args.ui_port, "ui", args.host))
    problem = listeners_problem(listeners)
    if problem:
        raise UserError(problem)


def _require(extra: str, modules: tuple[str, ...]) -> None:
    """UserError naming the extra to install when one of its modules is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"aevae up needs the {extra} extra ({', '.join(missing)} missing): "
                        f"pip install 'aevae[{extra}]'")


def _free_port(host: str) -> int:
    address = connectable(host).strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])
