"""What the tests share: paths, running the real console script, tiny model versions written with the
repository's own writer (the fast tier's models: real files, real checksums, no Ray), and reading a service's
Prometheus metrics."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AEVAE = [sys.executable, "-m", "aevae.cli"]
SMALL_TRAINING = ["--train-limit", "2000", "--epochs", "1", "--batch-size", "128"]


def data_root() -> Path:
    import pytest

    value = os.environ.get("AEVAE_DATA_ROOT") or str(ROOT.parent / "shared" / "datasets")
    path = Path(value)
    if not (path / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found: set AEVAE_DATA_ROOT to a folder holding MNIST/raw/ (tried {path})")
    return path


def without_mnist_or_ray(monkeypatch: Any) -> None:
    """`aevae train` in process without MNIST's files or Ray: 300 random images as both splits, Ray neither
    started nor handed the arrays. The caller stands in for `job._fit`."""
    import pytest

    ray = pytest.importorskip("ray")
    from aevae import mnist
    from aevae.trainer import job

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    rng = np.random.default_rng(0)
    split = mnist.Split(rng.integers(0, 256, (300, 32, 32), dtype=np.uint8), rng.integers(0, 10, 300))
    monkeypatch.setattr(mnist, "load", lambda *args: mnist.Mnist(split, split, "fake", {}))
    monkeypatch.setattr(job, "_start_ray", lambda address: None)
    monkeypatch.setattr(ray, "put", lambda value: value)


def run_aevae(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Runs the real console script in a subprocess and returns what it printed."""
    return subprocess.run([*AEVAE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


def write_tiny(root: Path, name: str = "vae", kind: str = "vae", latent_dim: int = 4,
               image_shape: tuple[int, int] = (32, 32), hidden: tuple[int, ...] = (16,), seed: int = 0,
               **manifest_changes: Any) -> Any:
    """Writes one small random-weight version with the trainer's writer; returns the Version."""
    import torch

    from aevae.latent_stats import compute
    from aevae.manifest import Manifest, now
    from aevae.models import Architecture, build
    from aevae.repository import ModelRepository
    from aevae.trainer.job import write_version

    torch.manual_seed(seed)
    arch = Architecture(kind=kind, latent_dim=latent_dim, hidden=hidden, image_shape=image_shape)
    model = build(arch).eval()
    manifest = Manifest(kind=kind, latent_dim=latent_dim, image_shape=image_shape, architecture=arch.to_json(),
                        metrics={"test_bce": 100.0 + seed}, created=now(), **manifest_changes)
    rng = np.random.default_rng(seed)
    latents = rng.normal(size=(200, latent_dim)).astype(np.float32)
    stats = compute(latents, rng.integers(0, 10, 200), seed=seed)
    return write_version(ModelRepository(root), name, manifest, model, stats)


def write_tiny_set(root: Path) -> Path:
    """ae/1 and vae/1 (4-d latent, 32 x 32) and vae8/1 (8-d latent, 24 x 20): nothing may assume one shape."""
    write_tiny(root, "ae", "ae")
    write_tiny(root, "vae", "vae")
    write_tiny(root, "vae8", "vae", latent_dim=8, image_shape=(24, 20))
    return root


@contextlib.contextmanager
def running(repo: Path, args: Sequence[str] = (), kinds: Sequence[str] = ("encoder", "decoder")) -> Iterator[Any]:
    """Real `aevae serve` processes over `repo`, started together, healthy, stopped with SIGTERM at the end:
    {kind: ServiceProcess}."""
    from aevae.services.process import ServiceProcess

    started = {kind: ServiceProcess(kind, repo, args=list(args)).start() for kind in kinds}
    try:
        for service in started.values():
            service.wait_healthy()
        yield started
    finally:
        for service in started.values():
            service.stop()


URL = re.compile(r"metrics on (http://\S+/metrics)")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def metrics_url(output: list[str]) -> str:
    """The /metrics URL a service printed when it started (--metrics-port)."""
    for line in output:
        match = URL.search(line)
        if match:
            return match.group(1)
    raise AssertionError("no metrics URL printed:\n" + "".join(output))


def scrape(url: str) -> Samples:
    """Every sample of a Prometheus endpoint: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def oip_tensor(name: str, array: np.ndarray, datatype: str) -> Any:
    """A tritonclient InferInput holding `array` (tritonclient imported here: most tests need none of it)."""
    import tritonclient.grpc as triton

    value = triton.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def self_signed_certificate(folder: Path, name: str, start_days: float, end_days: float) -> tuple[Path, Path]:
    """A self-signed server certificate for localhost, valid from now + start_days to now + end_days."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + datetime.timedelta(days=start_days))
            .not_valid_after(now + datetime.timedelta(days=end_days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return folder / f"{name}.pem", folder / f"{name}.key"


def still_open(connections: list[Any], seconds: float) -> set[int]:
    """Reads and drops what the server sends each raw socket (its SETTINGS and pings, never answered) until the
    server closes them all or `seconds` pass; returns the indices of the ones still open."""
    import time

    open_ = set(range(len(connections)))
    for connection in connections:
        connection.setblocking(False)
    deadline = time.monotonic() + seconds
    while open_ and time.monotonic() < deadline:
        time.sleep(0.25)
        for i in list(open_):
            try:
                while connections[i].recv(65536):
                    pass
                open_.discard(i)  # b"": closed by the server
            except BlockingIOError:
                pass
            except OSError:
                open_.discard(i)
    return open_


# -- bare HTTP/2: what a gRPC client library never sends (a call half sent, header values as given) ---------
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # the client's connection preface; a SETTINGS frame follows
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0, 1, 3, 4, 7
END_STREAM, END_HEADERS = 1, 4


def hpack_length(n: int) -> bytes:
    """An HPACK string length (7-bit prefix, no Huffman)."""
    if n < 127:
        return bytes([n])
    out, n = [127], n - 127
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    return bytes([*out, n])


def h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def grpc_call_start(path: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
    """The preface, an empty SETTINGS and the HEADERS of a gRPC call to `path` on stream 1 (fields as literals
    without indexing: header values go as given, which grpc's own clients refuse when not printable ASCII)."""
    fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path.encode()), (b":authority", b"x"),
              (b"content-type", b"application/grpc"), (b"te", b"trailers"), *headers]
    block = b"".join(b"\x00" + hpack_length(len(k)) + k + hpack_length(len(v)) + v for k, v in fields)
    return H2_PREFACE + h2_frame(SETTINGS, 0, 0, b"") + h2_frame(HEADERS, END_HEADERS, 1, block)


def grpc_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def read_call_frames(conn: Any) -> list[tuple[int, int, int, bytes]]:
    """(kind, flags, stream, payload) of the frames the server sends until the call on stream 1 is over (its
    trailers, its RST_STREAM, or the connection's GOAWAY or end); acknowledges the server's SETTINGS."""
    frames, buffer = [], b""
    while chunk := conn.recv(65536):
        buffer += chunk
        while len(buffer) >= 9 and len(buffer) >= 9 + int.from_bytes(buffer[:3], "big"):
            size, kind, flags = int.from_bytes(buffer[:3], "big"), buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
            frames.append((kind, flags, stream, buffer[9:9 + size]))
            buffer = buffer[9 + size:]
            if kind == SETTINGS and not flags & 1:
                conn.sendall(h2_frame(SETTINGS, 1, 0, b""))
            if kind == GOAWAY and int.from_bytes(frames[-1][3][:4], "big") & 0x7FFFFFFF < 1:
                return frames  # GOAWAY before stream 1: never served (one naming 1 or above lets it finish)
            if stream == 1 and (kind == RST_STREAM or kind == HEADERS and flags & END_STREAM):
                return frames
    return frames


class UpProcess:
    """`aevae up` as a subprocess, its output collected line by line until it says it is ready.

    `session`: in a session of its own, so that what outlives it can be found (`running`, `left`). `config`:
    its own token folder (XDG_CONFIG_HOME). `stderr`: subprocess.PIPE keeps stderr apart and stops reading
    stdout once it is ready (a reader that goes away)."""

    def __init__(self, *args: str, session: bool = False, config: Path | None = None,
                 stderr: int = subprocess.STDOUT):
        import threading

        env = dict(os.environ) if config is None else {**os.environ, "XDG_CONFIG_HOME": str(config)}
        self.process = subprocess.Popen([sys.executable, "-m", "aevae.cli", "up", *args], stdout=subprocess.PIPE,
                                        stderr=stderr, text=True, cwd=ROOT, env=env, start_new_session=session)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Ctrl-C stops everything" in line:
                self.ready.set()
                if self.process.stderr is not None:  # the pipe test: it reads no further
                    return
        self.ready.set()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> str:
        """What it printed, once it says it is ready (and is still running)."""
        assert self.ready.wait(timeout), self.text
        assert self.process.poll() is None, self.text
        return self.text

    def addresses(self) -> dict[str, str]:
        """The encoder's and the decoder's addresses it printed."""
        found = {name: re.search(rf"{name}\s+grpc://(\S+)", self.text) for name in ("encoder", "decoder")}
        assert all(found.values()), self.text
        return {name: match.group(1) for name, match in found.items() if match}

    def wait_for(self, text: str, timeout: float) -> None:
        import time

        deadline = time.monotonic() + timeout
        while text not in self.text:
            assert self.process.poll() is None and time.monotonic() < deadline, self.text
            time.sleep(0.05)

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def running(self) -> list[str]:
        """The processes of its session still running (zombies hold nothing); started with `session`."""
        found = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-s", str(self.process.pid)], capture_output=True,
                               text=True).stdout.splitlines()
        return [line.strip() for line in found if line.split()[1][0] != "Z"]

    def pid_of(self, words: str) -> int:
        return next(int(line.split()[0]) for line in self.running() if words in line)

    def gone_within(self, seconds: float) -> list[str]:
        """What of its session still runs after up to `seconds`."""
        import time

        deadline = time.monotonic() + seconds
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.running()

    def left(self) -> list[str]:
        """The processes of its session still running, killed once listed."""
        import signal

        running = self.running()
        for line in running:
            try:
                os.kill(int(line.split()[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
        return running

    def cleanup(self) -> None:
        """Kills it and whatever of its session is left."""
        self.kill()
        self.left()
