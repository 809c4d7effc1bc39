"""The per-worker training loop that Ray Train runs: shard, train one epoch, evaluate, report, checkpoint.

Both models (AE and VAE) train in the same loop on the same batches: one Ray Train run, one start-up cost,
and the two models see identical data in identical order, which is what a fair AE/VAE comparison wants.
They train side by side, each in its own thread on its own share of the cores (`Lanes`), rather than one
after the other on all of them: a step of these small layers does not keep two cores busy (one thread of
the pair idled ~20 % of the time, every operation ends at a barrier, and a preempted thread stalls both),
while two independent steps do: 0.85x the epoch time in Ray Train, 0.92x in a plain process (README,
Reduced precision).
Data arrive as uint8 arrays through Ray's object store and stay in memory as one float tensor; each epoch is
a seeded permutation that every worker draws alike and slices by rank, so the global batch and the order of
samples do not depend on the number of workers.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from aevae.models import Architecture, Autoencoder, build, loss_terms, reparameterize

T = TypeVar("T")
CHECKPOINT_FILE = "state.pt"
EVAL_SEED = 1234
# Test images evaluated after each epoch but the last, for the progress line: a trend, at a fifth of the
# cost of the whole test set (about 1 s per epoch in float32 on 2 cores). The last epoch, whose figures go
# into the manifest, is evaluated on all of them.
PROGRESS_TEST_IMAGES = 2000


@dataclass
class Member:
    """One model under training and what steps it."""

    name: str
    model: Autoencoder  # the plain module: what is saved and evaluated
    wrapped: torch.nn.Module  # the DDP wrapper when there are several workers
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def autocast(precision: str) -> torch.autocast:
    """The forward pass's precision: bf16 runs the linear layers in bfloat16 on CPU (AVX-512 BF16 where the
    processor has it); fp32 leaves everything in float32. Backward follows the forward's dtypes."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def evaluate(model: Autoencoder, images: torch.Tensor, batch: int = 2000) -> dict[str, float]:
    """Test metrics in nats per image; the VAE's with one posterior sample drawn from a fixed seed. Always in
    float32, whatever the training precision: the figures compare across precisions."""
    generator = torch.Generator().manual_seed(EVAL_SEED)
    bce_sum = kl_sum = 0.0
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            x = images[start:start + batch]
            mu, logvar = model.encode(x)
            z = mu if logvar is None else reparameterize(mu, logvar, generator)
            bce, kl = loss_terms(model.decode_logits(z), x, mu, logvar)
            bce_sum += bce.item()
            kl_sum += kl.item()
    model.train()
    n = len(images)
    return {"test_bce": bce_sum / n, "test_kl": kl_sum / n, "test_loss": (bce_sum + kl_sum) / n}


def finite(model: Autoencoder) -> bool:
    """Whether every weight of `model` is a finite number. Once one is nan or inf (a learning rate far too
    high), every later step is too: a run that diverged trained on to its last epoch (15 by default, minutes)
    only to be told at the end that it diverged. Alike on every rank (DDP averages the gradients, nan
    included), so all workers stop after the same epoch."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def train_step(m: Member, x: torch.Tensor, precision: str) -> torch.Tensor:
    """One optimizer step of one model on the batch `x`; returns the mean loss per image (detached)."""
    with autocast(precision):
        logits, mu, logvar = m.wrapped(x)
    # the loss in float32 (a no-op in fp32): sums over 1,024 pixels x 256 images need its mantissa
    bce, kl = loss_terms(logits.float(), x, mu.float(), None if logvar is None else logvar.float())
    loss = (bce + kl) / len(x)
    m.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    m.optimizer.step()
    m.scheduler.step()
    return loss.detach()


def train_steps(m: Member, images: torch.Tensor, order: torch.Tensor, batch: int, steps: range,
                precision: str) -> torch.Tensor:
    """Steps `steps` of one model's epoch, step s on the images `order[s * batch:(s + 1) * batch]`; returns
    the loss summed over their images (detached)."""
    total = torch.zeros(())
    for step in steps:
        x = images[order[step * batch:(step + 1) * batch]]
        if len(x) == 0:  # a shard can be one batch shorter; DDP needs every rank to step
            x = images[order[:batch]]
        total += train_step(m, x, precision) * len(x)
    return total


class Lanes:
    """Runs a function over the models, side by side when it pays: with `threads` cores and at least one per
    model, each model gets its own thread and `threads // models` of torch's threads (a process-wide setting);
    otherwise they run one after the other with all the threads. Side by side only in a single worker:
    with several, each model's DDP all-reduces must reach the process group in the same order on every
    rank, which two racing threads would not guarantee. Only the VAE draws from torch's global generator
    (its posterior samples), so the runs stay reproducible."""

    def __init__(self, models: int, threads: int, world: int = 1, side_by_side: bool = True):
        self.side_by_side = side_by_side and world == 1 and 1 < models <= threads
        self.threads = threads // models if self.side_by_side else threads
        self.pool = ThreadPoolExecutor(models, thread_name_prefix="aevae-lane") if self.side_by_side else None

    def map(self, fn: Callable[[Member], T], members: Sequence[Member]) -> list[T]:
        torch.set_num_threads(self.threads)  # each time: a benchmark alternates lanes of both kinds
        if self.pool is None:
            return [fn(m) for m in members]
        return list(self.pool.map(fn, members))

    def __enter__(self) -> "Lanes":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def member(name: str, model: Autoencoder, wrapped: torch.nn.Module, lr: float, total_steps: int) -> Member:
    # fused Adam: one kernel over all parameters instead of a loop of small ops (its step measured several
    # times faster here); the parameters and the moments stay float32 in either precision. beta2 0.99 instead
    # of 0.999: the second moment follows the one-cycle schedule's fast changes within ~100 steps instead of
    # ~1,000; over 13 epochs VAE 116.93 against 117.15 nats (docs/measurements.md, Reduced precision).
    optimizer = torch.optim.Adam(wrapped.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)
    # One-cycle: a warm-up then a cosine decay to ~0; measured ~4 nats better than a constant rate here. The
    # warm-up takes 30 % of the steps: over a bf16 run of 15 epochs (beta2 0.999), AE 102.90 and VAE 116.67
    # nats against 103.00 and 116.73 with 20 %.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.3)
    return Member(name, model, wrapped, optimizer, scheduler)


def _to_float(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.array(images, dtype=np.float32)).div_(255.0)


def _restore(members: list[Member]) -> int:
    """Loads the last checkpoint after a failure or for `aevae train --resume`; returns the epoch to start
    from. With torch's global generator restored too (the VAE's posterior samples are its only draws), a run
    that resumes ends exactly where it would have ended without the stop."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)
    for m in members:
        m.model.load_state_dict(state["models"][m.name])
        m.optimizer.load_state_dict(state["optimizers"][m.name])
        m.scheduler.load_state_dict(state["schedulers"][m.name])
    if "rng" in state:  # checkpoints written before it was kept resume with a fresh generator
        torch.set_rng_state(state["rng"])
    return int(state["epoch"]) + 1


