"""OIP v2 against aevae.v1, and the cost of metrics, on the same decoder: one run, figures printed.

    .venv/bin/python benchmarks/bench_oip.py [--models-dir DIR] [--calls 2000] [--big-calls 20]

- one latent -> one image: p50 and p99 of aevae.v1 (aevae.client.DecoderClient) and of OIP ModelInfer
  (tritonclient.grpc), interleaved in blocks so that drift hits both alike;
- 4,096 latents per call (float32): images/s of both;
- metrics: a second decoder with --metrics-port, the same two loads through aevae.v1; throughput with
  metrics over throughput without.
Uses --models-dir when given, else a tiny repository written here (the same architecture as the default
models, so the same cost per image). Prints the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from common import repository, timed  # this folder







def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--calls", type=int, default=2000, help="one-latent calls per protocol")
    parser.add_argument("--big-calls", type=int, default=20, help="4,096-latent calls per protocol and round")
    args = parser.parse_args()

    import tritonclient.grpc as triton

    from aevae.client import DecoderClient
    from aevae.services.process import ServiceProcess

    root = repository(args.models_dir, "aevae-bench-oip-")
    print(f"load average before: {os.getloadavg()}", flush=True)
    plain = ServiceProcess("decoder", root).start()
    metered = ServiceProcess("decoder", root, args=["--metrics-port", "0"]).start()
    try:
        plain.wait_healthy()
        metered.wait_healthy()
        one = np.random.default_rng(0).normal(size=(1, 4)).astype(np.float32)
        big = np.random.default_rng(1).normal(size=(4096, 4)).astype(np.float32)
        with DecoderClient(plain.address) as v1, triton.InferenceServerClient(plain.address) as oip, \
                DecoderClient(metered.address) as v1m:
            def oip_call(z: np.ndarray) -> Callable[[], object]:
                tensor = triton.InferInput("latents", list(z.shape), "FP32")
                tensor.set_data_from_numpy(z)
                return lambda: oip.infer("vae", [tensor]).as_numpy("images")

            calls = {"aevae.v1": lambda: v1.decode(one, model="vae"), "OIP": oip_call(one),
                     "aevae.v1 + metrics": lambda: v1m.decode(one, model="vae")}
            bigs = {"aevae.v1": lambda: v1.decode(big, model="vae"), "OIP": oip_call(big),
                    "aevae.v1 + metrics": lambda: v1m.decode(big, model="vae")}
            for call in [*calls.values(), *bigs.values()]:  # warm-up: channels, limits, the model
                for _ in range(3):
                    call()
            small = {name: [] for name in calls}
            block = max(1, args.calls // 10)
            for _ in range(10):
                for name, call in calls.items():
                    small[name].append(timed(call, block))
            large = {name: [] for name in bigs}
            for _ in range(4):
                for name, call in bigs.items():
                    large[name].append(timed(call, max(1, args.big_calls // 4)))
        print(f"load average after: {os.getloadavg()}", flush=True)
    finally:
        plain.stop()
        metered.stop()

    lat = {name: np.concatenate(v) for name, v in small.items()}
    rate = {name: 4096 * len(np.concatenate(v)) / np.concatenate(v).sum() for name, v in large.items()}
    calls_per_s = {name: len(v) / v.sum() for name, v in lat.items()}
    for name in lat:
        print(f"{name:20s} one latent: p50 {np.percentile(lat[name], 50) * 1e3:.3f} ms, "
              f"p99 {np.percentile(lat[name], 99) * 1e3:.3f} ms, {calls_per_s[name]:,.0f} calls/s; "
              f"4,096 latents: {rate[name]:,.0f} images/s")
    p50 = {name: float(np.percentile(v, 50)) for name, v in lat.items()}
    print(f"OIP / aevae.v1: one-latent p50 ratio (v1 p50 / OIP p50, >= 0.9 is the goal) "
          f"{p50['aevae.v1'] / p50['OIP']:.2f} x; 4,096-latent throughput {rate['OIP'] / rate['aevae.v1']:.2f} x")
    print(f"metrics cost: 4,096-latent throughput {1 - rate['aevae.v1 + metrics'] / rate['aevae.v1']:+.1%}, "
          f"one-latent calls/s {1 - calls_per_s['aevae.v1 + metrics'] / calls_per_s['aevae.v1']:+.1%} "
          "(positive: slower with metrics)")


if __name__ == "__main__":
    main()
