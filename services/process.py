"""A service as a child process: started, awaited until it listens and is healthy, stopped with SIGTERM.

`aevae up`, the tests and the benchmarks start services this way, so they run exactly what
`aevae serve` runs. Needs only the client's dependencies (no torch in the parent).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

ADDRESS = re.compile(r"serving \S+ on (\S+):(\d+)")


class ServiceProcess:
    def __init__(self, kind: str, models_dir: str | Path | None, host: str = "127.0.0.1", port: int = 0,
                 args: Sequence[str] = (), echo: str | None = None, env: dict[str, str] | None = None,
                 security: Any = None):
        """`echo`: prefix under which the child's output is copied to ours (None: kept quiet). `security`: the
        aevae.client ChannelSecurity (TLS, token) that `wait_healthy` connects with, for a service started
        with --tls-cert or --token-file in `args` (default: from the environment, as any client)."""
        self.security = security
        self.kind = kind
        command = [sys.executable, "-m", "aevae.cli", "serve", kind, "--host", host, "--port", str(port), *args]
        if models_dir is not None:
            command += ["--models-dir", str(models_dir)]
        self.command = command
        self.echo = echo
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[str] | None = None
        self.address = ""
        self.output: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader: threading.Thread | None = None

    def start(self, timeout: float = 60.0) -> "ServiceProcess":
        """Returns once the service listens; RuntimeError with its output when it exits or takes too long."""
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env=self.env, bufsize=1)
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self.address:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(self._failure(f"did not start within {timeout:.0f} s"))
            if line is None:
                code = self.process.wait()
                raise RuntimeError(self._failure(f"exited with code {code}"))
            match = ADDRESS.search(line)
            if match:
                host = "127.0.0.1" if match.group(1) in ("0.0.0.0", "::", "[::]") else match.group(1)
                self.address = f"{host}:{match.group(2)}"
        return self

    def _failure(self, what: str) -> str:
        """Why the service did not start. Its output with it, unless `echo` showed that as it came: then its
        own error line is enough (`aevae up` repeated the whole output, gRPC's log lines included, under its
        error)."""
        if self.echo is None:
            return f"{self.kind} {what}:\n" + "".join(self.output)
        errors = [line.split(" error: ", 1)[1].strip() for line in self.output if " error: " in line]
        return f"the {self.kind} {what}" + (f": {errors[-1]}" if errors else " (its output is above)")

    def _pump(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            if self.echo is not None:
                print(f"{self.echo} {line}", end="", flush=True)
            self._lines.put(line)
        self._lines.put(None)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        from aevae.client import AevaeError, DecoderClient, EncoderClient

        client_class = EncoderClient if self.kind == "encoder" else DecoderClient
        deadline = time.monotonic() + timeout
        with client_class(self.address, timeout=2.0, retries=0, security=self.security) as client:
            while True:
                try:
                    if client.health() == "SERVING":
                        return
                except AevaeError:
                    pass
                if self.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.kind} at {self.address} did not become healthy:\n"
                                       + "".join(self.output))
                time.sleep(0.1)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def signal(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout` seconds; returns the exit code, once `output` holds all the
        process printed (the reader thread may lag behind the exit: checks of the output made right after
        stop, such as "no Traceback", missed its last lines)."""
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self._reader is not None:
            self._reader.join(10.0)  # bounded: a process that handed its stdout on would never close it
        return code

    def __enter__(self) -> "ServiceProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