def _save(members: list[Member], epoch: int, folder: str) -> ray.train.Checkpoint:
    torch.save({
        "epoch": epoch,
        "models": {m.name: m.model.state_dict() for m in members},
        "optimizers": {m.name: m.optimizer.state_dict() for m in members},
        "schedulers": {m.name: m.scheduler.state_dict() for m in members},
        "rng": torch.get_rng_state(),
    }, os.path.join(folder, CHECKPOINT_FILE))
    return ray.train.Checkpoint.from_directory(folder)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    progress = config.get("progress")  # a ray.util.queue.Queue the driver prints from

    train_images = _to_float(ray.get(config["train_ref"]))
    test_images = _to_float(ray.get(config["test_ref"])) if rank == 0 else None
    per_worker_batch = max(1, config["batch_size"] // world)
    shard_size = math.ceil(len(train_images) / world)
    steps_per_epoch = math.ceil(shard_size / per_worker_batch)

    members = []
    for name, arch_json in config["models"].items():
        torch.manual_seed(config["seed"])  # identical initial weights on every rank and every run
        model = build(Architecture.from_json(arch_json))
        wrapped = ray.train.torch.prepare_model(model) if world > 1 else model
        members.append(member(name, model, wrapped, config["lr"], config["epochs"] * steps_per_epoch))
    start_epoch = _restore(members)
    if start_epoch and rank == 0 and progress is not None:
        progress.put(f"resumed from the checkpoint of epoch {start_epoch}")
    precision = config.get("precision", "fp32")
    with Lanes(len(members), int(config["threads"]), world) as lanes:
        started = time.perf_counter()
        for epoch in range(start_epoch, config["epochs"]):
            epoch_start = time.perf_counter()
            order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(config["seed"] + epoch))
            shard = order[rank::world]
            sums = lanes.map(lambda m: train_steps(m, train_images, shard, per_worker_batch, range(steps_per_epoch),
                                                   precision), members)
            loss_sums = {m.name: total for m, total in zip(members, sums)}
            seconds = time.perf_counter() - epoch_start
            metrics: dict[str, Any] = {"epoch": epoch + 1, "epoch_seconds": seconds,
                                       "images_per_second": len(train_images) / seconds}
            with tempfile.TemporaryDirectory() as folder:
                checkpoint = None
                if test_images is not None:  # rank 0 evaluates and checkpoints
                    last = epoch + 1 == config["epochs"]
                    evaluated = test_images if last else test_images[:PROGRESS_TEST_IMAGES]
                    metrics["test_images"] = len(evaluated)
                    for m, figures in zip(members, lanes.map(lambda m: evaluate(m.model, evaluated), members)):
                        metrics[m.name] = {"train_loss": loss_sums[m.name].item() / len(shard), **figures}
                    checkpoint = _save(members, epoch, folder)
                    eta = (time.perf_counter() - started) / (epoch + 1 - start_epoch) * (config["epochs"] - epoch - 1)
                    metrics["eta_seconds"] = eta
                ray.train.report(metrics, checkpoint=checkpoint)
            if rank == 0 and progress is not None:
                progress.put(metrics)  # after the report, so a printed epoch is a checkpointed epoch
            if not all(finite(m.model) for m in members):
                break  # diverged: the driver says so from these metrics and writes nothing (trainer.job)
