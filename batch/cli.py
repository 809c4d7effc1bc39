"""`aevae decode-batch` and `aevae encode-batch`: argument parsing here; Ray, torch and pyarrow load when a
command runs."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

from aevae.services.settings import PORTS  # stdlib only

# Ranges such as -3:3:11 start with "-": without this, argparse would take them for options.
_VALUES = re.compile(r"^-[0-9.]")
MIN_CPUS = 1e-4  # Ray's unit of resources: a smaller --cpus-per-worker is refused by Ray itself
log = logging.getLogger(__name__)

EPILOG_DECODE = """examples:
  aevae decode-batch --prior 1000000 --seed 0 --output out/prior            # Ray Data on this machine
  aevae decode-batch --grid=-3:3:21 --model ae --output out/grid --format png
  aevae decode-batch --input z.npy --output out/z --decoder 10.0.0.1:50052,10.0.0.2:50052
  aevae decode-batch --traverse=-3:3:9 --prior 10 --output out/traversals --address auto
A rerun of the same command resumes: finished shards are skipped."""

EPILOG_ENCODE = """examples:
  aevae encode-batch --mnist test --output out/test-latents
  aevae encode-batch --input images.npy --output out/latents --encoder 10.0.0.1:50051,10.0.0.2:50051"""


def _common(p: argparse.ArgumentParser, service: str, port: int) -> None:
    p.add_argument("--output", "-o", required=True, metavar="DIR",
                   help="folder for the shards (created; a rerun of the same job resumes in it)")
    p.add_argument("--model", default="vae", help="model name (default vae)")
    p.add_argument("--version", type=int, default=None, help="model version (default: the newest, pinned for "
                   "the whole job)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N input rows")
    p.add_argument("--shard-size", type=int, default=65536, metavar="ROWS",
                   help="rows per output file and per unit of work and retry (default 65536)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what --output holds when it is another job (default: refuse)")
    p.add_argument("--verify", action="store_true",
                   help="on a rerun, read every finished shard whole (checksums) and make the damaged ones again "
                   "(default: a shard whose index is whole counts as done)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress line")
    ray = p.add_argument_group("engine: Ray Data (the default)")
    ray.add_argument("--models-dir", default=None,
                     help="model repository (or AEVAE_MODELS_DIR; default ./models); on a cluster, a path every "
                     "node sees")
    ray.add_argument("--address", default=None,
                     help="an existing Ray cluster (auto, or ray://head:10001); default: a local Ray")
    ray.add_argument("--workers", type=int, default=None,
                     help="actors holding the model (default: the cluster's CPUs / --cpus-per-worker)")
    ray.add_argument("--cpus-per-worker", type=float, default=1.0,
                     help="CPUs (and the model runtime's threads) per actor")
    fleet = p.add_argument_group(f"engine: running {service} services")
    fleet.add_argument(f"--{service}", default=None, metavar="HOST:PORT[,HOST:PORT...]",
                       help=f"use these {service} replicas (a list, or dns:///NAME:{port} for every address of "
                       "a name) instead of Ray; the client spreads each shard over all of them")
    fleet.add_argument("--concurrency", type=int, default=2, help="shards in flight at once (default 2)")
    fleet.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                       help="deadline per request message of up to 4,096 rows: a call streaming N rows may take "
                       "ceil(N / 4096) x SECONDS, whatever --shard-size is (default 60)")
    from aevae.client.cli import add_security_arguments

    add_security_arguments(p)  # how the fleet engine reaches TLS or token-protected services


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("decode-batch", help="decode millions of latents to images: Ray Data or a decoder fleet",
                       epilog=EPILOG_DECODE, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = d.add_argument_group("input (one of)")
    src.add_argument("--input", "-i", default=None, metavar="FILE",
                     help="latents: .npy or .npz (N x latent_dim), or Parquet (a file or a folder of them)")
    src.add_argument("--grid", default=None, metavar="LO:HI:STEPS[,...]",
                     help="every point of a grid: one range for all dimensions or one per dimension "
                     "(write --grid=-3:3:11)")
    src.add_argument("--prior", type=int, default=None, metavar="N", help="N samples from N(0, I)")
    src.add_argument("--traverse", default=None, metavar="LO:HI:STEPS",
                     help="sweep each dimension over the range, around the origin, --prior N samples or --input")
    src.add_argument("--seed", type=int, default=0, help="seed of --prior: a whole number from 0 up (default 0)")
    src.add_argument("--scale", type=float, default=1.0,
                     help="standard deviation of --prior, at most 1000 (default 1)")
    src.add_argument("--key", default=None, help="the array of a .npz input")
    src.add_argument("--column", default=None, help="the Parquet column (default latent; or z0,z1,... scalars)")
    out = d.add_argument_group("output")
    out.add_argument("--format", choices=("parquet", "npz", "png"), default="parquet",
                     help="parquet (default), npz shards, or folders of PNG files")
    out.add_argument("--image-format", choices=("raw", "png"), default="raw",
                     help="Parquet image column: raw uint8 pixels (default, fastest) or PNG bytes")
    d.add_argument("--precision", choices=("fp32", "bf16", "int8"), default=None,
                   help="decoding precision: fp32 (default), int8 (ONNX Runtime over the version's "
                   "decoder.int8.onnx, the fastest) or bf16 (torch); each one's measured test-set cost is in the "
                   "version's manifest. With --decoder, the services' own --precision decides (checked if given)")
    _common(d, "decoder", PORTS["decoder"])
    d._negative_number_matcher = _VALUES
    d.set_defaults(func=run, op="decode")

    e = sub.add_parser("encode-batch", help="encode many images to latents: Ray Data or an encoder fleet",
                       epilog=EPILOG_ENCODE, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = e.add_argument_group("input (one of)")
    src.add_argument("--input", "-i", default=None, metavar="FILE",
                     help="images: .npy or .npz (N x H x W, uint8 or float in [0, 1]), or Parquet (PNG bytes, "
                     "raw pixels or pixel lists, e.g. a decode-batch output)")
    src.add_argument("--mnist", choices=("train", "test", "all"), default=None,
                     help="the MNIST files, with their labels (see --data-root)")
    src.add_argument("--data-root", default=None, help="folder holding MNIST/raw/ (or AEVAE_DATA_ROOT)")
    src.add_argument("--key", default=None, help="the array of a .npz input")
    src.add_argument("--column", default=None, help="the Parquet column (default image)")
    out = e.add_argument_group("output")
    out.add_argument("--format", choices=("parquet", "npz"), default="parquet", help="parquet (default) or npz")
    _common(e, "encoder", PORTS["encoder"])
    e.set_defaults(func=run, op="encode", image_format="raw", precision=None)  # encoding is always float32


def _given(chosen: list[str]) -> str:
    """The inputs a job was given, for the message refusing none or several."""
    return "none given" if not chosen else "given " + " and ".join(f"--{name}" for name in chosen)


def source_from_args(args: argparse.Namespace, latent_dim: int, image_shape: tuple[int, int]):
    """The input the flags describe, checked against the model's shapes (UserError before any work)."""

    from aevae.batch import sources
    from aevae.batch.job import check_size
    from aevae.errors import UserError, require_positive

    def file_source(field: str):
        path = args.input
        if path.endswith((".npy", ".npz")):
            return sources.ArrayFile(path, field, key=args.key)
        if path.endswith(".parquet") or os.path.isdir(path):
            return sources.ParquetFile(path, field, column=args.column)
        raise UserError(f"--input {path}: expected a .npy, .npz or .parquet file (or a folder of .parquet)")

    if args.op == "encode":
        chosen = [f for f in ("input", "mnist") if getattr(args, f) is not None]
        if len(chosen) != 1:
            raise UserError(f"encode-batch takes one input, {_given(chosen)}: --input FILE or --mnist train|test|all")
        source = sources.MnistImages(args.data_root, args.mnist) if args.mnist else file_source("image")
    else:
        chosen = [f for f in ("input", "grid", "prior") if getattr(args, f) is not None]
        if args.traverse is None and len(chosen) != 1:
            raise UserError(f"decode-batch takes one input, {_given(chosen)}: --input FILE, --grid RANGES, --prior N "
                            "or --traverse RANGE")
        if args.traverse is not None and ("grid" in chosen or len(chosen) > 1):
            raise UserError("--traverse sweeps around the origin, --prior N samples or --input latents (one of "
                            "them), not a --grid")
        require_positive("--prior", args.prior)
        if args.grid is not None:
            ranges = [sources.parse_range(r, "--grid") for r in args.grid.split(",")]
            if len(ranges) == 1:
                ranges *= latent_dim
            if len(ranges) != latent_dim:
                raise UserError(f"--grid: the model has {latent_dim} latent dimensions; give one range for all "
                                f"or {latent_dim} ranges, got {len(ranges)}")
            source = sources.Grid(ranges)
        elif args.prior is not None:
            source = sources.Prior(args.prior, args.seed, latent_dim, args.scale)
        else:
            source = file_source("latent") if args.input else None
        if args.traverse is not None:
            source = sources.Traversal(sources.parse_range(args.traverse, "--traverse"), latent_dim, bases=source)
    if args.limit is not None:
        source.rows = min(source.rows, args.limit)
    if source.rows == 0:
        raise UserError("the input holds no rows")
    check_size(source.rows, args.shard_size, image_shape)  # before scanning a file that big
    if source.input_files() and source.rows >= 4 * sources.SCAN_ROWS and not args.quiet:
        # the scan reads the whole file (about 15 s for 250 million latents here): say why nothing else happens
        print(f"{args.op}-batch: checking the input's {source.rows:,} rows before the job starts ...",
              file=sys.stderr, flush=True)
    source.check(latent_dim, image_shape)
    return source


