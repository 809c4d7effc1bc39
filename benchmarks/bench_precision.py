"""fp32, bf16 and int8 side by side, in one run: training epoch time (fp32 against bf16 autocast), big-batch
decoding images/s, and the test-set BCE and negative ELBO each decoding precision gives.

The machine is shared and often loaded, so every ratio is measured within this run with the contenders
alternating: training in blocks of steps (fp32 block, bf16 block, ...), decoding in repetitions. Run by hand:

    .venv/bin/python benchmarks/bench_precision.py --data-root ../shared/datasets --models-dir models

Training uses the trainer's own steps (`aevae.trainer.loop.train_steps`: both models side by side as the
trainer runs them, `Lanes`; the default architecture, batch and one-cycle Adam) on the full training set, in
process (no Ray: the same arithmetic, without the start-up); each contender trains its own models from the
same initial weights on the same batches, and their test metrics after the short run are printed too.
Decoding uses `LoadedModel.decode` (what the services and the batch jobs run) on the newest version of
`--model` in `--models-dir`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def bench_training(data: Any, args: argparse.Namespace) -> None:
    """Three contenders, each its own models from the same initial weights, alternating in blocks of steps:
    fp32 and bf16 as the trainer runs them (the AE and the VAE side by side), and bf16 with the two models in
    turn on all the threads (how the trainer ran them before `Lanes`)."""
    import torch

    from aevae.models import Architecture, build
    from aevae.trainer.config import TrainConfig
    from aevae.trainer.loop import Lanes, Member, evaluate, member, train_steps

    defaults = TrainConfig()
    side_by_side = Lanes(len(defaults.models), args.threads)
    contenders = {"fp32": ("fp32", side_by_side), "bf16": ("bf16", side_by_side),
                  "bf16 in turn": ("bf16", Lanes(len(defaults.models), args.threads, side_by_side=False))}
    train = torch.from_numpy(data.train.images[:args.train_images].astype(np.float32) / np.float32(255))
    test = torch.from_numpy(data.test.floats())
    steps = -(-len(train) // defaults.batch_size)
    members: dict[str, list[Member]] = {}
    for name in contenders:
        members[name] = []
        for kind in defaults.models:
            torch.manual_seed(defaults.seed)
            model = build(Architecture(kind=kind, latent_dim=defaults.latent_dim, hidden=defaults.hidden))
            members[name].append(member(kind, model, model, defaults.lr, args.epochs * steps))
    seconds = {name: 0.0 for name in contenders}
    blocks: dict[str, list[float]] = {name: [] for name in contenders}
    print(f"training: {len(train):,} images x {args.epochs} epoch(s), batch {defaults.batch_size}, {args.threads} "
          f"threads, {', '.join(contenders)} alternating in blocks of {args.block} steps", flush=True)
    for epoch in range(args.epochs):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(defaults.seed + epoch))
        for first in range(0, steps, args.block):
            block = range(first, min(first + args.block, steps))
            names = list(contenders)
            for name in names if first // args.block % 2 == 0 else reversed(names):
                precision, lanes = contenders[name]
                started = time.perf_counter()
                lanes.map(lambda m: train_steps(m, train, order, defaults.batch_size, block, precision), members[name])
                elapsed = time.perf_counter() - started
                seconds[name] += elapsed
                blocks[name].append(elapsed)
            print(f"  epoch {epoch + 1} step {block.stop}/{steps}: "
                  + " ".join(f"{name} {t:.1f}s" for name, t in seconds.items()) + f" (load {load_average()})",
                  flush=True)
    print(f"\nTRAINING  (load average {load_average()})")
    print(f"{'contender':13s} {'s/epoch':>9s} {'x fp32':>7s}   " + "   ".join(
        f"{m.name} test bce / total" for m in members["fp32"]))
    for name, (_, lanes) in contenders.items():
        metrics = lanes.map(lambda m: evaluate(m.model, test), members[name])
        print(f"{name:13s} {seconds[name] / args.epochs:9.1f} {seconds[name] / seconds['fp32']:7.2f}   "
              + "   ".join(f"{r['test_bce']:7.2f} / {r['test_loss']:7.2f}" for r in metrics), flush=True)
    for label, a, b in (("bf16/fp32", "bf16", "fp32"), ("side by side/in turn, bf16", "bf16", "bf16 in turn")):
        ratios = [x / y for x, y in zip(blocks[a], blocks[b])]
        print(f"{label} per block: median {statistics.median(ratios):.2f}, quartiles "
              f"{np.percentile(ratios, 25):.2f}-{np.percentile(ratios, 75):.2f} over {len(ratios)} blocks")
    side_by_side.close()


def bench_decoding(data: Any, args: argparse.Namespace) -> None:
    from aevae.inference import LoadedModel
    from aevae.onnx_export import decode_quality
    from aevae.store import ModelStore

    stores = {"fp32 onnx": ModelStore(args.models_dir, runtime="onnx", threads=args.threads),
              "fp32 torch": ModelStore(args.models_dir, runtime="torch", threads=args.threads),
              "bf16 torch": ModelStore(args.models_dir, precision="bf16", threads=args.threads),
              "int8 onnx": ModelStore(args.models_dir, precision="int8", threads=args.threads)}
    models: dict[str, LoadedModel] = {}
    for name, store in stores.items():
        try:
            models[name] = store.get(args.model)
        except Exception as exc:  # noqa: BLE001 - a missing graph: say so, measure the rest
            print(f"  {name}: not measured ({exc})")
    first = next(iter(models.values()))
    if models.get("int8 onnx") is not None and models["int8 onnx"].runtime.precision != "int8":  # type: ignore[attr-defined]
        print(f"  {first.name}/{first.number} has no int8 decoder: add it with `aevae export-onnx`")
        del models["int8 onnx"]
    print(f"\ndecoding {first.name}/{first.number} ({first.manifest.training.get('precision', 'fp32')}-trained): "
          f"{args.decode_rows:,} latents per call, {args.reps} alternating repetitions, {args.threads} threads",
          flush=True)
    z = np.random.default_rng(0).normal(size=(args.decode_rows, first.latent_dim)).astype(np.float32)
    out = np.empty((args.decode_rows, *first.image_shape), np.float32)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        model.decode(z[:4096], out=out[:4096])  # warm-up
    for rep in range(args.reps):
        for name, model in (list(models.items()) if rep % 2 == 0 else list(reversed(models.items()))):
            started = time.perf_counter()
            model.decode(z, out=out)
            rates[name].append(len(z) / (time.perf_counter() - started))
    encoder = models.get("fp32 onnx") or first

    def decoder(model: LoadedModel) -> Callable[[np.ndarray], np.ndarray]:
        return lambda latents: model.decode(latents)

    quality = decode_quality(data.test.floats(), lambda x: encoder.encode(x),
                             {name: decoder(model) for name, model in models.items()})
    base_rate = statistics.median(rates.get("fp32 onnx") or next(iter(rates.values())))
    base = quality.get("fp32 onnx") or next(iter(quality.values()))
    print(f"\nDECODING  (load average {load_average()}; test set {len(data.test.images):,} images, nats per image)")
    print(f"{'precision':12s} {'images/s':>10s} {'x fp32':>7s} {'test bce':>9s} {'cost':>6s} {'neg. ELBO':>10s}")
    for name in models:
        rate = statistics.median(rates[name])
        q = quality[name]
        print(f"{name:12s} {rate:10,.0f} {rate / base_rate:7.2f} {q['bce']:9.2f} {q['bce'] - base['bce']:+6.2f} "
              f"{q['loss'] if first.variational else float('nan'):10.2f}")
    print("(the AE has no ELBO; its 'neg. ELBO' column is blank. cost = test BCE minus fp32 onnx's.)"
          if not first.variational else "(cost = test BCE minus fp32 onnx's; neg. ELBO = BCE + KL, one posterior "
                                        "sample, seed 1234)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    shared = Path(__file__).resolve().parents[2] / "shared" / "datasets"  # these machines' copy, beside the clone
    parser.add_argument("--data-root", default=None,
                        help=f"folder holding MNIST/raw/ (default: AEVAE_DATA_ROOT, else {shared} if it is there)")
    parser.add_argument("--models-dir", default=None, help="model repository to decode with (default ./models)")
    parser.add_argument("--model", default="vae", help="the model decoded (newest version)")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs per precision")
    parser.add_argument("--train-images", type=int, default=60_000)
    parser.add_argument("--block", type=int, default=10, help="training steps per alternating block")
    parser.add_argument("--decode-rows", type=int, default=200_000, help="latents per decoding call")
    parser.add_argument("--reps", type=int, default=6, help="decoding repetitions per precision")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decoding", action="store_true")
    args = parser.parse_args(argv)

    from aevae import mnist

    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)", flush=True)
    try:
        fallback = shared if shared.is_dir() else None
        data = mnist.load(args.data_root or os.environ.get(mnist.DATA_ROOT_ENV) or fallback)
    except mnist.MnistError as exc:
        print(f"bench_precision: {exc}", file=sys.stderr)
        return 2
    if not args.skip_decoding:
        bench_decoding(data, args)
    if not args.skip_training:
        bench_training(data, args)
    print(f"\nload average at the end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
