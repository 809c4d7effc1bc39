"""Where a one-latent Decode's time goes: aevae's decoder against servers that do less, in one run, taking turns.
Run by hand; prints a table; asserts nothing.

    .venv/bin/python benchmarks/bench_latency_floor.py [--models-dir DIR] [--calls 2000] [--rounds 3]

Servers, all grpc.aio on loopback, called by the same clients as in bench_peers.py:
- echo: the bare echo floor (benchmarks/echo_server.py), 16 bytes back;
- "aevae.v1, no work": the Decoder service registered as `aevae serve` registers it (services/registration.py),
  answering every Decode with the same prepared DecodeResponse bytes (one 32 x 32 float32 image): what the
  protocol, the response's size and the clients cost;
- "+ the model call": the same, plus the version's ONNX Runtime decode of one latent on the event loop, as
  `aevae serve` runs it: what the model costs when it runs between network calls (its weights no longer in
  the cache), against its cost in a tight loop (printed too);
- aevae.v1: `aevae serve decoder`, and the same with `--precision int8` (the int8 decoder: weights a quarter the
  size, so they stay in the cache between calls);
- "request made per call": the same aevae.v1 server, its client making the request anew for every call
  (numpy to tensor to message, as an application does) where the others send one made once, as the echo
  floor's client sends one payload: what making it costs the client, which shares the two cores.
Each row: median of the rounds' p50, calls/s with 16 in flight, and the server process's CPU time per call
with 16 in flight (all its threads; on 2 cores the client and the server share the machine, so a server that
spends more CPU per call leaves the client less and answers fewer calls).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import psutil

from bench_peers import aevae_targets, echo_target, free_port, in_flight, latency, wait_port
from common import ROOT, repository, timed

# A stand-in decoder: `python -c STAND_IN PORT MODELS MODE`, MODE "none" or "model".
STAND_IN = textwrap.dedent("""
    import asyncio, sys
    import grpc, numpy as np
    from aevae.services.registration import register
    from aevae.store import ModelStore
    from aevae.v1 import decoder_pb2
    from aevae.v1.tensors import to_tensor

    port, models, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    model = ModelStore(models).get("vae")
    z = np.zeros((1, model.latent_dim), np.float32)
    answer = decoder_pb2.DecodeResponse(model="vae", version=1, images=to_tensor(model.decode(z))).SerializeToString()

    class StandIn:
        async def Decode(self, request, context):
            if mode == "model":
                model.runtime.decode(z)
            return answer

        async def DecodeStream(self, requests, context):
            async for _ in requests:
                yield answer

        async def ListModels(self, request, context):
            return b""

    async def main():
        server = grpc.aio.server()
        register(StandIn(), server, decoder_pb2.DESCRIPTOR.services_by_name["Decoder"], 4 << 20)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())
""")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per latency block")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds per 16-in-flight block")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from aevae.store import ModelStore

    models = repository(args.models_dir, "aevae-floor-")
    model = ModelStore(models).get("vae")
    z = np.zeros((1, model.latent_dim), np.float32)
    for _ in range(200):
        model.runtime.decode(z)
    hot = float(np.median(timed(lambda: model.runtime.decode(z), 2000)) * 1e3)
    print(f"model {model.name}/{model.number} on {model.runtime.name}; one-latent decode in a tight loop "
          f"{hot:.3f} ms; load average {os.getloadavg()[0]:.1f}", flush=True)

    ports = {name: free_port() for name in ("echo", "none", "model", "aevae", "int8")}
    commands = {
        "echo": [sys.executable, str(ROOT / "benchmarks" / "echo_server.py"), str(ports["echo"])],
        "none": [sys.executable, "-c", STAND_IN, str(ports["none"]), str(models), "none"],
        "model": [sys.executable, "-c", STAND_IN, str(ports["model"]), str(models), "model"],
        **{key: [sys.executable, "-m", "aevae.cli", "serve", "decoder", "--port", str(ports[key]),
                 "--models-dir", str(models), "--precision", precision]
           for key, precision in (("aevae", "fp32"), ("int8", "int8"))},
    }
    names = {"echo": "echo floor", "none": "aevae.v1, no work", "model": "+ the model call", "aevae": "aevae.v1",
             "int8": "aevae.v1, int8", "made": "aevae.v1, request made per call"}
    children = {k: subprocess.Popen(c, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                for k, c in commands.items()}
    try:
        for key, child in children.items():
            wait_port(ports[key], child, key)
        time.sleep(1.0)  # the decoder loads its model once listening
        targets = {k: echo_target(f"127.0.0.1:{p}") if k == "echo" else
                   aevae_targets(f"127.0.0.1:{p}", model.latent_dim, 1)[0] for k, p in ports.items()}
        # the same aevae server, its request made anew for every call, as an application would
        targets["made"] = aevae_targets(f"127.0.0.1:{ports['aevae']}", model.latent_dim, 1, prebuilt=False)[0]
        served_by = {**{k: k for k in ports}, "made": "aevae"}
        p50s: dict[str, list[float]] = {k: [] for k in targets}
        rates: dict[str, list[float]] = {k: [] for k in targets}
        cpu: dict[str, list[float]] = {k: [] for k in targets}  # server CPU seconds per call, 16 in flight
        for _ in range(args.rounds):
            for key, target in targets.items():
                p50s[key].append(latency(target.sync_call, args.calls)[0])
                server = psutil.Process(children[served_by[key]].pid)
                before = sum(server.cpu_times()[:2])
                started = time.perf_counter()
                rate = asyncio.run(in_flight(target.async_call, 16, args.seconds))
                used = sum(server.cpu_times()[:2]) - before
                rates[key].append(rate)
                cpu[key].append(used / (rate * (time.perf_counter() - started)))
        floor_p50, floor_rate, floor_cpu = (np.median(x["echo"]) for x in (p50s, rates, cpu))
        print(f"\n{'server':<20} {'p50 ms':>8} {'x echo':>7} {'16 in flight/s':>15} {'x echo':>7} "
              f"{'CPU us/call':>12} {'x echo':>7}")
        for key in targets:
            p50, rate, used = np.median(p50s[key]), np.median(rates[key]), np.median(cpu[key])
            print(f"{names[key]:<20} {p50:>8.3f} {p50 / floor_p50:>7.2f} {rate:>15,.0f} {rate / floor_rate:>7.2f} "
                  f"{used * 1e6:>12.0f} {used / floor_cpu:>7.2f}")
        served = np.median(p50s["model"]) - np.median(p50s["none"])
        print(f"\nthe model call adds {served:.3f} ms to the p50 when served ({hot:.3f} ms in a tight loop); "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        for child in children.values():
            child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