def root_cause(exc: BaseException, limit: int = 300) -> str:
    """`Type: message` of the innermost cause of `exc`, on one line: a Ray task's error wraps the worker's
    exception (`.cause`, or `__cause__` through Ray Data's UserCodeException) in text that holds the remote
    traceback, which is no message for a user."""
    seen = {id(exc)}
    while True:
        inner = getattr(exc, "cause", None)
        inner = inner if isinstance(inner, BaseException) else exc.__cause__
        if inner is None or id(inner) in seen:
            break
        seen.add(id(inner))
        exc = inner
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def check_flags(args: argparse.Namespace) -> None:
    """Every numeric flag, before anything runs (no model loaded, no service asked, no Ray, no file written):
    a value no shard could use fails here in one line, not in a worker's traceback after the job started."""
    from aevae.batch.sources import check_prior
    from aevae.errors import UserError, check_cpus, require_positive

    for name in ("output", "input", "models_dir", "data_root"):
        # An empty path is the current folder: `--output "$OUT"` with OUT unset wrote the job's shards there.
        value = getattr(args, name, None)
        if value is not None and not value.strip():
            raise UserError(f"--{name.replace('_', '-')} is empty; name a folder or file (. for the current folder)")
    for name in ("shard_size", "limit", "workers", "cpus_per_worker", "concurrency", "timeout", "version", "scale",
                 "prior"):
        require_positive("--" + name.replace("_", "-"), getattr(args, name, None))
    if args.op == "decode":
        check_prior(args.seed, args.scale)
    if args.cpus_per_worker < MIN_CPUS:  # Ray refuses such actors only once it has started, with a traceback
        raise UserError(f"--cpus-per-worker must be at least {MIN_CPUS:g} (Ray's smallest share of a CPU), got "
                        f"{args.cpus_per_worker:g}")
    service = "decoder" if args.op == "decode" else "encoder"
    if not getattr(args, service) and not args.address and not os.environ.get("RAY_ADDRESS"):
        # A local Ray has this machine's CPUs at most; Ray would otherwise wait for them without a word
        # (run_ray checks again against what Ray reports).
        check_cpus("--workers", args.workers or 1, args.cpus_per_worker, float(os.cpu_count() or 1), None)


