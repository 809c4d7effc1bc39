"""aevae's decoder beside its peers, one run, servers alternated: one table with ratios. Run by hand.

    .venv/bin/python benchmarks/bench_peers.py [--models-dir DIR] [--skip mlserver,ray-serve]

Servers, all on loopback, all holding the same decoder (the default architecture):
- echo: a bare grpc.aio server returning a 16-byte request (benchmarks/echo_server.py): the Python gRPC floor;
- aevae.v1: `aevae serve decoder` (DecodeRequest/DecodeResponse, float32 images);
- aevae OIP: the same process, through its Open Inference Protocol endpoint (tritonclient.grpc);
- Ray Serve: the same servicers behind Serve's gRPC proxy (services/serve_app.py, deploy/serve/config.yaml);
- MLServer 1.7, adaptive batching on and off: a custom runtime running the version's decoder.onnx with ONNX
  Runtime, spoken to over OIP gRPC. MLServer lives in its own virtualenv, made here on the first run
  (/tmp/aevae-mlserver-venv), never in the project's dependencies; `"parallel_workers": 0` (its worker
  processes crash with the installed uvloop).
Measured per server in blocks, the servers taking turns, each with the machine to itself (the others are
frozen with SIGSTOP, their child processes too, and thawed for their turn: idle peers are not idle, Ray's
raylet, GCS and Serve controller take about a tenth of a core between calls): sequential one-latent p50 and p99; one-latent calls/s
with 16 and 64 in flight (asyncio clients); images/s of 4,096-latent calls; and for aevae.v1, a 1M-latent
stream against the in-process rate of the same model, once the peers have stopped (their idle processes would
take CPU from both), the two alternating over the rounds. Prints the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import numpy as np

from common import ROOT, repository, timed  # this folder

MLSERVER_VENV = Path(tempfile.gettempdir()) / "aevae-mlserver-venv"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])




def wait_port(port: int, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout:.0f} s")


# -- the servers ---------------------------------------------------------------------------------------
RAY_SERVE_CHILD = """
import sys, time, yaml, ray
from ray import serve
from ray.serve.config import gRPCOptions
from aevae.services import serve_app
port, http, models, config = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
config = yaml.safe_load(open(config))
(app,) = [a for a in config["applications"] if a["name"] == "decoder"]
ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
serve.start(http_options={"host": "127.0.0.1", "port": http},
            grpc_options=gRPCOptions(**{**config["grpc_options"], "port": port}))
serve.run(serve_app.decoder({**app["args"], "models_dir": models}), name="decoder", route_prefix="/decoder")
print("ready", flush=True)
while True:
    time.sleep(60)
"""

MLSERVER_RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Decoder(MLModel):
    """aevae's decoder.onnx: latents [N, d] FP32 -> images [N, H, W] FP32."""

    async def load(self) -> bool:
        self.session = ort.InferenceSession(self.settings.parameters.uri, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        latents = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        images = self.session.run(None, {"latents": latents})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("images", images)])
