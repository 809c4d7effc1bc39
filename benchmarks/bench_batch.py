"""Batch benchmark: `aevae decode-batch` on Ray Data against the same model in-process, its peak memory at two
sizes, and the client's fan-out over two decoders against one. Run by hand; prints figures, asserts nothing.

    .venv/bin/python benchmarks/bench_batch.py [--models-dir DIR] [--rows 10000000] [--small-rows 1000000]
                                               [--fanout-rows 1000000] [--skip ray|fanout]
                                               [--precisions fp32,int8]

1. In-process: `Loaded.decode` (latents -> uint8 images: exactly what every batch worker runs per shard) at its
   best chunk and calling thread, over the whole machine.
2. decode-batch --prior N to Parquet (raw images) through the real console script, at --small-rows and --rows
   (0 skips a size): items/s (whole run, Ray start-up included, and steady: after the first shard), and the
   peak resident memory of the driver and of each worker process, sampled every 0.25 s over the process tree.
   1 and 2 run for each of --precisions (decode-batch --precision; default fp32 only), each rate also given
   against fp32's in-process rate when fp32 is among them.
3. The fan-out client: decode of --fanout-rows latents (uint8) through one decoder process and through two.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
AEVAE = [sys.executable, "-m", "aevae.cli"]


def repository(arg: str | None) -> Path:
    for candidate in (arg, "/tmp/full1", str(ROOT / "models")):
        if candidate and (Path(candidate) / "vae").is_dir():
            return Path(candidate)
    tiny = Path(tempfile.mkdtemp(prefix="aevae-bench-")) / "models"
    print(f"training a small repository in {tiny} (the same architecture, so the same cost per image) ...")
    data_root = os.environ.get("AEVAE_DATA_ROOT") or str(ROOT.parent / "shared" / "datasets")
    subprocess.run([*AEVAE, "train", "--models-dir", str(tiny), "--data-root", data_root, "--storage-path",
                    str(tiny.parent / "ray"), "--train-limit", "2000", "--epochs", "1"], check=True,
                   stdout=subprocess.DEVNULL)
    return tiny


def load() -> str:
    return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())


def in_process(models: Path, model: str, precision: str = "fp32") -> float:
    from aevae.batch.model import Loaded, resolve

    loaded = Loaded(resolve(str(models), model, None, precision))
    z = np.random.default_rng(0).standard_normal((200_000, loaded.ref.latent_dim), dtype=np.float32)
    worker = ThreadPoolExecutor(1)
    rates = {}
    for chunk in (1024, 4096, 16384):
        def run(chunk: int = chunk) -> None:
            for start in range(0, len(z), chunk):
                loaded.decode(z[start:start + chunk])
        for where, call in (("main", run), ("worker", lambda: worker.submit(run).result())):
            call()  # warm-up
            start = time.perf_counter()
            call()
            rates[(chunk, where)] = len(z) / (time.perf_counter() - start)
    worker.shutdown()
    shown = "  ".join(f"{c}/{w} {r:,.0f}" for (c, w), r in rates.items())
    print(f"in-process Loaded.decode -> uint8, {precision} (chunk/thread: images/s): {shown}")
    return max(rates.values())


class Sampler:
    """Peak RSS per process of a process tree, sampled in a thread."""

    def __init__(self, root: int, interval: float = 0.25):
        self.root, self.interval = root, interval
        self.peaks: dict[int, tuple[int, str]] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [psutil.Process(self.root)]
                procs += procs[0].children(recursive=True)
            except psutil.Error:
                break
            total = 0
            for p in procs:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:2])[:80] or p.name()
                except psutil.Error:
                    continue
                total += rss
                if rss > self.peaks.get(p.pid, (0, ""))[0]:
                    self.peaks[p.pid] = (rss, name)
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self) -> dict[str, float]:
        driver = self.peaks.get(self.root, (0, ""))[0]
        workers = [rss for pid, (rss, name) in self.peaks.items() if "MapWorker" in name or "ShardWorker" in name]
        others = sorted(((rss, name) for pid, (rss, name) in self.peaks.items()
                         if pid != self.root and not ("MapWorker" in name or "ShardWorker" in name)), reverse=True)
        return {"driver_mb": driver / 2**20, "worker_max_mb": max(workers, default=0) / 2**20,
                "workers": len(workers), "tree_total_mb": self.total_peak / 2**20,
                "largest_other": f"{others[0][1]} {others[0][0] / 2**20:.0f} MB" if others else ""}


def decode_batch(models: Path, model: str, rows: int, out: Path, extra: list[str]) -> tuple[dict, dict]:
    shutil.rmtree(out, ignore_errors=True)
    command = [*AEVAE, "decode-batch", "--prior", str(rows), "--model", model, "--models-dir", str(models),
               "--output", str(out), "--quiet", *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = Sampler(process.pid)
    _, err = process.communicate()
    sampler.stop()
    if process.returncode != 0:
        raise SystemExit(f"decode-batch failed:\n{err}")
    record = json.loads((out / "_aevae_batch.json").read_text())["last_run"]
    size = sum(p.stat().st_size for p in out.glob("part-*"))
    record["gb_on_disk"] = size / 1e9
    return record, sampler.report()


def fanout(models: Path, model: str, rows: int, serve_args: list[str]) -> None:
    from aevae.client import DecoderClient
    from aevae.services.process import ServiceProcess

    started = [ServiceProcess("decoder", models, args=serve_args).start() for _ in range(2)]
    try:
        for s in started:
            s.wait_healthy()
        addresses = [s.address for s in started]
        with DecoderClient(addresses[0], timeout=600) as one:
            dim = next(m.latent_dim for m in one.list_models() if m.name == model)
        z = np.random.default_rng(1).standard_normal((rows, dim), dtype=np.float32)
        results = {}
        for label, targets in (("one decoder", addresses[:1]), ("two decoders", addresses),
                               ("one decoder again", addresses[1:])):
            with DecoderClient(targets, timeout=600) as client:
                client.decode(z[:20_000], model=model, dtype="uint8")  # warm-up: limits, first model call
                start = time.perf_counter()
                images = client.decode(z, model=model, dtype="uint8")
                results[label] = rows / (time.perf_counter() - start)
                assert len(images) == rows
            print(f"  {label}: {results[label]:,.0f} images/s  ({load()})")
        one = (results["one decoder"] + results["one decoder again"]) / 2
        print(f"fan-out: two decoders / one = {results['two decoders'] / one:.2f}x")
    finally:
        for s in started:
            s.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", default=None)
    parser.add_argument("--model", default="vae")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--small-rows", type=int, default=1_000_000)
    parser.add_argument("--fanout-rows", type=int, default=1_000_000)
    parser.add_argument("--out", default=None, help="scratch folder for the Parquet output (deleted after)")
    parser.add_argument("--skip", action="append", default=[], choices=("ray", "fanout"))
    parser.add_argument("--extra", default="", help="more decode-batch flags, e.g. '--workers 2'")
    parser.add_argument("--precisions", default="fp32", help="decoding precisions to run, e.g. fp32,int8")
    parser.add_argument("--serve-args", action="append", default=None,
                        help="flags for both decoders in the fan-out part; repeat for several settings "
                        "(default: the defaults, then --threads 1)")
    args = parser.parse_args()
    models = repository(args.models_dir)
    print(f"models: {models}; {os.cpu_count()} CPUs; {load()}")
    if "ray" not in args.skip:
        scratch = Path(args.out or tempfile.mkdtemp(prefix="aevae-bench-batch-"))
        fp32_base = None
        for precision in args.precisions.split(","):
            base = in_process(models, args.model, precision)
            fp32_base = base if precision == "fp32" else fp32_base
            versus = f", {base / fp32_base:.2f}x fp32's" if fp32_base and precision != "fp32" else ""
            print(f"in-process best, {precision}: {base:,.0f} images/s{versus}  ({load()})")
            for rows in (r for r in (args.small_rows, args.rows) if r > 0):
                record, memory = decode_batch(models, args.model, rows, scratch / "out",
                                              ["--precision", precision, *args.extra.split()])
                steady = record["steady_items_per_s"] or 0
                versus = (f", {record['items_per_s'] / fp32_base:.2f}x fp32 in-process"
                          if fp32_base and precision != "fp32" else "")
                print(f"decode-batch {rows:,} -> Parquet, {precision}: {record['seconds']:.0f} s, "
                      f"{record['items_per_s']:,.0f} items/s whole run ({record['items_per_s'] / base:.2f}x "
                      f"in-process{versus}), steady {steady:,.0f} ({steady / base:.2f}x); "
                      f"{record['gb_on_disk']:.2f} GB on disk; worker time {record['time_share']}  ({load()})")
                print(f"  peak RSS: driver {memory['driver_mb']:,.0f} MB, worker max "
                      f"{memory['worker_max_mb']:,.0f} MB ({memory['workers']} workers), whole tree "
                      f"{memory['tree_total_mb']:,.0f} MB; largest other: {memory['largest_other']}")
                shutil.rmtree(scratch / "out", ignore_errors=True)
            base_after = in_process(models, args.model, precision)
            print(f"in-process best, {precision}, after: {base_after:,.0f} images/s  ({load()})")
        if not args.out:
            shutil.rmtree(scratch, ignore_errors=True)
    if "fanout" not in args.skip:
        for serve_args in args.serve_args or ["", "--threads 1"]:
            print(f"fan-out over decoder processes ({serve_args or 'default settings'}), {args.fanout_rows:,} "
                  "latents, uint8:")
            fanout(models, args.model, args.fanout_rows, serve_args.split())


if __name__ == "__main__":
    main()