def build(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(job, the engine's client or None, flag of the fleet) from the flags; every check before any work."""
    from aevae.batch import model as models
    from aevae.batch.job import Job, fleet_model, started_version
    from aevae.batch.sinks import Sink
    from aevae.client.cli import security_options
    from aevae.errors import UserError

    check_flags(args)
    security = security_options(args)
    if args.version is None and not args.overwrite:
        args.version = started_version(Path(args.output), args.op, args.model)
        if args.version is not None and not args.quiet:
            print(f"{args.op}-batch: resuming on {args.model}/{args.version}, the version this job started with "
                  "(--version to choose another, with --overwrite to start over)", file=sys.stderr, flush=True)
    service = "decoder" if args.op == "decode" else "encoder"
    targets = getattr(args, service)
    client = None
    if targets:
        if args.address or args.models_dir:
            raise UserError(f"--{service} runs the job on running services; --address and --models-dir are for "
                            "the Ray engine")
        from aevae.client import AevaeError, DecoderClient, EncoderClient

        cls = DecoderClient if service == "decoder" else EncoderClient
        try:
            client = cls(targets, timeout=args.timeout, **security)
        except AevaeError as exc:  # a target that is not host:port, a name that does not resolve
            raise UserError(f"--{service} {targets}: {exc.details()}") from None
        try:
            ref = fleet_model(client, f"--{service}", args.model, args.version, args.precision)
            source = source_from_args(args, ref.latent_dim, ref.image_shape)
        except BaseException:
            client.close()
            raise
    else:
        if security:
            given = ", ".join(f"--{name.replace('_', '-')}" for name in security)
            raise UserError(f"{given}: how to reach running services, which --{service} names; the Ray engine "
                            "reads the model repository itself")
        ref = models.resolve(args.models_dir, args.model, args.version, args.precision or "fp32")
        source = source_from_args(args, ref.latent_dim, ref.image_shape)
    meta = {"op": args.op, "model": ref.describe()}
    sink = Sink(args.output, args.format, args.image_format, meta, id_digits=max(6, len(str(source.rows - 1))))
    return Job(args.op, ref, source, sink, shard_size=args.shard_size), client, service


def run(args: argparse.Namespace) -> int:
    from aevae.batch.job import finish, on_disk, prepare, run_fleet, run_ray
    from aevae.batch.progress import Progress, duration
    from aevae.errors import UserError

    label = f"{args.op}-batch"

    def say(line: str) -> None:
        if not args.quiet:
            print(f"{label}: {line}", file=sys.stderr, flush=True)

    job, client, service = build(args)
    try:
        plan = prepare(job, overwrite=args.overwrite, note=say, verify=args.verify)
    except BaseException:
        if client is not None:
            client.close()
        raise
    where = f"{len(client.targets)} {service} replica(s)" if client else "Ray Data"
    again = ([f"{plan.redone} made again: their input rows changed"] if plan.redone else []) + \
        ([f"{plan.damaged} made again: damaged"] if plan.damaged else [])
    redone = f" ({'; '.join(again)})" if again else ""
    precision = f" in {job.model.precision}" if job.model.precision != "fp32" else ""
    say(f"{job.rows:,} rows of {job.model.name}/{job.model.number}{precision} in {job.shards:,} shards of {job.shard_size:,} -> "
        f"{job.sink.root} ({job.sink.format}); {plan.skipped_shards:,} shards done before{redone}; on {where}")
    progress = Progress(label, job.rows, job.shards, plan.skipped_rows, plan.skipped_shards, quiet=args.quiet)
    # The engines return only once the shards they were running have ended or been cancelled (a cluster named
    # by --address aside), so the shards counted on disk after a stop are what the next run will find.
    still = (" so far (workers on the cluster may still finish the shards they hold)"
             if client is None and (args.address or os.environ.get("RAY_ADDRESS")) else "")
    try:
        try:
            if client is not None:
                with client:
                    run_fleet(job, plan, progress, client, concurrency=args.concurrency, timeout=args.timeout)
            else:
                run_ray(job, plan, progress, address=args.address, workers=args.workers,
                        cpus_per_worker=args.cpus_per_worker)
        except BaseException:
            # Every writer of ours has ended by now (not so on a named cluster, or on a Ray this process did not
            # start and so did not stop): what a writer cut off left, a hidden temporary, goes now rather than at
            # the next run, which may never come.
            ray = sys.modules.get("ray")
            if not still and (client is not None or ray is None or not ray.is_initialized()):
                with contextlib.suppress(OSError):
                    job.sink.clean()
            raise
    except KeyboardInterrupt:
        progress.close()
        print(f"{label}: interrupted; {on_disk(job):,} of {job.shards:,} shards are on disk{still}. Run the same "
              "command again to resume.", file=sys.stderr)
        raise
    except UserError as exc:  # bad data in a shard, a missed deadline: the message says what to change
        progress.close()
        raise UserError(f"{exc} ({on_disk(job):,} of {job.shards:,} shards are on disk{still} and kept)") from None
    except Exception as exc:  # noqa: BLE001 - a worker's failure: say what is kept and how to go on
        progress.close()
        # Ray's exceptions carry the worker's whole traceback in their text: the message names the root cause
        # in one line, and --log-level DEBUG shows the rest.
        log.debug("the job failed", exc_info=exc)
        raise UserError(f"the job failed with {on_disk(job):,} of {job.shards:,} shards on disk{still} "
                        f"({root_cause(exc)}). Finished shards are kept; run the same command again to resume "
                        f"(aevae --log-level DEBUG {label} ... shows the workers' traceback).") from exc
    progress.close()
    summary = progress.summary()
    finish(plan, summary, "fleet" if client else "ray")
    say(f"wrote {summary['rows']:,} rows ({plan.skipped_rows:,} done before) in {duration(summary['seconds'])}: "
        f"{summary['items_per_s']:,.0f} items/s, {summary['bytes'] / 1e6:,.1f} MB -> {job.sink.root}")
    return 0
