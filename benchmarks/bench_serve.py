"""Ray Serve benchmark: one latent -> one image through Serve's gRPC proxy (sequential latency), and many
concurrent one-latent calls with and without the Decode batcher (throughput). Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_serve.py [--models-dir /tmp/full1] [--seconds 5] [--concurrency 16]

Serve runs in this process's local Ray with the config's gRPC settings and the decoder application from
deploy/serve/config.yaml (its args, models_dir overridden); everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
from pathlib import Path

import numpy as np
import yaml

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve" / "config.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):.2f} ms, p99 {np.percentile(ms, 99):.2f} ms"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", default=os.environ.get("AEVAE_MODELS_DIR") or "/tmp/full1")
    p.add_argument("--model", default="vae")
    p.add_argument("--calls", type=int, default=500, help="sequential one-latent calls")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput phase")
    p.add_argument("--concurrency", type=int, default=16, help="calls in flight in the throughput phases")
    args = p.parse_args()

    import grpc
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from aevae.store import ModelStore
    from aevae.services import serve_app
    from aevae.v1 import decoder_pb2, decoder_pb2_grpc
    from aevae.v1.tensors import to_tensor

    model = ModelStore(args.models_dir).get(args.model)
    z = np.random.default_rng(0).normal(size=(1, model.latent_dim)).astype(np.float32)
    times = []
    for _ in range(args.calls):
        start = time.perf_counter()
        model.decode(z)
        times.append(time.perf_counter() - start)
    print(f"in-process decode of 1 latent: {percentiles(times)}", flush=True)

    config = yaml.safe_load(CONFIG.read_text())
    (app,) = [a for a in config["applications"] if a["name"] == "decoder"]
    port = free_port()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a shared cluster
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                    grpc_options=gRPCOptions(**{**config["grpc_options"], "port": port}))
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = decoder_pb2_grpc.DecoderStub(channel)
            request = decoder_pb2.DecodeRequest(model=args.model, latents=to_tensor(z))
            metadata = (("application", "decoder"),)
            for label, batch_size in (("batched", app["args"].get("batch_size", 32)), ("unbatched", 1)):
                serve.run(serve_app.decoder({**app["args"], "batch_size": batch_size,
                                             "models_dir": args.models_dir}),
                          name="decoder", route_prefix=app["route_prefix"])
                for _ in range(50):  # warm up: the model loads on the first call
                    stub.Decode(request, metadata=metadata, timeout=60)
                if label == "batched":
                    times = []
                    for _ in range(args.calls):
                        start = time.perf_counter()
                        stub.Decode(request, metadata=metadata, timeout=60)
                        times.append(time.perf_counter() - start)
                    print(f"Ray Serve gRPC, 1 latent -> 1 image, sequential: {percentiles(times)}", flush=True)
                done = 0
                in_flight = [stub.Decode.future(request, metadata=metadata, timeout=60)
                             for _ in range(args.concurrency)]
                start = time.perf_counter()
                while time.perf_counter() - start < args.seconds:
                    in_flight.pop(0).result()
                    done += 1
                    in_flight.append(stub.Decode.future(request, metadata=metadata, timeout=60))
                elapsed = time.perf_counter() - start
                for future in in_flight:
                    future.result()
                print(f"Ray Serve gRPC, {args.concurrency} one-latent calls in flight, {label} "
                      f"(batch_size {batch_size}): {done / elapsed:.0f} calls/s", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
