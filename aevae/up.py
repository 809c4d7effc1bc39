"""`aevae up`: the main job. Trains when the repository is empty, then runs both services (and the UI),
says where they listen and how to call them, and stops everything cleanly on Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from aevae.errors import Terminated, UserError, require_port
from aevae.services.settings import PORTS, listeners_problem


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="train if needed, then serve the encoder, the decoder and the web UI",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models-dir", default=None, help="model repository (or AEVAE_MODELS_DIR; default ./models)")
    p.add_argument("--data-root", default=None,
                   help="folder holding MNIST/raw/, for training when the repository is empty (or AEVAE_DATA_ROOT)")
    p.add_argument("--host", default="127.0.0.1", help="address the services and the UI listen on")
    p.add_argument("--encoder-port", type=int, default=PORTS["encoder"])
    p.add_argument("--decoder-port", type=int, default=PORTS["decoder"])
    p.add_argument("--ui-port", type=int, default=PORTS["ui"])
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
    import shlex

    from aevae.repository import ModelRepository

    repository = ModelRepository(args.models_dir)
    _require("serve", ("torch", "grpc_health", "grpc_reflection", "tritonclient", "prometheus_client"))
    stack = Stack(repository.root, args.host, serve_args=shlex.split(args.serve_args), metrics=not args.no_metrics)
    stack.secure(tls=args.tls, insecure=args.insecure)
    try:
        if not repository.versions():
            _require("train", ("torch", "ray"))
            options = f"--train-args {args.train_args!r}" if args.train_args.strip() else "the defaults"
            print(f"aevae up: no models in {repository.root.resolve()}: training with {options} (going on from the "
                  f"last checkpoint of a run of the same options that was stopped)", flush=True)
            if stack.train(args.data_root, shlex.split(args.train_args)) != 0:
                raise UserError("training failed (see above); fix it and run `aevae up` again")
        stack.start_services(args.encoder_port, args.decoder_port)
        if not args.no_ui:
            stack.start_ui(args.ui_port)
        print(stack.summary(), flush=True)
        return stack.wait()
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    finally:
        stack.stop()


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
        process = subprocess.Popen(command)  # progress goes straight to the terminal
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
            self.services[kind] = service
            service.start()
        for service in self.services.values():
            service.wait_healthy()

    def start_ui(self, port: int, timeout: float = 60.0) -> None:
        command = [sys.executable, "-m", "aevae.cli", "ui", "--encoder", self.services["encoder"].address,
                   "--decoder", self.services["decoder"].address, "--host", self.host, "--port", str(port)]
        if self.metrics_ports:
            command += ["--metrics-port", str(self.metrics_ports["ui"])]
        command += self._security_args(ui=True)
        self.ui = ui = subprocess.Popen(command)
        host = _connectable(self.host)
        deadline = time.monotonic() + timeout
        while True:
            if ui.poll() is not None:
                raise RuntimeError(f"the web UI exited with code {ui.returncode} (see above)")
            try:
                socket.create_connection((host, port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the web UI did not listen on {host}:{port} within {timeout:.0f} s") from None
                time.sleep(0.2)
        self.ui_url = f"http://{host}:{port}/"
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
                f"http://{_connectable(self.host)}:{self.metrics_ports[n]}/metrics ({n})" for n in shown))
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
                    print(f"aevae up: {name} exited with code {code}; stopping the rest", file=sys.stderr, flush=True)
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


def _check_protection(args: argparse.Namespace) -> None:
    """UserError naming `aevae up`'s own flags for a --host beyond loopback without --tls or --insecure, before
    anything trains or starts. Found later, the service's refusal named `aevae serve`'s --tls-cert and
    --tls-key, which `aevae up` makes itself with --tls."""
    from aevae.client.credentials import is_loopback

    if not (args.tls or args.insecure or is_loopback(args.host)):
        raise UserError(f"--host {args.host} listens beyond this machine: pass --tls (aevae up makes a certificate; "
                        "the token is made either way), or --insecure when something else protects the traffic, "
                        "or listen on 127.0.0.1")


def _check_ports(args: argparse.Namespace) -> None:
    """UserError in one line, before anything trains or starts, for two listeners given one port or a port that
    cannot be had (--host not resolving or not this machine's, a port in use). Found later, the child's own
    error named `aevae serve`'s --port, and came after a training run of minutes."""
    ports = {"--encoder-port": (args.encoder_port, "encoder"), "--decoder-port": (args.decoder_port, "decoder")}
    if not args.no_ui:
        ports["--ui-port"] = (args.ui_port, "ui")
    problem = listeners_problem(args.host, ports)
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
    address = _connectable(host).strip("[]")
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _connectable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
