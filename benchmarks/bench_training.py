"""Training epoch time: the aevae trainer (Ray Train, in-memory tensors) against a plain DataLoader loop.

The baseline is what pytorch/examples' vae/main.py does: torchvision's MNIST dataset with a per-sample
transform (Pad + ToTensor) behind a DataLoader, the same model, optimizer and batch size. Both are measured in
this one run and the ratio is printed. Usage:

    .venv/bin/python benchmarks/bench_training.py --data-root ../shared/datasets [--model vae] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from aevae.models import Architecture, build, loss_terms
from aevae.repository import ModelRepository
from aevae.trainer import job
from aevae.trainer.config import TrainConfig


def trainer_epoch_seconds(args: argparse.Namespace) -> float:
    """One epoch through the real job; the worker measures the epoch itself (start-up excluded)."""
    with tempfile.TemporaryDirectory() as models:
        config = TrainConfig(models=(args.model,), epochs=1, batch_size=args.batch_size, data_root=args.data_root,
                             models_dir=models, train_limit=args.limit, storage_path=os.path.join(models, "ray"))
        job.run(config)
        return float(ModelRepository(models).resolve(args.model).manifest["training"]["epoch_seconds"])


def dataloader_epoch_seconds(args: argparse.Namespace) -> float:
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    dataset = datasets.MNIST(args.data_root, train=True, download=False,
                             transform=transforms.Compose([transforms.Pad(2), transforms.ToTensor()]))
    if args.limit:
        dataset = Subset(dataset, range(args.limit))
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=args.loader_workers)
    model = build(Architecture(kind=args.model))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    started = time.perf_counter()
    for x, _ in loader:
        x = x.squeeze(1)
        logits, mu, logvar = model(x)
        bce, kl = loss_terms(logits, x, mu, logvar)
        loss = (bce + kl) / len(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=os.environ.get("AEVAE_DATA_ROOT", "../shared/datasets"))
    parser.add_argument("--model", default="vae", choices=["ae", "vae"])
    parser.add_argument("--batch-size", type=int, default=TrainConfig().batch_size)
    parser.add_argument("--limit", type=int, default=None, help="first N training images (default: all 60,000)")
    parser.add_argument("--loader-workers", type=int, default=0, help="DataLoader worker processes")
    args = parser.parse_args()

    baseline = dataloader_epoch_seconds(args)
    print(f"DataLoader + torchvision transform: {baseline:.1f} s per epoch", flush=True)
    ours = trainer_epoch_seconds(args)
    print(f"aevae trainer (Ray Train, in-memory tensors): {ours:.1f} s per epoch", flush=True)
    print(f"ratio (DataLoader epoch / trainer epoch): {baseline / ours:.2f}x", flush=True)


if __name__ == "__main__":
    main()
