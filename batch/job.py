"""A batch job: rows cut into shards, each shard read, run through the model and written on its own.

    job = Job("decode", model, source, sink, shard_size)
    plan = prepare(job)                 # checks the output folder, finds the shards already done
    run_ray(job, plan) or run_fleet(job, plan, targets)

The shard is the unit of everything: of work (one actor call reads, decodes and writes one shard, so only
shard indices and a few numbers travel through Ray), of memory (a worker holds one shard), of retry (a shard
whose worker dies is run again and rewritten under the same name) and of resumption (a rerun skips the shards
on disk). Shard k holds rows [k * shard_size, (k + 1) * shard_size) of the input, so the output's file order
is the input's order.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from aevae.batch.model import ModelRef
from aevae.batch.progress import Progress
from aevae.batch.sinks import Sink
from aevae.batch.sources import Source
from aevae.errors import InvalidArgument, UserError, check_cpus
from aevae.services import inputs

JOB_FILE = "_aevae_batch.json"
log = logging.getLogger(__name__)


@dataclass
class Job:
    op: str  # "decode" (latents -> images) or "encode" (images -> latents)
    model: ModelRef
    source: Source
    sink: Sink
    shard_size: int = 65536
    # Tests only: {"shard": k, "marker": path}: the worker kills its own process once, right after writing
    # shard k (before reporting it), as a node failure would.
    fault: dict[str, Any] | None = None

    @property
    def rows(self) -> int:
        return self.source.rows

    @property
    def shards(self) -> int:
        return -(-self.rows // self.shard_size)

    def span(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_size
        return start, min(self.rows, start + self.shard_size)

    def describe(self) -> dict[str, Any]:
        """What must match for a rerun into the same output to resume it."""
        return {"op": self.op, "model": self.model.describe(), "input": self.source.describe(), "rows": self.rows,
                "shard_size": self.shard_size, "format": self.sink.format,
                "image_format": self.sink.image_format if self.op == "decode" else None}


@dataclass
class Plan:
    todo: list[int]
    skipped_shards: int
    skipped_rows: int
    job_file: Path
    record: dict[str, Any] = field(default_factory=dict)


def run_shard(job: Job, model: Any, shard: int) -> dict[str, Any]:
    """Reads, runs and writes one shard; `model` has decode(z) -> uint8 images and encode(x) -> (mean, logvar)."""
    t0 = time.perf_counter()
    start, stop = job.span(shard)
    data = job.source.read(start, stop)
    t1 = time.perf_counter()
    ids = np.arange(start, stop, dtype=np.int64)
    if job.op == "decode":
        z = data["latent"]
        try:  # the services' own check: the engines accept the same latents (finite, within LATENT_BOUND)
            inputs.latents(z, job.model.latent_dim, job.model.name, field="latent")
        except InvalidArgument as exc:
            raise UserError(f"shard {shard} (rows {start:,} to {stop - 1:,}): {exc}; row numbers count from the "
                            "shard's first row") from None
        columns = {"id": ids, "latent": z, "image": model.decode(z)}
    else:
        mean, logvar = model.encode(data["image"])
        columns = {"id": ids, "latent": mean}
        if logvar is not None:
            columns["logvar"] = logvar
        if "label" in data:
            columns["label"] = data["label"]
    t2 = time.perf_counter()
    size = job.sink.write(shard, columns)
    t3 = time.perf_counter()
    if job.fault and job.fault.get("shard") == shard:
        marker = Path(job.fault["marker"])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # once per job, whichever worker
        except FileExistsError:
            pass
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return {"shard": shard, "rows": stop - start, "read_s": t1 - t0, "model_s": t2 - t1, "write_s": t3 - t2,
            "bytes": size}


def prepare(job: Job, overwrite: bool = False) -> Plan:
    """Creates the output folder or checks that it holds this same job; lists the shards still to do."""
    root = job.sink.root
    job_file = root / JOB_FILE
    described = job.describe()
    if job_file.exists():
        try:
            previous = json.loads(job_file.read_text())["job"]
        except (OSError, ValueError, KeyError, TypeError):
            previous = None
        if previous != described:
            if not overwrite:
                raise UserError(f"--output {root} holds another job ({_difference(previous, described)}); "
                                f"choose another --output, or pass --overwrite to replace it")
            _remove_parts(root)
    elif root.exists():
        if not root.is_dir():
            raise UserError(f"--output {root} is a file; it must be a folder (new or from this same job)")
        parts = list(root.glob("part-*"))
        if parts and not overwrite:
            raise UserError(f"--output {root} holds {len(parts)} part files of an unknown job; choose another "
                            f"--output, or pass --overwrite to replace them")
        _remove_parts(root)
    root.mkdir(parents=True, exist_ok=True)
    job.sink.clean()
    todo, skipped_rows = [], 0
    for shard in range(job.shards):
        start, stop = job.span(shard)
        if job.sink.done(shard, stop - start):
            skipped_rows += stop - start
        else:
            todo.append(shard)
    record = {"job": described, "status": "running", "shards": job.shards}
    _write_json(job_file, record)
    return Plan(todo=todo, skipped_shards=job.shards - len(todo), skipped_rows=skipped_rows, job_file=job_file,
                record=record)


def finish(plan: Plan, summary: dict[str, Any], engine: str) -> None:
    _write_json(plan.job_file, {**plan.record, "status": "complete", "engine": engine, "last_run": summary})


def _difference(previous: Any, current: dict[str, Any]) -> str:
    if not isinstance(previous, dict):
        return f"its {JOB_FILE} is unreadable"
    keys = [k for k in current if previous.get(k) != current[k]]
    return "it differs in " + ", ".join(keys) if keys else "it differs"


def _remove_parts(root: Path) -> None:
    import shutil

    for entry in list(root.glob("part-*")) + list(root.glob(".part-*")):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (root / JOB_FILE).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


# -- engines ----------------------------------------------------------------------------------------------------

def run_ray(job: Job, plan: Plan, progress: Progress, address: str | None = None, workers: int | None = None,
            cpus_per_worker: float = 1.0, on_shard: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Ray Data: a dataset of shard indices through map_batches(ShardWorker) on a fixed pool of actors that
    each hold the model. Starts a local Ray unless one is running or `address` names a cluster."""
    import ray

    from aevae.batch.worker import ShardWorker

    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, configure_logging=True)
        started = True
    try:
        if not plan.todo:
            return
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts items, Ray's counts shards
        ctx.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.ERROR)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        size = workers or max(1, int(cpus // cpus_per_worker))
        size = min(size, len(plan.todo))
        check_cpus("--workers", size, cpus_per_worker, cpus, address)
        shards = ray.data.from_items([{"shard": s} for s in plan.todo], override_num_blocks=len(plan.todo))
        done = shards.map_batches(
            ShardWorker, fn_constructor_kwargs={"job": job, "threads": max(1, int(cpus_per_worker))},
            batch_size=1, batch_format="numpy", num_cpus=cpus_per_worker,
            # Ray Data's actor defaults do what a shard needs: a dead actor is replaced and the shards it held
            # run again on the pool (max_restarts=-1, max_task_retries=-1); an exception in a shard fails the job.
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2),
        )
        for row in done.iter_rows():
            stats = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            if "error" in stats:  # bad data in a shard (ShardWorker): its message, not a remote traceback
                raise UserError(str(stats["error"]))
            progress.update(stats)
            if on_shard is not None:
                on_shard(stats)
    finally:
        if started:
            ray.shutdown()


class FleetModel:
    """The model behind running services, through the (fan-out) client, pinned to the job's version."""

    def __init__(self, client: Any, ref: ModelRef):
        self.client, self.ref = client, ref

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self.client.decode(latents, model=self.ref.name, version=self.ref.number, dtype="uint8")

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        result = self.client.encode(images, model=self.ref.name, version=self.ref.number)
        return result.mean, result.logvar


def fleet_model(client: Any, flag: str, name: str, number: int | None) -> ModelRef:
    """The model as the fleet serves it (ListModels): shapes and the version to pin; UserError when absent."""
    from aevae.client import AevaeError

    try:
        infos = {m.name: m for m in client.list_models()}
    except AevaeError as exc:
        raise UserError(f"{flag} {client.target}: {exc}") from None
    info = infos.get(name)
    if info is None:
        listed = "; ".join(f"{m.name}: {', '.join(map(str, m.versions))}" for m in infos.values()) or "none"
        raise UserError(f"{flag} {client.target} serves no model {name!r}; available: {listed}")
    if number and number not in info.versions:
        raise UserError(f"{flag} {client.target}: model {name!r} has no version {number}; available: "
                        f"{', '.join(map(str, info.versions))}")
    return ModelRef(name=name, number=number or info.version, kind=info.kind, latent_dim=info.latent_dim,
                    image_shape=tuple(info.image_shape))


def run_fleet(job: Job, plan: Plan, progress: Progress, client: Any, concurrency: int = 2,
              on_shard: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Running services: `concurrency` shards at a time in this process, each decoded (or encoded) through
    the client, which spreads a shard's rows over every replica it was given."""
    model = FleetModel(client, job.model)
    pending = iter(plan.todo)
    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="aevae-batch") as pool:
        running: set[Future] = set()
        try:
            while True:
                while len(running) < concurrency:
                    shard = next(pending, None)
                    if shard is None:
                        break
                    running.add(pool.submit(run_shard, job, model, shard))
                if not running:
                    break
                finished, running = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    stats = future.result()
                    progress.update(stats)
                    if on_shard is not None:
                        on_shard(stats)
        except BaseException:
            for future in running:
                future.cancel()
            raise
