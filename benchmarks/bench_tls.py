"""TLS and a token against plaintext, on the same machine, in one run: the cost of `aevae serve --tls-cert
--tls-key --token-file` as a client sees it.

    .venv/bin/python benchmarks/bench_tls.py [--models-dir DIR] [--calls 2000] [--stream 200000] [--rounds 3]

Two decoders over the same repository, one plaintext and one with TLS (a throwaway CA made here) and a token
file; the client sends the token to the second. Measured in interleaved rounds so that drift hits both alike:
- one latent -> one image (float32): p50 and p99 of each;
- a streamed decode of `--stream` latents (uint8, the client's 4,096-row chunks): images/s of each, the best
  round of each.
Uses --models-dir when given, else a tiny repository written here (the default architecture, random weights).
Prints the ratios and the load average before and after; asserts nothing.
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
    parser.add_argument("--calls", type=int, default=2000, help="one-latent calls per server and round")
    parser.add_argument("--stream", type=int, default=200_000, help="latents per streamed decode")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from aevae.client import DecoderClient
    from aevae.services.process import ServiceProcess
    from aevae.services.security import make_certificates

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    models = repository(args.models_dir, "aevae-bench-tls-")
    work = Path(tempfile.mkdtemp(prefix="aevae-bench-tls-keys-"))
    certs = make_certificates(work / "tls")
    token = "bench-" + os.urandom(16).hex()
    (work / "token").write_text(token + "\n")
    quiet = {"AEVAE_TOKEN": "", "AEVAE_TOKEN_FILE": "", "XDG_CONFIG_HOME": str(work / "config")}
    plain = ServiceProcess("decoder", models, env=quiet).start()
    secure = ServiceProcess("decoder", models, env=quiet, args=[
        "--tls-cert", str(certs["cert"]), "--tls-key", str(certs["key"]), "--token-file", str(work / "token")])
    try:
        secure.start()
        clients = {
            "plaintext": DecoderClient(plain.address, token="", tls=False, timeout=300),
            "TLS + token": DecoderClient(secure.address, token=token, tls_ca=str(certs["ca"]), timeout=300),
        }
        one = np.zeros((1, 4), np.float32)
        big = np.random.default_rng(0).standard_normal((args.stream, 4)).astype(np.float32)
        for client in clients.values():  # warm up: channels, the model, the server's limits
            client.decode(one)
            client.decode(big[:20_000], dtype="uint8")
        latencies: dict[str, list[np.ndarray]] = {name: [] for name in clients}
        rates: dict[str, list[float]] = {name: [] for name in clients}
        for round_ in range(args.rounds):
            order = list(clients) if round_ % 2 == 0 else list(reversed(clients))
            for name in order:
                latencies[name].append(timed(lambda: clients[name].decode(one), args.calls))
                start = time.perf_counter()
                clients[name].decode(big, dtype="uint8")
                rates[name].append(args.stream / (time.perf_counter() - start))
        print(f"{'':14} {'one latent p50':>15} {'p99':>9} {'streamed uint8 (best round)':>28}")
        summary = {}
        for name in clients:
            lat = np.concatenate(latencies[name]) * 1e3
            summary[name] = (float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), max(rates[name]))
            p50, p99, rate = summary[name]
            print(f"{name:14} {p50:12.3f} ms {p99:6.3f} ms {rate:20,.0f} images/s")
        (p50_plain, _, rate_plain), (p50_tls, _, rate_tls) = summary["plaintext"], summary["TLS + token"]
        print(f"TLS + token / plaintext: streamed throughput {rate_tls / rate_plain:.2f} x (goal >= 0.9), "
              f"one-latent p50 {p50_tls / p50_plain:.2f} x the latency ({p50_plain / p50_tls:.2f} x the rate)")
        for client in clients.values():
            client.close()
    finally:
        plain.stop()
        secure.stop()
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)


if __name__ == "__main__":
    main()
