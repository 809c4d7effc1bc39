"""Serving benchmark: decode and encode throughput through aevae.client against the same model in-process,
and the latency of one latent -> one image (and one image -> one latent), in one run.

    .venv/bin/python benchmarks/bench_serving.py [--models-dir /tmp/full1] [--stream-n 1000000]

Uses --models-dir when given, else /tmp/full1 when it exists, else trains a tiny repository (2,000 images,
one epoch: the same architecture, so the same cost per image). The services run as real processes
(`aevae serve`), exactly as deployed; --serve-args passes options to both. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
UNARY_BATCHES = (1, 4, 16, 64, 256, 1024, 4096)


def repository(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    if Path("/tmp/full1").is_dir():
        return Path("/tmp/full1")
    tiny = Path(tempfile.mkdtemp(prefix="aevae-bench-")) / "models"
    print(f"training a tiny repository in {tiny} ...", flush=True)
    data_root = os.environ.get("AEVAE_DATA_ROOT") or str(ROOT.parent / "shared" / "datasets")
    subprocess.run([sys.executable, "-m", "aevae.cli", "train", "--models-dir", str(tiny), "--data-root", data_root,
                    "--storage-path", str(tiny.parent / "ray"), "--train-limit", "2000", "--epochs", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    return tiny


def rate(fn, items: int, min_seconds: float = 1.0, min_reps: int = 2) -> float:
    """Items per second of fn(), repeated for at least min_seconds after one warm-up call."""
    fn()
    reps, start = 0, time.perf_counter()
    while reps < min_reps or time.perf_counter() - start < min_seconds:
        fn()
        reps += 1
    return items * reps / (time.perf_counter() - start)


def latency(fn, n: int) -> tuple[float, float]:
    for _ in range(100):
        fn()
    times = np.empty(n)
    for i in range(n):
        start = time.perf_counter()
        fn()
        times[i] = time.perf_counter() - start
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


best_setting: dict[str, tuple[int, bool]] = {}


def best_in_process(run, items: int, what: str) -> float:
    """The in-process baseline at its best setting: the model's own limit on this machine.

    Batch sizes, and the calling thread: on a busy 2-core machine torch's two intra-op threads ran 2-3x
    slower called from the main thread than from a worker thread (as the services call it), so both count.
    """
    worker = ThreadPoolExecutor(1)
    rates = {}
    for batch in (1024, 4096):
        rates[(batch, False)] = rate(lambda: run(batch), items)
        rates[(batch, True)] = rate(lambda: worker.submit(run, batch).result(), items)
    worker.shutdown()
    best_setting[what] = max(rates, key=rates.get)
    shown = "  ".join(f"batch {b} {'worker' if w else 'main'}: {r:,.0f}" for (b, w), r in rates.items())
    print(f"in-process LoadedModel.{what} (images/s): {shown}; baseline {rates[best_setting[what]]:,.0f}")
    return rates[best_setting[what]]


def in_process_decode(model, z: np.ndarray, batch: int = 4096) -> None:
    for start in range(0, len(z), batch):
        model.decode(z[start:start + batch])


def in_process_encode(model, x: np.ndarray, batch: int = 4096) -> None:
    for start in range(0, len(x), batch):
        model.encode(x[start:start + batch].astype(np.float32) / 255)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--model", default="vae")
    parser.add_argument("--stream-n", type=int, default=1_000_000, help="latents in the streamed decode")
    parser.add_argument("--latency-n", type=int, default=2000, help="calls for the latency percentiles")
    parser.add_argument("--serve-args", default="", help="extra `aevae serve` options for both services")
    parser.add_argument("--stream-chunk", type=int, default=None, help="client rows per streamed message")
    args = parser.parse_args()

    import torch

    from aevae import mnist
    from aevae.client import DecoderClient, EncoderClient
    from aevae.store import ModelStore
    from aevae.services.process import ServiceProcess

    models = repository(args.models_dir)
    model = ModelStore(models).get(args.model)
    print(f"model {model.name}/{model.number} ({model.manifest.kind}, latent dim {model.latent_dim}) from {models}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    rng = np.random.default_rng(0)
    d = model.latent_dim
    z_big = rng.normal(size=(args.stream_n, d)).astype(np.float32)
    digits = mnist.load(os.environ.get("AEVAE_DATA_ROOT") or ROOT.parent / "shared" / "datasets").test.images
    x_big = np.concatenate([digits] * 10)  # 100,000 uint8 images

    serve_args = shlex.split(args.serve_args)
    services = {k: ServiceProcess(k, models, args=serve_args).start() for k in ("encoder", "decoder")}
    try:
        for s in services.values():
            s.wait_healthy()
        options = {} if args.stream_chunk is None else {"stream_chunk": args.stream_chunk}
        with DecoderClient(services["decoder"].address, timeout=120, **options) as dec, \
                EncoderClient(services["encoder"].address, timeout=120, **options) as enc:
            print("\n== decoder ==")
            base = best_in_process(lambda b: in_process_decode(model, z_big[:50_000], b), 50_000, "decode")
            for batch in UNARY_BATCHES:
                z = z_big[:batch]
                f32 = rate(lambda: dec.decode(z, model=args.model), batch)
                u8 = rate(lambda: dec.decode(z, model=args.model, dtype="uint8"), batch)
                print(f"unary   batch {batch:5d}: float32 {f32:10,.0f} images/s   uint8 {u8:10,.0f} images/s")
            streamed_rates = {}
            for dtype in ("uint8", "float32"):
                start = time.perf_counter()
                out = dec.decode(z_big, model=args.model, dtype=dtype)
                seconds = time.perf_counter() - start
                assert out.shape == (args.stream_n, 32, 32)
                del out
                streamed_rates[dtype] = args.stream_n / seconds
                print(f"streamed {args.stream_n:,} latents, {dtype:7s}: {streamed_rates[dtype]:12,.0f} images/s "
                      f"({seconds:.1f} s)  ratio to the in-process baseline before {streamed_rates[dtype] / base:.2f}")
            again = best_in_process(lambda b: in_process_decode(model, z_big[:50_000], b), 50_000, "decode")
            mean = (base + again) / 2  # the machine's load may change during the run: bracket the streams
            for dtype, streamed in streamed_rates.items():
                print(f"RATIO streamed {dtype} / in-process (mean of the baselines before and after, {mean:,.0f}): "
                      f"{streamed / mean:.2f}   (goal >= 0.8)")
            one = z_big[:1]
            p50, p99 = latency(lambda: dec.decode(one, model=args.model), args.latency_n)
            print(f"latency one latent -> one image (float32): p50 {p50:.3f} ms  p99 {p99:.3f} ms")
            p50, p99 = latency(lambda: model.decode(one), args.latency_n)
            print(f"   in-process LoadedModel.decode of one latent:  p50 {p50:.3f} ms  p99 {p99:.3f} ms")

            print("\n== encoder ==")
            base = best_in_process(lambda b: in_process_encode(model, x_big[:20_000], b), 20_000, "encode")
            for batch in UNARY_BATCHES:
                x = x_big[:batch]
                print(f"unary   batch {batch:5d}: uint8 images {rate(lambda: enc.encode(x, model=args.model), batch):10,.0f} images/s")
            start = time.perf_counter()
            result = enc.encode(x_big, model=args.model)
            seconds = time.perf_counter() - start
            assert result.mean.shape == (len(x_big), d)
            streamed = len(x_big) / seconds
            print(f"streamed {len(x_big):,} uint8 images: {streamed:12,.0f} images/s ({seconds:.1f} s)  "
                  f"ratio to in-process {streamed / base:.2f}")
            one = x_big[:1]
            p50, p99 = latency(lambda: enc.encode(one, model=args.model), args.latency_n)
            print(f"latency one image -> one latent: p50 {p50:.3f} ms  p99 {p99:.3f} ms")
            p50, p99 = latency(lambda: model.encode(one.astype(np.float32) / 255), args.latency_n)
            print(f"   in-process LoadedModel.encode of one image:   p50 {p50:.3f} ms  p99 {p99:.3f} ms")
    finally:
        for s in services.values():
            s.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
