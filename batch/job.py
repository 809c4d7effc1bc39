"""A batch job: rows cut into shards, each shard read, run through the model and written on its own.

    job = Job("decode", model, source, sink, shard_size)
    plan = prepare(job)                 # checks the output folder, finds the shards already done
    run_ray(job, plan) or run_fleet(job, plan, targets)

The shard is the unit of everything: of work (one actor call reads, decodes and writes one shard, so only
shard indices and a few numbers travel through Ray), of memory (a worker holds one shard), of retry (a shard
whose worker dies is run again and rewritten under the same name) and of resumption (a rerun skips the shards
on disk). Shard k holds rows [k * shard_size, (k + 1) * shard_size) of the input, so the output's file order
is the input's order.

Resuming trusts a finished shard only while it is known to come from the input as it is now: the job file names
the input (path, rows: what must match for a rerun to be the same job) and records its files' size and
modification time; when those changed since (a bad row fixed in place), each finished shard's recorded input
digest is compared with the rows the input holds now, and only the shards whose rows changed are made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from aevae.batch.model import ModelRef
from aevae.output import write_whole
from aevae.batch.progress import Progress
from aevae.batch.sinks import SHARD_NAME, TMP_MARK, Sink, shard_entries
from aevae.batch.sources import Source
from aevae import ray_start
from aevae.errors import InvalidArgument, UserError, check_cpus
from aevae.repository import remove_stale
from aevae.services import inputs

JOB_FILE = "_aevae_batch.json"
# The most shards one job may have: each is a file in one folder, a Ray Data block and an entry of the plan, so
# setup and scheduling grow with the count. Far beyond it a job cannot end in any useful time (a --grid of 1,000
# steps in 4 dimensions is 1e12 images, over a petabyte); refused at once instead of hanging in setup.
MAX_SHARDS = 100_000
# The most pixels of images one shard may hold: a worker holds its shard in memory (2 GiB of uint8 pixels here,
# more while the model runs). A bigger --shard-size would fail in the first worker, after the job started.
MAX_SHARD_PIXELS = 1 << 31
log = logging.getLogger(__name__)


def check_size(rows: int, shard_size: int, image_shape: tuple[int, int]) -> None:
    """UserError, naming the limit and what to change, for a job too big to run (MAX_SHARDS, MAX_SHARD_PIXELS).
    Called before the input is scanned and before anything is written or started."""
    pixels = image_shape[0] * image_shape[1]
    biggest = max(1, MAX_SHARD_PIXELS // pixels)  # rows per shard
    shape = "x".join(map(str, image_shape))
    if shard_size > biggest:
        raise UserError(f"--shard-size {shard_size:,}: a worker holds one shard in memory, at most "
                        f"{MAX_SHARD_PIXELS:,} pixels ({biggest:,} images of {shape}); choose a smaller --shard-size")
    shards = -(-rows // shard_size)
    if shards > MAX_SHARDS:
        needed = -(-rows // MAX_SHARDS)
        way = (f"pass --shard-size {needed:,} or more" if needed <= biggest else
               f"a job of {shape} images holds at most {MAX_SHARDS * biggest:,} rows ({MAX_SHARDS:,} shards of "
               f"{biggest:,}): take fewer (--limit, a smaller --grid, --prior or --input) or split the work into "
               "several jobs")
        raise UserError(f"the input's {rows:,} rows make {shards:,} shards of {shard_size:,}, and a job holds at "
                        f"most {MAX_SHARDS:,} shards (files in one folder): {way}")


def input_digest(data: dict[str, np.ndarray]) -> str:
    """A digest of a shard's input rows as read (every array: name, dtype, shape, bytes), written with the
    shard: a rerun after the input file changed compares it with the rows the file holds then."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(data):
        array = np.ascontiguousarray(data[name])
        h.update(f"{name}:{array.dtype.str}:{array.shape};".encode())
        h.update(array.reshape(-1).view(np.uint8).data)  # the bytes, not copied
    return h.hexdigest()


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
    redone: int = 0  # finished shards removed because the input changed under them (their rows differ now)
    damaged: int = 0  # finished shards removed because --verify found them damaged