'''


def start_mlserver(decoder_onnx: Path) -> tuple[subprocess.Popen, int]:
    if not (MLSERVER_VENV / "bin" / "mlserver").exists():
        print(f"making MLServer's virtualenv in {MLSERVER_VENV} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run([str(MLSERVER_VENV / "bin" / "pip"), "install", "-q", "mlserver==1.7.*", "onnxruntime"],
                       check=True)
    folder = Path(tempfile.mkdtemp(prefix="aevae-mlserver-"))
    (folder / "aevae_mlserver_runtime.py").write_text(MLSERVER_RUNTIME)
    grpc_port = free_port()
    (folder / "settings.json").write_text(json.dumps({
        "parallel_workers": 0, "grpc_port": grpc_port, "http_port": free_port(), "metrics_port": free_port(),
        "debug": False}))
    for name, batching in (("decoder-batched", {"max_batch_size": 32, "max_batch_time": 0.002}),
                           ("decoder", {})):
        (folder / name).mkdir()
        (folder / name / "model-settings.json").write_text(json.dumps({
            "name": name, "implementation": "aevae_mlserver_runtime.Decoder",
            "parameters": {"uri": str(decoder_onnx)}, **batching}))
    process = subprocess.Popen([str(MLSERVER_VENV / "bin" / "mlserver"), "start", str(folder)], cwd=folder,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(folder)})
    wait_port(grpc_port, process, "MLServer")
    return process, grpc_port


# -- the clients -----------------------------------------------------------------------------------------
def fresh(cache: dict[str, Any]) -> bool:
    """True (and the cache emptied) when the cached asyncio channels belong to another event loop."""
    loop = asyncio.get_running_loop()
    if cache.get("loop") is loop:
        return False
    cache.clear()
    cache["loop"] = loop
    return True


class Target:
    """One server as the benchmark sees it: a blocking call, an async call, and a call of N latents."""

    def __init__(self, name: str, sync_call: Callable[[], Any], async_call: Callable[[], Awaitable[Any]] | None,
                 big_call: Callable[[], Any] | None):
        self.name, self.sync_call, self.async_call, self.big_call = name, sync_call, async_call, big_call
        self.results: dict[str, float] = {}  # the best of the rounds
        self.rounds: list[dict[str, float]] = []  # each round's figures
        self.pid: int | None = None  # the server's process, frozen while other servers take their turn


def take_turn(targets: list[Target], current: Target) -> None:
    """Thaws the current target's server and freezes every other one, with all processes under it."""
    for pid in {t.pid for t in targets if t.pid is not None and t.pid != current.pid}:
        _signal_tree(pid, signal.SIGSTOP)
    if current.pid is not None:
        _signal_tree(current.pid, signal.SIGCONT)
        time.sleep(0.2)  # let its timers that fell due while frozen run before the clock starts


def _signal_tree(pid: int, sig: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for process in tree:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


def aevae_targets(address: str, latent_dim: int, big: int, prebuilt: bool = True) -> list[Target]:
    """aevae.v1 and aevae's OIP endpoint. `prebuilt`: aevae.v1's one-latent calls send one request message
    made once, as the echo floor's client sends one payload (a load generator's way, and the server's cost
    is what is compared); False makes the request anew for every call (numpy to tensor to message), as an
    application would, for what that costs the client (bench_latency_floor prints both)."""
    import grpc
    import tritonclient.grpc as tc
    import tritonclient.grpc.aio as tca

    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    one = np.zeros((1, latent_dim), np.float32)
    many = np.random.default_rng(0).normal(size=(big, latent_dim)).astype(np.float32)
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    sync = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(address, options=options))
    aio: dict[str, Any] = {}
    made = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(one))

    def request() -> Any:
        return made if prebuilt else decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(one))

    async def v1_async() -> Any:
        if fresh(aio):
            aio["v1"] = decoder_pb2_grpc.DecoderStub(grpc.aio.insecure_channel(address, options=options))
        return await aio["v1"].Decode(request())

    v1 = Target("aevae.v1" if prebuilt else "aevae.v1, request made per call", lambda: sync.Decode(request()),
                v1_async, lambda: sync.Decode(decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(many))))
    return [v1, *oip_targets("aevae OIP", address, "vae", latent_dim, big, tc, tca)]


def oip_targets(name: str, address: str, model: str, latent_dim: int, big: int, tc: Any, tca: Any) -> list[Target]:
    client = tc.InferenceServerClient(address)
    aio: dict[str, Any] = {}

    def inputs(n: int, module: Any) -> list[Any]:
        tensor = module.InferInput("latents", [n, latent_dim], "FP32")
        tensor.set_data_from_numpy(np.zeros((n, latent_dim), np.float32))
        return [tensor]

    one, many = inputs(1, tc), inputs(big, tc)

    async def call_async() -> Any:
        if fresh(aio):
            aio["client"] = tca.InferenceServerClient(address)
            aio["inputs"] = inputs(1, tca)
        return await aio["client"].infer(model, aio["inputs"])

    return [Target(name, lambda: client.infer(model, one), call_async, lambda: client.infer(model, many))]


def ray_serve_target(port: int, latent_dim: int, big: int) -> Target:
    import grpc

    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    metadata = (("application", "decoder"),)
    one = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(np.zeros((1, latent_dim), np.float32)))
    many = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(
        np.random.default_rng(0).normal(size=(big, latent_dim)).astype(np.float32)))
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    sync = decoder_pb2_grpc.DecoderStub(grpc.insecure_channel(f"127.0.0.1:{port}", options=options))
    aio: dict[str, Any] = {}

    async def call_async() -> Any:
        if fresh(aio):
            aio["stub"] = decoder_pb2_grpc.DecoderStub(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options))
        return await aio["stub"].Decode(one, metadata=metadata)

    return Target("Ray Serve", lambda: sync.Decode(one, metadata=metadata, timeout=60), call_async,
                  lambda: sync.Decode(many, metadata=metadata, timeout=120))


def echo_target(address: str) -> Target:
    import grpc

    sync = grpc.insecure_channel(address).unary_unary("/echo.Echo/Unary")
    aio: dict[str, Any] = {}
    payload = b"x" * 16

    async def call_async() -> Any:
        if fresh(aio):
            aio["call"] = grpc.aio.insecure_channel(address).unary_unary("/echo.Echo/Unary")
        return await aio["call"](payload)

    return Target("echo floor", lambda: sync(payload), call_async, None)


def _stop(children: list[subprocess.Popen]) -> None:
    for child in children:
        if child.poll() is None:
            _signal_tree(child.pid, signal.SIGCONT)  # a frozen process would not act on SIGTERM
            child.terminate()
            try:
                child.wait(20)
            except subprocess.TimeoutExpired:
                child.kill()


# -- the measurements ----------------------------------------------------------------------------------------
def latency(call: Callable[[], Any], n: int) -> tuple[float, float]:
    for _ in range(min(200, n)):
        call()
    times = timed(call, n)
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


async def in_flight(call: Callable[[], Awaitable[Any]], concurrency: int, seconds: float) -> float:
    await asyncio.gather(*[call() for _ in range(concurrency)])  # connect and warm up
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


def rate(call: Callable[[], Any], items: int, seconds: float) -> float:
    call()
    reps, start = 0, time.perf_counter()
    while reps < 2 or time.perf_counter() - start < seconds:
        call()
        reps += 1
    return items * reps / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per latency block")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds per throughput block")
    parser.add_argument("--rounds", type=int, default=3, help="times each server takes its turn")
    parser.add_argument("--big", type=int, default=4096, help="latents per big call")
    parser.add_argument("--stream", type=int, default=1_000_000, help="latents in the streamed decode")
    parser.add_argument("--skip", default="", help="comma-separated: mlserver, ray-serve")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from aevae.client import DecoderClient
    from aevae.services.process import ServiceProcess
    from aevae.store import ModelStore

    models = repository(args.models_dir, "aevae-peers-")
    model = ModelStore(models).get("vae")
    d = model.latent_dim
    print(f"model {model.name}/{model.number} on {model.runtime.name}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    children: list[subprocess.Popen] = []
    targets: list[Target] = []
    decoder: ServiceProcess | None = None
    try:
        echo = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "echo_server.py"), "0"],
                                stdout=subprocess.PIPE, text=True)
        children.append(echo)
        echo_address = re.search(r"on (\S+)", echo.stdout.readline()).group(1)  # type: ignore[union-attr]
        decoder = ServiceProcess("decoder", models).start()
        decoder.wait_healthy()
        targets = [echo_target(echo_address), *aevae_targets(decoder.address, d, args.big)]
        targets[0].pid = echo.pid
        for target in targets[1:]:
            target.pid = decoder.process.pid
        if "ray-serve" not in skip:
            port = free_port()
            ray = subprocess.Popen([sys.executable, "-c", RAY_SERVE_CHILD, str(port), str(free_port()), str(models),
                                    str(ROOT / "deploy" / "serve" / "config.yaml")], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
            children.append(ray)
            if ray.stdout is not None and "ready" in ray.stdout.readline():
                targets.append(ray_serve_target(port, d, args.big))
                targets[-1].pid = ray.pid
        if "mlserver" not in skip:
            import tritonclient.grpc as tc
            import tritonclient.grpc.aio as tca

            process, port = start_mlserver(model.version.file("decoder.onnx"))  # type: ignore[union-attr]
            children.append(process)
            mlserver = [*oip_targets("MLServer, batching", f"127.0.0.1:{port}", "decoder-batched", d, args.big, tc, tca),
                        *oip_targets("MLServer", f"127.0.0.1:{port}", "decoder", d, args.big, tc, tca)]
            for target in mlserver:
                target.pid = process.pid
            targets += mlserver

        for rnd in range(args.rounds):  # the servers take turns, so drift hits all alike
            for target in targets:
                take_turn(targets, target)
                p50, p99 = latency(target.sync_call, args.calls)
                measured = {"p50": p50, "p99": p99}
                if target.async_call is not None:
                    for k in (16, 64):
                        measured[f"in_flight_{k}"] = asyncio.run(in_flight(target.async_call, k, args.seconds))
                if target.big_call is not None:
                    measured["big"] = rate(target.big_call, args.big, args.seconds)
                target.rounds.append(measured)
                for key, value in measured.items():  # the best of the rounds
                    best = min if key.startswith("p") else max
                    target.results[key] = best(target.results.get(key, value), value)
                print(f"round {rnd + 1}: {target.name}: " + ", ".join(f"{k} {v:,.2f}" for k, v in measured.items()),
                      flush=True)

        take_turn(targets, targets[1])
        _stop(children)  # the peers are done: the stream and its baseline get the machine to themselves
        z = np.random.default_rng(1).normal(size=(args.stream, d)).astype(np.float32)
        # The stream and its in-process baseline alternate, `rounds` times each: the ratio of each round, and
        # their median, compare the two under the same load.
        in_process: dict[str, list[float]] = {"float32": [], "uint8": []}
        streamed: dict[str, list[float]] = {"float32": [], "uint8": []}
        with DecoderClient(decoder.address, timeout=600) as client:
            for _ in range(args.rounds):
                for dt in ("float32", "uint8"):
                    in_process[dt].append(rate(lambda dt=dt: model.decode(z[:65536], dt), 65536, args.seconds))
                    streamed[dt].append(rate(lambda dt=dt: client.decode(z, dtype=dt), args.stream, 1.0))
        decoder.stop()
    finally:
        for target in targets:  # none left frozen, whatever went wrong
            if target.pid is not None:
                _signal_tree(target.pid, signal.SIGCONT)
        _stop(children)
        if decoder is not None and decoder.poll() is None:
            decoder.stop()

    echo = targets[0]

    def ratio(t: Target, key: str) -> float:
        """The median over the rounds of the target's figure over the echo floor's in the same round: the
        floor itself swings by a quarter from round to round here, so a ratio of two bests would compare the
        floor's luckiest round with another server's."""
        return statistics.median(r.get(key, 0) / e[key] for r, e in zip(t.rounds, echo.rounds))

    print(f"\nload average {os.getloadavg()[0]:.1f} (1 min), {os.getloadavg()[1]:.1f} (5 min); figures: the best "
          "of the rounds; x echo: the median of the rounds' ratios")
    print(f"{'server':<20} {'p50 ms':>8} {'x echo':>7} {'p99 ms':>8} {'16 in flight/s':>15} {'x echo':>7} "
          f"{'64 in flight/s':>15} {'x echo':>7} {'4,096-latent calls, images/s':>30}")
    for t in targets:
        r = t.results
        big = f"{r['big']:,.0f}" if "big" in r else "-"
        print(f"{t.name:<20} {r['p50']:>8.3f} {ratio(t, 'p50'):>7.2f} {r['p99']:>8.3f} "
              f"{r.get('in_flight_16', 0):>15,.0f} {ratio(t, 'in_flight_16'):>7.2f} "
              f"{r.get('in_flight_64', 0):>15,.0f} {ratio(t, 'in_flight_64'):>7.2f} {big:>30}")
    for dt in ("float32", "uint8"):
        ratios = [s / b for s, b in zip(streamed[dt], in_process[dt])]
        print(f"aevae.v1 stream of {args.stream:,} latents, {dt}: median {statistics.median(streamed[dt]):,.0f} "
              f"images/s = {statistics.median(ratios):.2f}x in-process (median of the rounds' ratios: "
              f"{', '.join(f'{r:.2f}' for r in ratios)}; in-process {statistics.median(in_process[dt]):,.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
