"""The UI's drag loop, measured in the browser: pointer move -> the decoded image for that move painted.

Starts the encoder, the decoder and the UI server on free ports over a model repository (or uses running ones),
opens the whole page (both models' plots, the judged samples, the interpolation strips, the cross decoding,
the PCA plots) in headless Chromium and drags the VAE's first black-line point through a scripted path of 200 moves
at pointer rate (one move per frame, 60 Hz). The page timestamps each pointermove with performance.now() and,
when the image decoded from that move's latents (or from a later move's: the page coalesces, latest wins) has
been drawn and the next animation frame starts, records the difference. Prints p50, p95 and max.

    .venv/bin/python benchmarks/bench_ui_drag.py --models-dir /tmp/full1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AEVAE = [sys.executable, "-m", "aevae.cli"]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_up(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/api/status", timeout=2) as r:
                services = json.loads(r.read())["services"]
            if all(s["state"] == "up" for s in services.values()):
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"services behind {url} did not come up in {timeout:.0f} s")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def start_stack(models_dir: str) -> tuple[str, list[subprocess.Popen]]:
    enc, dec, ui = free_port(), free_port(), free_port()
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": ROOT}
    procs = [
        subprocess.Popen([*AEVAE, "serve", "encoder", "--models-dir", models_dir, "--port", str(enc)], **quiet),
        subprocess.Popen([*AEVAE, "serve", "decoder", "--models-dir", models_dir, "--port", str(dec)], **quiet),
        subprocess.Popen([*AEVAE, "ui", "--encoder", f"127.0.0.1:{enc}", "--decoder", f"127.0.0.1:{dec}",
                          "--port", str(ui)], **quiet),
    ]
    return f"http://127.0.0.1:{ui}", procs


def drag(page, moves: int, interval: float) -> dict:
    page.evaluate("() => { const t = window.__aevae.timing; t.latencies.length = 0; t.roundTrips.length = 0; t.moves.clear(); }")
    handle = page.locator("[data-testid=model-vae] [data-testid=recon-handle]").nth(0)
    box = handle.bounding_box()
    axis = page.locator("[data-testid=model-vae] [data-testid=latent-axis]").nth(0).bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    top, bottom = axis["y"] + 5, axis["y"] + axis["height"] - 5
    page.mouse.move(x, y)
    page.mouse.down()
    start = time.perf_counter()
    for i in range(moves):  # a smooth sweep up and down the axis
        target = top + (bottom - top) * (0.5 + 0.45 * math.sin(2 * math.pi * i / 100))
        page.mouse.move(x, target)
        next_at = start + (i + 1) * interval
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
    page.mouse.up()
    page.wait_for_function("() => window.__aevae.timing.moves.size === 0", timeout=10000)
    return page.evaluate("() => ({latencies: window.__aevae.timing.latencies.slice(), roundTrips: window.__aevae.timing.roundTrips.slice()})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", default=os.environ.get("AEVAE_MODELS_DIR", "/tmp/full1"))
    parser.add_argument("--url", default=None, help="use a running UI (its services must be up) instead")
    parser.add_argument("--moves", type=int, default=200)
    parser.add_argument("--interval-ms", type=float, default=1000 / 60, help="time between pointer moves")
    parser.add_argument("--runs", type=int, default=6, help="drags; the first is a warm-up and not counted")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    procs: list[subprocess.Popen] = []
    url = args.url
    if url is None:
        url, procs = start_stack(args.models_dir)
    try:
        wait_up(url)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.wait_for_selector("[data-testid=recon-handle]", timeout=30000)
            # every panel loaded first, so that the drag runs with all of them on the page
            page.wait_for_function("() => document.querySelectorAll('[data-testid=sample-ae]').length === 16",
                                   timeout=30000)
            page.wait_for_timeout(1000)
            load_before = os.getloadavg()[0]
            results = [drag(page, args.moves, args.interval_ms / 1000) for _ in range(args.runs)]
            load_after = os.getloadavg()[0]
            browser.close()
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()

    counted = results[1:] if len(results) > 1 else results
    latencies = [v for r in counted for v in r["latencies"]]
    print(f"UI drag loop ({args.models_dir if args.url is None else url}): {len(counted)} drags x {args.moves} "
          f"pointer moves at {1000 / args.interval_ms:.0f} Hz, pointer move -> decoded image painted; "
          f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores")
    for i, r in enumerate(counted, 1):
        lat = r["latencies"]
        print(f"  drag {i}: p50 {percentile(lat, 0.5):6.2f} ms  p95 {percentile(lat, 0.95):6.2f} ms  "
              f"max {max(lat):6.2f} ms  ({len(lat)} moves)")
    trips = [v for r in counted for v in r["roundTrips"]]
    print(f"  WebSocket round trip of a decode (page -> UI server -> decoder -> page): p50 "
          f"{percentile(trips, 0.5):.2f} ms  p95 {percentile(trips, 0.95):.2f} ms  ({len(trips)} decodes)")
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"all: p50 {p50:.2f} ms  p95 {p95:.2f} ms  mean {statistics.fmean(latencies):.2f} ms  "
          f"max {max(latencies):.2f} ms  over {len(latencies)} moves   (goal: p95 <= 30 ms: "
          f"{'met' if p95 <= 30 else 'missed'})")
    per_drag = sorted(percentile(r["latencies"], 0.95) for r in counted)
    print(f"median over drags of the per-drag p95: {statistics.median(per_drag):.2f} ms "
          f"(per-drag p95 from {per_drag[0]:.2f} to {per_drag[-1]:.2f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