def run_shard(job: Job, model: Any, shard: int) -> dict[str, Any]:
    """Reads, runs and writes one shard; `model` has decode(z) -> uint8 images and encode(x) -> (mean, logvar)."""
    t0 = time.perf_counter()
    start, stop = job.span(shard)
    where = f"shard {shard} (rows {start:,} to {stop - 1:,})"
    try:
        data = job.source.read(start, stop)
    except (OSError, ValueError, EOFError) as exc:
        # The input was checked whole before the job started; a file removed, truncated or rewritten since then
        # fails here, in a worker, and must reach the user as this line, not as Ray's remote traceback.
        raise UserError(f"{where}: cannot read the input any more ({_reason(exc)}); it changed or disappeared "
                        "after the job started. Restore it and run the same command again to resume") from None
    digest = input_digest(data)
    t1 = time.perf_counter()
    ids = np.arange(start, stop, dtype=np.int64)
    if job.op == "decode":
        z = data["latent"]
        try:  # the services' own check: the engines accept the same latents (finite, within LATENT_BOUND)
            inputs.latents(z, job.model.latent_dim, job.model.name, field="latent")
        except InvalidArgument as exc:
            raise UserError(f"{where}: {exc}; row numbers count from the shard's first row") from None
    try:
        if job.op == "decode":
            columns = {"id": ids, "latent": z, "image": model.decode(z)}
        else:
            mean, logvar = model.encode(data["image"])
            columns = {"id": ids, "latent": mean}
            if logvar is not None:
                columns["logvar"] = logvar
            if "label" in data:
                columns["label"] = data["label"]
    except UserError as exc:  # e.g. the fleet's deadline (FleetModel): which shard, and what to change
        raise UserError(f"{where}: {exc}") from None
    t2 = time.perf_counter()
    try:
        size = job.sink.write(shard, columns, digest)
    except OSError as exc:  # a full disk, a folder made read-only or removed under the job: Sink.write left nothing
        raise UserError(f"{where}: cannot write it into --output {job.sink.root}: {_reason(exc)}; free space (or "
                        "fix the folder) and run the same command again to resume") from None
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


def _reason(exc: BaseException) -> str:
    """What went wrong, on one line: an OSError by its errno's text (pyarrow's own wording, "Error writing bytes
    to file. Detail: [errno 28] ...", hides the reason in its middle) and the file it names."""
    if isinstance(exc, OSError) and exc.errno:
        text = os.strerror(exc.errno) + (f" ({exc.filename})" if exc.filename else "")
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


_HELD: dict[Path, int] = {}  # the output folders this process writes, each locked (flock) for its whole life


def hold(root: Path) -> None:
    """Locks the output folder for this process (flock on the folder itself: the kernel drops it when the
    process ends, however it ends), or UserError when another process holds it. Two jobs on one --output
    were not refused: the second's start removed the first's shard in the making (which then failed with a
    message about free space), or both decoded every row. A process holds a folder once, whatever it runs."""
    import fcntl

    key = root.resolve()
    if key in _HELD:
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(f"--output {root} is being written by another job now (another aevae decode-batch or "
                        "encode-batch holds it); wait for it to end, or choose another --output") from None
    _HELD[key] = fd


