"""Soak: floods, slow readers and SIGTERM under load against one decoder process (issue 9). Run by hand.

    .venv/bin/python benchmarks/bench_soak.py [--models-dir DIR] [--streams 64] [--latents 50000]

Phases, each against the same `aevae serve decoder` (default settings, grace 10 s):
1. 64 streams of 50,000 latents at once (float32 images, responses read and dropped);
2. 1,000 concurrent one-latent unary calls;
3. 8 clients that open a stream, read one answer and stop reading for 10 s;
4. SIGTERM while 64 streams are in flight.
Prints the answers by status, the unary p99, the peak RSS of the server and the time from SIGTERM to exit.
Uses --models-dir when given, else a repository with the default architecture and random weights (the same
cost per image). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from common import repository  # this folder





class PeakRss(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.running = pid, 0, True

    def run(self) -> None:
        while self.running:
            try:
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        self.peak = max(self.peak, int(line.split()[1]) * 1024)
            except OSError:
                return
            time.sleep(0.05)


def requests(n: int, chunk: int = 4096, dtype: str = "float32"):  # type: ignore[no-untyped-def]
    from aevae.v1 import decoder_pb2
    from aevae.v1.tensors import to_tensor

    z = np.random.default_rng(0).normal(size=(chunk, 4)).astype(np.float32)
    for start in range(0, n, chunk):
        yield decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(z[:min(chunk, n - start)]), dtype=dtype)


async def stream(stub, n: int, statuses: collections.Counter) -> None:  # type: ignore[no-untyped-def]
    try:
        async for _ in stub.DecodeStream(requests(n)):
            pass
        statuses["OK"] += 1
    except grpc.aio.AioRpcError as error:
        statuses[error.code().name] += 1


async def unary(stub, statuses: collections.Counter, times: list[float]) -> None:  # type: ignore[no-untyped-def]
    from aevae.v1 import decoder_pb2
    from aevae.v1.tensors import to_tensor

    request = decoder_pb2.DecodeRequest(model="vae", latents=to_tensor(np.zeros((1, 4), np.float32)))
    start = time.perf_counter()
    try:
        await stub.Decode(request)
        statuses["OK"] += 1
    except grpc.aio.AioRpcError as error:
        statuses[error.code().name] += 1
    times.append(time.perf_counter() - start)


async def main(args: argparse.Namespace) -> None:
    from aevae.services.process import ServiceProcess
    from aevae.v1 import decoder_pb2_grpc

    models = repository(args.models_dir, "aevae-soak-")
    options = [("grpc.max_receive_message_length", -1)]
    service = ServiceProcess("decoder", models, args=["--grace", str(args.grace)]).start()
    service.wait_healthy()
    assert service.process is not None
    rss = PeakRss(service.process.pid)
    rss.start()
    print(f"load average {os.getloadavg()[0]:.1f}; decoder pid {service.process.pid}", flush=True)
    async with grpc.aio.insecure_channel(service.address, options=options) as channel:
        stub = decoder_pb2_grpc.DecoderStub(channel)

        statuses: collections.Counter[str] = collections.Counter()
        started = time.perf_counter()
        await asyncio.gather(*[stream(stub, args.latents, statuses) for _ in range(args.streams)])
        print(f"1. {args.streams} streams of {args.latents:,} latents: {dict(statuses)} in "
              f"{time.perf_counter() - started:.1f} s; peak RSS so far {rss.peak / 2**30:.2f} GiB", flush=True)

        statuses = collections.Counter()
        times: list[float] = []
        await asyncio.gather(*[unary(stub, statuses, times) for _ in range(args.unary)])
        print(f"2. {args.unary} concurrent unary calls: {dict(statuses)}; p50 {np.percentile(times, 50) * 1e3:.1f} ms "
              f"p99 {np.percentile(times, 99) * 1e3:.1f} ms; peak RSS so far {rss.peak / 2**30:.2f} GiB", flush=True)

        before = rss.peak
        slow = []
        for _ in range(args.slow):
            call = stub.DecodeStream(requests(args.latents))
            await call.read()
            slow.append(call)
        await asyncio.sleep(10)
        print(f"3. {args.slow} clients that stopped reading for 10 s: peak RSS {rss.peak / 2**30:.2f} GiB "
              f"(before {before / 2**30:.2f})", flush=True)
        for call in slow:
            call.cancel()

        statuses = collections.Counter()
        flood = [asyncio.ensure_future(stream(stub, args.latents, statuses)) for _ in range(args.streams)]
        await asyncio.sleep(2.0)
        signalled = time.monotonic()
        service.signal(signal.SIGTERM)
        code = await asyncio.get_running_loop().run_in_executor(None, service.process.wait)
        exited = time.monotonic() - signalled
        await asyncio.gather(*flood)
    rss.running = False
    print(f"4. SIGTERM with {args.streams} streams in flight: exit code {code} after {exited:.1f} s "
          f"(grace {args.grace:g} s); the streams ended {dict(statuses)}", flush=True)
    print(f"peak RSS of the decoder: {rss.peak / 2**30:.2f} GiB; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--latents", type=int, default=50_000)
    parser.add_argument("--unary", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=8)
    parser.add_argument("--grace", type=float, default=10.0)
    asyncio.run(main(parser.parse_args()))