def prepare(job: Job, overwrite: bool = False, note: Callable[[str], None] | None = None,
            verify: bool = False) -> Plan:
    """Creates the output folder or checks that it holds this same job; lists the shards still to do.

    "The same job" is `Job.describe()`: the op, the model, the input as named (path and rows, not size or
    modification time), rows, shard size and formats. A folder holding another job is refused when it holds
    shards (what --overwrite would delete); a job file with no shard beside it (a job that failed before its
    first shard) protects nothing and is replaced. When the input's files changed since the job file was
    written, each finished shard is kept only if the digest of the rows it was made from (written with it)
    matches the rows the input holds now: a bad row fixed in place costs the shards around it, no other. Shards
    whose rows changed are removed before the job file records the input as it is now, so that no later run
    can take them for current. Finding the finished shards costs one listing of the folder, not a probe per
    shard, so a job starts at once whatever its size. `verify` reads every finished shard whole
    (`Sink.intact`) and makes the damaged ones again, removing them first so that no later run takes them for
    done. `note` hears what takes a while (those checks)."""
    root = job.sink.root
    job_file = root / JOB_FILE
    described = job.describe()
    stats = _input_stats(job.source)
    own = [path.name for path in job.source.input_files() if path.parent == root and SHARD_NAME.fullmatch(path.name)]
    if own:
        # e.g. --input out --output out: --overwrite removed the input before a worker read it, and without it
        # the shards would be written over the files they are read from
        raise UserError(f"--output {root} holds the input's own files ({', '.join(sorted(own)[:3])}"
                        f"{', ...' if len(own) > 3 else ''}): the job would replace what it reads; choose another "
                        "--output")
    with _output_errors(root):
        if root.exists() and not root.is_dir():
            raise UserError(f"--output {root} is a file; it must be a folder (new or from this same job)")
        if root.is_dir():
            hold(root)  # before anything in it is read or removed
        record = _read_record(job_file)
        parts = job.sink.parts() if root.is_dir() else {}
        held = shard_entries(root) if root.is_dir() else []  # in any format: another job's are not in `parts`
        if record is not None and record.get("job") != described:
            if held and not overwrite:
                raise UserError(f"--output {root} holds another job ({_difference(record.get('job'), described)}) "
                                f"with {len(held)} shards on disk; choose another --output, or pass --overwrite "
                                "to replace it")
            _remove_parts(root)
            record, parts = None, {}
        elif record is None and held:
            if not overwrite:
                raise UserError(f"--output {root} holds {len(held)} part files of an unknown job; choose another "
                                f"--output, or pass --overwrite to replace them")
            _remove_parts(root)
            parts = {}
        root.mkdir(parents=True, exist_ok=True)
        hold(root)
        job.sink.clean()
        # a job file being replaced when its writer was killed (SIGKILL, a power cut)
        remove_stale(root, lambda name: name.startswith(f".{JOB_FILE}{TMP_MARK}"))
    changed = record is not None and record.get("inputs") != stats
    if changed and parts and note is not None:
        note(f"the input changed since the last run: checking the {len(parts)} shards on disk against it")
    if verify and parts and note is not None:
        note(f"--verify: reading the {len(parts)} shards on disk whole")
    done, stale, damaged, undone = set(), [], [], []
    for shard in sorted(s for s in parts if s < job.shards):
        if not job.sink.done(shard, _rows(job, shard)):
            undone.append(shard)  # damaged, or not a shard at all (a folder in a file's place): made again
            continue
        if verify and not _verified(job, shard):
            damaged.append(shard)
        elif changed and not _from_current_input(job, shard):
            stale.append(shard)
        else:
            done.add(shard)
    new_record = {"job": described, "inputs": stats, "status": "running", "shards": job.shards}
    with _output_errors(root):
        for shard in stale + damaged + undone:
            job.sink.remove(shard)
        _write_json(job_file, new_record)
    todo = [shard for shard in range(job.shards) if shard not in done]
    skipped_rows = sum(_rows(job, shard) for shard in done)
    return Plan(todo=todo, skipped_shards=len(done), skipped_rows=skipped_rows, job_file=job_file,
                record=new_record, redone=len(stale), damaged=len(damaged))


def _from_current_input(job: Job, shard: int) -> bool:
    """Whether the shard was made from the rows the input holds there now: the digest written with it."""
    return job.sink.digest(shard) == input_digest(job.source.read(*job.span(shard)))


def _verified(job: Job, shard: int) -> bool:
    """`--verify` of one finished shard: read whole (Sink.intact), the ids its rows, and made from the current
    input's rows (another shard's file copied over it carries its own digest)."""
    return job.sink.intact(shard, *job.span(shard)) and _from_current_input(job, shard)


def on_disk(job: Job) -> int:
    """How many of the job's shards are on disk whole now: what a stopped or failed run leaves for the next one
    (counted, because shards that were running when it stopped may have landed after the last one reported)."""
    try:
        parts = job.sink.parts()
    except OSError:
        return 0
    return sum(1 for shard in parts if shard < job.shards and job.sink.done(shard, _rows(job, shard)))


def _rows(job: Job, shard: int) -> int:
    start, stop = job.span(shard)
    return stop - start


def finish(plan: Plan, summary: dict[str, Any], engine: str) -> None:
    """Records the job complete, with the run's figures. Every shard is on disk by then, so a job file that
    cannot be written (the disk filled with the last shard) is one line saying that they are kept, not a
    traceback after a whole job; a rerun finds them all and records the job again."""
    try:
        _write_json(plan.job_file, {**plan.record, "status": "complete", "engine": engine, "last_run": summary})
    except OSError as exc:
        raise UserError(f"all {plan.record.get('shards', 0):,} shards are on disk and kept, but {plan.job_file} "
                        f"could not be updated ({exc.strerror or exc}); free some space and run the same command "
                        "again to record the job complete") from None


def _difference(previous: Any, current: dict[str, Any]) -> str:
    if not isinstance(previous, dict):
        return f"its {JOB_FILE} is unreadable"
    keys = [k for k in current if previous.get(k) != current[k]]
    return "it differs in " + ", ".join(keys) if keys else "it differs"


def _input_stats(source: Source) -> list[dict[str, Any]]:
    """Size and modification time of each input file: not what identifies the job (a file fixed in place is
    still its input) but what says that the finished shards must be checked against the input again."""
    out = []
    for path in source.input_files():
        try:
            st = path.stat()
        except OSError as exc:
            raise UserError(f"--input {path}: {exc.strerror or exc}") from None
        out.append({"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def started_version(root: Path, op: str, model: str) -> int | None:
    """The version of `model` the job in `root` started with, when its job file names one for this op: a
    rerun without --version resumes on it. "The newest" is pinned for the whole job, so a version written
    since must not make the same command a different job (refused, with "it differs in model")."""
    try:
        record = _read_record(root / JOB_FILE)
    except OSError:  # an output under a file, unreadable: prepare() says so, naming it
        return None
    job = record.get("job") if record else None
    described = job.get("model") if isinstance(job, dict) and job.get("op") == op else None
    if isinstance(described, dict) and described.get("name") == model:
        version = described.get("version")
        return version if isinstance(version, int) and not isinstance(version, bool) and version > 0 else None
    return None


def _read_record(job_file: Path) -> dict[str, Any] | None:
    """The job file's content; None when there is none, {} when it is unreadable (another job's, or damaged)."""
    try:
        text = job_file.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def _output_errors(root: Path) -> Iterator[None]:
    """OSError on the output folder (not writable, under a file, a read-only file system) as one UserError
    naming the folder, not a traceback."""
    try:
        yield
    except OSError as exc:
        reason = "a part of the path is a file" if isinstance(exc, NotADirectoryError) else exc.strerror or str(exc)
        inside = exc.filename is None or Path(exc.filename) == root or root in Path(exc.filename).parents
        raise UserError(f"--output {root}: cannot create or write it: {reason}"
                        f"{'' if inside else f' ({exc.filename})'}") from None


def _remove_parts(root: Path) -> None:
    """Removes a job: its shards in any format, their temporaries and its job file; nothing else of the
    folder (a file that merely starts with part- is not a shard)."""
    import shutil

    for entry in shard_entries(root) + list(root.glob(f".part-*{TMP_MARK}*")):
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    (root / JOB_FILE).unlink(missing_ok=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Writes the job file atomically; a write that fails (a full disk) leaves the old one and no temporary."""
    text = json.dumps(data, indent=2) + "\n"
    write_whole(path, lambda tmp: tmp.write_text(text), tmp=f".{path.name}{TMP_MARK}{os.getpid()}")


# -- engines ----------------------------------------------------------------------------------------------------

def run_ray(job: Job, plan: Plan, progress: Progress, address: str | None = None, workers: int | None = None,
            cpus_per_worker: float = 1.0, on_shard: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Ray Data: a dataset of shard indices through map_batches(ShardWorker) on a fixed pool of actors that
    each hold the model. Starts a local Ray unless one is running or `address` names a cluster."""
    import ray

    from aevae.batch.worker import ShardWorker

    started = stopped = False
    if not ray.is_initialized():
        # "local" unless a cluster is named (--address, RAY_ADDRESS): given None, Ray joins a cluster that
        # `ray start` left on this machine, whose other nodes may not see --output or --models-dir, and which
        # Ctrl-C does not stop (the shards counted on disk would not be final).
        local = address is None and not os.environ.get("RAY_ADDRESS")
        # a stop during the start-up: Terminated or KeyboardInterrupt, nothing of Ray left (aevae.ray_start)
        ray_start.init(address="local" if local else address, include_dashboard=False,
                       logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
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
        rows = iter(done.iter_rows())
        try:
            for row in rows:
                stats = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
                if "error" in stats:  # bad data in a shard (ShardWorker): its message, not a remote traceback
                    raise UserError(str(stats["error"]))
                progress.update(stats)
                if on_shard is not None:
                    on_shard(stats)
        finally:
            _stop_iteration(rows)
    except BaseException as exc:
        stopped = True
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM: another does not cut the shutdown short
            ray_start.stopping()
        raise
    finally:
        if started:
            # Stopped early: wait until this Ray's processes have exited, so that no worker of ours still
            # finishes a shard after the caller counts those on disk (on_disk). A cluster named by --address
            # is not ours to stop: its workers end the shards they hold on their own time.
            ray.shutdown(wait_for_processes=stopped)


# Ray Data's threads that pull a dataset's blocks for its iterator (ray.data._internal.block_batching.util). Its
# "Prefetcher" thread is left alone: once the iteration ends it parks on a condition for good and asks Ray nothing.
_RAY_DATA_ITERATION_THREADS = ("iter_threaded",)


def _stop_iteration(rows: Any, wait_s: float = 5.0) -> None:
    """Closes a Ray Data row iterator and waits (up to `wait_s`) for the threads that fed it to end. Stopped early
    (a failed shard, Ctrl-C) and left open, those threads went on fetching blocks after ray.shutdown(), and Ray's
    core worker then ended the whole process from one of them (exit 1, "The core worker has already been shutdown")
    before the job's message was printed: 1 run in 5 with a model damaged under a running job, here. Matched by
    name, a Ray internal: under a Ray that names them otherwise, this waits for nothing."""
    import threading

    close = getattr(rows, "close", None)
    if close is not None:
        close()
    deadline = time.monotonic() + wait_s
    for thread in threading.enumerate():
        if thread.name in _RAY_DATA_ITERATION_THREADS and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


class FleetModel:
    """The model behind running services, through the (fan-out) client, pinned to the job's version.

    `timeout` is a deadline per request message (the client's `stream_chunk` rows, 4,096 by default), as the
    --timeout flag says: each call gets TIMEOUT x its messages, so the deadline follows the rows a call carries
    and never depends on --shard-size. The client takes one total deadline per call, and a fan-out client gives
    that one value to each span it sends to a replica (`fanout.span_rows` rows), so the deadline is computed
    for the rows of one such call. A deadline missed fails the shard with a message saying what to change."""

    def __init__(self, client: Any, ref: ModelRef, timeout: float | None = None):
        self.client, self.ref, self.timeout = client, ref, timeout

    def deadline(self, rows: int) -> float | None:
        """Seconds for one call carrying `rows` of a batch of `rows` (a span of it, on a fan-out client)."""
        if self.timeout is None:
            return None
        from aevae.client.fanout import span_rows

        chunk = max(1, int(self.client.stream_chunk))
        replicas = len(self.client.targets)
        per_call = span_rows(rows, replicas, chunk) if replicas > 1 and rows > chunk else rows
        return self.timeout * max(1, -(-min(rows, per_call) // chunk))

    def _call(self, call: Callable[[float | None], Any], rows: int) -> Any:
        from aevae.client import AevaeError

        deadline = self.deadline(rows)
        try:
            return call(deadline)
        except AevaeError as exc:
            if not deadline_missed(exc):
                raise
            raise UserError(f"no answer within the deadline (--timeout {self.timeout:g} s per request message "
                            f"of up to {self.client.stream_chunk:,} rows: {deadline:g} s for this call; {exc}). "
                            "Pass a bigger --timeout, or a smaller --concurrency so that each replica has fewer "
                            "requests at once; a rerun resumes") from None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._call(lambda t: self.client.decode(latents, model=self.ref.name, version=self.ref.number,
                                                       dtype="uint8", timeout=t), len(latents))

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        result = self._call(lambda t: self.client.encode(images, model=self.ref.name, version=self.ref.number,
                                                         timeout=t), len(images))
        return result.mean, result.logvar

    def cancel(self) -> None:
        """Ends the calls in flight (closing the client's channels cancels them): a stopped job does not wait
        for the shards it was running, and none of them lands after the job said what is on disk."""
        self.client.close()


def deadline_missed(exc: Any) -> bool:
    """DEADLINE_EXCEEDED, or a fan-out that gave up on replicas that missed it (UNAVAILABLE naming each)."""
    import grpc

    return exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED or "deadline exceeded" in exc.details().lower()


def fleet_model(client: Any, flag: str, name: str, number: int | None, precision: str | None = None) -> ModelRef:
    """The model as the fleet serves it (ListModels): shapes, the version to pin and the decoding precision
    its services run; UserError when absent, or when `precision` is given and is not the one served (a
    client cannot choose it: `aevae serve --precision` does)."""
    from aevae.client import AevaeError
    from aevae.runtimes import precision_of

    try:
        infos = {m.name: m for m in client.list_models()}
    except AevaeError as exc:
        hint = " (pass a bigger --timeout: seconds per request message)" if deadline_missed(exc) else ""
        raise UserError(f"{flag} {client.target}: {exc}{hint}") from None
    for replica in client.replicas:  # ListModels is answered by either service: asked, the health service tells
        if replica.serves() is False:
            other = "encoder" if flag == "--decoder" else "decoder"
            raise UserError(f"{flag}: {replica.target} does not serve aevae.v1.{replica.SERVICE} (perhaps it is "
                            f"the {other}?); name only {flag.removeprefix('--')} services")
    info = infos.get(name)
    if info is None:
        listed = "; ".join(f"{m.name}: {', '.join(map(str, m.versions))}" for m in infos.values()) or "none"
        raise UserError(f"{flag} {client.target} serves no model {name!r}; available: {listed}")
    if number and number not in info.versions:
        raise UserError(f"{flag} {client.target}: model {name!r} has no version {number}; available: "
                        f"{', '.join(map(str, info.versions))}")
    served = precision_of(info.runtime) if flag == "--decoder" else "fp32"  # encoding is always float32
    if flag == "--decoder":
        _check_one_precision(client, name, info.runtime)
    if precision is not None and precision != served:
        raise UserError(f"{flag} {client.target} decodes {name!r} in {served} ({info.runtime}), not {precision}: "
                        f"the services' own --precision chooses it; drop --precision, or run them with "
                        f"--precision {precision}")
    return ModelRef(name=name, number=number or info.version, kind=info.kind, latent_dim=info.latent_dim,
                    image_shape=tuple(info.image_shape), precision=served)


def _check_one_precision(client: Any, name: str, runtime: str) -> None:
    """UserError when the fleet's replicas decode `name` in different precisions (each replica's own `aevae
    serve --precision`): the spans of one batch go to every replica, so its images would mix fp32 and int8
    pixels while the job recorded one precision. Replicas that do not answer now are left to the fan-out
    (it leaves a failing replica out of a call)."""
    from aevae.client import AevaeError
    from aevae.runtimes import precision_of

    if len(client.replicas) < 2:
        return
    runtimes: dict[str, str] = {}
    for replica in client.replicas:
        try:
            runtimes.update({replica.target: m.runtime for m in replica.list_models() if m.name == name})
        except AevaeError:
            continue
    if len({precision_of(r) for r in [runtime, *runtimes.values()]}) > 1:
        served = "; ".join(f"{target}: {precision_of(r)} ({r})" for target, r in runtimes.items())
        raise UserError(f"--decoder: the replicas decode {name!r} in different precisions ({served}), and one "
                        "batch would mix their images; run every replica with the same `aevae serve "
                        "--precision`, or name only the replicas of one precision")


def run_fleet(job: Job, plan: Plan, progress: Progress, client: Any, concurrency: int = 2,
              on_shard: Callable[[dict[str, Any]], None] | None = None, timeout: float | None = 60.0) -> None:
    """Running services: `concurrency` shards at a time in this process, each decoded (or encoded) through
    the client, which spreads a shard's rows over every replica it was given; `timeout`: seconds per request
    message (FleetModel).

    When it stops early (Ctrl-C, a failed shard), the shards not started are dropped and the calls in flight
    are cancelled by closing the client; it returns only after every shard thread has ended, so what is on disk
    then (on_disk) is final."""
    model = FleetModel(client, job.model, timeout)
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
            model.cancel()
            raise
