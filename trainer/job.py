"""The driver of `aevae train`: start or join Ray, run one TorchTrainer for all models, write the versions.

The AE and the VAE train together in one Ray Train run (one start-up, one checkpoint per epoch holding both,
one failure budget), on the same batches; after it finishes, the driver computes each model's latent
statistics over the whole training set and writes a version atomically.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import io
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import torch

import numpy as np

import aevae
from aevae import memory, mnist, onnx_export, ray_start
from aevae.errors import UserError, check_cpus, stop_signal
from aevae.inference import LoadedModel, NonFiniteOutput
from aevae.latent_stats import compute as compute_stats
from aevae.manifest import Manifest, now
from aevae.models import Architecture, Autoencoder, build
from aevae.repository import MANIFEST, STATS, WEIGHTS, FileWriter, ModelRepository, Version, json_writer, sha256_file
from aevae.runtimes import TorchRuntime
from aevae.trainer.config import TrainConfig

# The entropy of MNIST's grey levels per image: what even a perfect reconstruction scores in BCE (brief).
BCE_FLOOR_NATS = 45.5
# In a run's folder under --storage-path: the options it ran with (TrainConfig.run_identity), which `--resume`
# matches; and the file Ray Train restores a run of the same name from (its checkpoint manager's state).
RUN_FILE = "aevae-run.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
# Locked (flock) by the driver whose run the folder is, for as long as it lives: a second `aevae train --resume`
# with the same options (two `aevae up` on one machine) picked the same run, live or stopped, and two drivers
# then trained into one folder. The kernel drops the lock when its process ends, SIGKILL included.
LOCK_FILE = "aevae-run.lock"
# The versions the run has written (name -> [number, its manifest's sha256]): a run stopped while it wrote them,
# resumed, wrote the ones already in place again as new versions of the same weights.
WRITTEN_FILE = "aevae-written.json"
# The training split's size, the most images any run's latent statistics cover (mnist.FILES).
TRAIN_IMAGES = mnist.FILES["train-images-idx3-ubyte"][3]
_claimed: dict[str, int] = {}  # run folder -> the descriptor holding its lock, open while this process lives
MAX_FAILURES = 2
HEALTH_CHECK_INTERVAL = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
ADDRESS_TIMEOUT_S = 10.0
ADDRESS_HELP = ("pass the address of a running cluster (host:port of its head, ray://head:10001, or auto for one "
                "started on this machine with `ray start`), or leave --address out for a local Ray")


def _start_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers' own output stays in Ray's logs; the driver prints one progress line per epoch and model.
    # Ray Train's controller polls its workers every 2 s by default, so a run ends up to 2 s after its last
    # epoch; polling every 0.5 s saved 2.3 s per run here (measured), and a poll costs next to nothing.
    runtime_env = {"env_vars": {"PYTHONUNBUFFERED": "1",
                                HEALTH_CHECK_INTERVAL: os.environ.get(HEALTH_CHECK_INTERVAL, "0.5")}}
    if address:
        _check_reachable(address)
        print(f"connecting to the Ray cluster at {address}", flush=True)
    try:
        if address:
            ray_start.init(address=address, log_to_driver=False, logging_level=logging.ERROR, runtime_env=runtime_env)
        else:
            ray_start.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                           logging_level=logging.ERROR, runtime_env=runtime_env)
    except (ConnectionError, ValueError) as exc:  # "auto" with no cluster; Ray Client's 30 s timeout
        raise UserError(f"cannot connect to the Ray cluster at --address {address}: {exc}; {ADDRESS_HELP}") from None


def _check_reachable(address: str) -> None:
    """Refuses an --address that is no cluster address, or a host:port that does not answer. Given a host and
    port where no Ray listens, ray.init retried for minutes on end (over 9 here) before it gave up; a bad
    form was a ValueError traceback. "auto" and ray:// addresses fail within seconds by themselves."""
    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"--address takes host:port, ray://host:port or auto, got {address!r}")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=ADDRESS_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at --address {address}: {exc.strerror or exc}; "
                        f"{ADDRESS_HELP}") from None


def _eta(seconds: float) -> str:
    """12m05s; past an hour 3h07m, past two days 41d07h: a long run's ETA in minutes alone was unreadable
    (`--epochs 1000000` printed ETA 7364501346m56s)."""
    total = int(round(seconds)) if math.isfinite(seconds) and seconds > 0 else 0
    minutes, secs = divmod(total, 60)
    hours, mins = divmod(minutes, 60)
    days, hrs = divmod(hours, 24)
    if days >= 2:
        return f"{days:,}d{hrs:02d}h"
    if hours:
        return f"{hours}h{mins:02d}m"
    return f"{minutes}m{secs:02d}s"


def _format_progress(message: dict[str, Any] | str, epochs: int) -> list[str]:
    if isinstance(message, str):
        return [message]
    eta = _eta(message["eta_seconds"])
    test = f"test({message['test_images']:,})" if "test_images" in message else "test"
    lines = []
    for name, m in message.items():
        if isinstance(m, dict):
            lines.append(
                f"[{name}] epoch {message['epoch']}/{epochs}  train {m['train_loss']:.2f}  {test} bce "
                f"{m['test_bce']:.2f} kl {m['test_kl']:.2f} total {m['test_loss']:.2f} nats/img  "
                f"{message['images_per_second']:,.0f} img/s  {message['epoch_seconds']:.1f}s/epoch  "
                f"ETA {eta}")
    return lines


def _fit(config: TrainConfig, archs: dict[str, Architecture], refs: dict[str, Any],
         run_name: str) -> tuple[dict, dict]:
    """One Ray Train run for all models; returns (final state_dicts by name, last reported metrics)."""
    import threading

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Empty, Queue

    from aevae.trainer.loop import CHECKPOINT_FILE, train_loop_per_worker

    progress = Queue()
    storage = config.storage_path
    assert storage is not None  # TrainConfig fills in its default
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "models": {name: arch.to_json() for name, arch in archs.items()}, "epochs": config.epochs,
            "batch_size": config.batch_size, "lr": config.lr, "seed": config.seed,
            "threads": config.cpus_per_worker, "precision": config.precision, "progress": progress, **refs,
        },
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=False,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name,
            storage_path=os.path.abspath(storage) if "://" not in storage else storage,
            failure_config=FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the driver's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    epoch_seconds: dict[int, float] = {}  # by epoch: a resumed run reports some epochs twice
    while thread.is_alive() or not progress.empty():
        try:
            message = progress.get(timeout=0.5)
        except Empty:
            continue
        if isinstance(message, dict):
            epoch_seconds[message["epoch"]] = message["epoch_seconds"]
        for line in _format_progress(message, config.epochs):
            print(line, flush=True)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), weights_only=True)
    metrics = dict(result.metrics)
    if epoch_seconds:
        metrics["epoch_seconds"] = sum(epoch_seconds.values()) / len(epoch_seconds)
    metrics["session_epochs"] = len(epoch_seconds)  # fewer than the run's when it was resumed
    return state["models"], metrics


def _resumed(session_epochs: int | None, epochs: int) -> dict[str, Any]:
    """The manifest's word on a run resumed from a checkpoint: which epochs its `seconds` and `epoch_seconds`
    cover (a run resumed after its last epoch recorded 19.6 s having trained none)."""
    if session_epochs is None or session_epochs >= epochs:
        return {}
    return {"resumed": f"resumed from a checkpoint: seconds cover this session, {session_epochs} of the {epochs} "
                       "epochs" + ("" if session_epochs else " (none: it had trained them all before its stop)")}


def _manifest(kind: str, config: TrainConfig, arch: Architecture, data: mnist.Mnist, train_count: int,
              run_metrics: dict, seconds: float) -> Manifest:
    metrics = run_metrics[config.target_name(kind)]
    return Manifest(
        kind=kind,
        latent_dim=arch.latent_dim,
        image_shape=arch.image_shape,
        architecture=arch.to_json(),
        training={**config.without_places(),
                  "optimizer": "adam, one-cycle lr", "seconds": round(seconds, 1),
                  "epoch_seconds": round(run_metrics["epoch_seconds"], 2),  # the mean over the epochs
                  # only when it is so: a run of one model (--models ae) said that the AE and the VAE trained
                  **({"note": "the AE and the VAE train together, so seconds cover both"}
                     if len(config.models) > 1 else {}),
                  # a resumed run's seconds are this session's alone: said, rather than passed off as the run's
                  **_resumed(run_metrics.get("session_epochs"), config.epochs)},
        data={"dataset": "MNIST", "source": data.source, "sha256": data.sha256,
              "train_images": train_count, "test_images": len(data.test.images),
              "preprocessing": "28x28 zero-padded to 32x32, scaled to [0, 1]"},
        metrics={
            "test_bce": round(metrics["test_bce"], 4), "test_kl": round(metrics["test_kl"], 4),
            "test_loss": round(metrics["test_loss"], 4), "train_loss": round(metrics["train_loss"], 4),
            "bce_floor": BCE_FLOOR_NATS, "test_bce_excess": round(metrics["test_bce"] - BCE_FLOOR_NATS, 4),
            "units": "nats per image; test_loss is BCE + KL (the negative ELBO for the VAE)",
        },
        created=now(),
        packages={"aevae": aevae.__version__, "torch": torch.__version__, "python": platform.python_version()},
    )


def _finite(value: Any) -> bool:
    """A loss that is a finite number. A run resumed after its last epoch reports the metrics Ray Train kept in
    its snapshot, where a nan was written as null: None is a diverged loss too, not a TypeError."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def version_bytes(arch: Architecture) -> int:
    """About how many bytes a version of `arch` takes on disk: float32 weights, about as much again in the two
    ONNX graphs, the int8 decoder (a byte per decoder weight), and at most 1 MiB of manifest and statistics.
    Measured: 29.3 MB for the default architecture, estimated 31.8. Counted, not built: a model as wide as
    --hidden allows would take gigabytes just to be measured."""
    encoder, decoder = arch.parameters()
    weights = encoder + decoder
    return 8 * weights + decoder + (1 << 20)


def training_bytes(parameters: int, precision: str) -> int:
    """The least memory one worker needs to train models of `parameters` in all, side by side: per parameter its
    float32 weight and gradient and Adam's two moments (16 bytes), and with bf16 the weight's and the gradient's
    bfloat16 copies (4 more). A floor, not an estimate: measured, a step and a checkpoint of 4096-wide models
    took about 30 bytes per parameter, so a run this refuses could never have run, and one it lets through may
    still need more."""
    return (16 + (4 if precision == "bf16" else 0)) * parameters


def _check_memory(config: TrainConfig, archs: dict[str, Architecture]) -> None:
    """Refuses, before MNIST is read or Ray starts, a local run whose workers could not hold their models: it
    would end in the kernel's out-of-memory killer, which may pick any process of the machine."""
    parameters = sum(sum(arch.parameters()) for arch in archs.values())
    problem = memory.shortfall(config.num_workers * training_bytes(parameters, config.precision))
    if problem:
        workers = f"{config.num_workers} workers, each" if config.num_workers > 1 else "one worker"
        raise UserError(f"the models of --hidden {','.join(map(str, config.hidden))} --latent-dim {config.latent_dim} "
                        f"have {parameters:,} parameters, and training them needs at least {problem} ({workers} "
                        "holding the weights, gradients and Adam's state of every one); pass narrower --hidden "
                        "layers, fewer --models or fewer --num-workers")


def statistics_bytes(latent_dim: int, images: int) -> int:
    """The least memory the driver needs for one model's latent statistics after training: the encoder's means
    and log-variances over `images` training images (float32, 8 bytes per value), the PCA's float64 copy and
    its centred copy (16 more), and its latent_dim x latent_dim covariance, product and eigenvectors (float64,
    24 bytes per entry). The models' statistics are computed one after the other, so one model's is the need."""
    return 24 * images * latent_dim + 24 * latent_dim * latent_dim


def _check_statistics_memory(config: TrainConfig) -> None:
    """Refuses, before MNIST is read or Ray starts, a --latent-dim whose latent statistics this machine could not
    compute: `--latent-dim 65536` trained (its layers fit the workers) and then failed after the whole run in
    the PCA's 32 GiB covariance, a numpy traceback and exit 1, with nothing written."""
    images = min(config.train_limit or TRAIN_IMAGES, TRAIN_IMAGES)
    problem = memory.shortfall(statistics_bytes(config.latent_dim, images))
    if problem:
        raise UserError(f"the latent statistics of --latent-dim {config.latent_dim} over {images:,} training images, "
                        f"computed on this machine after training, need at least {problem}; pass a smaller "
                        "--latent-dim (or a smaller --train-limit)")


def weights_writer(state: dict[str, torch.Tensor]) -> FileWriter:
    """A writer of weights.pt that serializes in memory first: torch.save straight into a file on a full disk
    failed with torch's own "[enforce fail at inline_container.cc] unexpected pos", where writing the bytes gives
    the OSError (No space left on device) that the trainer reports in one line."""

    def write(path: Path) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        path.write_bytes(buffer.getbuffer())

    return write


def write_version(repository: ModelRepository, name: str, manifest: Manifest, model: Autoencoder,
                  stats: dict[str, Any], check_images: np.ndarray | None = None,
                  test_images: np.ndarray | None = None) -> Version:
    """The files of a version, written by the repository atomically and checksummed into the manifest: the
    weights, the latent statistics, and the ONNX graphs, checked against the model on `check_images`
    (float32 in [0, 1]) with the largest difference recorded; and the int8 decoder, with the test-set
    quality of int8 and bf16 decoding beside fp32's measured on `test_images` (float32 in [0, 1]) if given."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    graphs, onnx_entry = onnx_export.export(model.eval(), check_images)
    int8, reduced = onnx_export.reduced_precision(graphs, model, test_images)
    graphs.update(int8)
    runtimes = {**manifest.runtimes, "onnx": onnx_entry, **reduced}
    return repository.write(name, manifest.with_(runtimes=runtimes), {
        WEIGHTS: weights_writer(state),
        STATS: json_writer(stats),
        **{filename: onnx_export.bytes_writer(data) for filename, data in graphs.items()},
    })


def run(config: TrainConfig) -> list[Version]:
    """Trains every model in `config.models`; returns the versions written, in order."""
    for kind in config.models:
        if kind not in ("ae", "vae"):
            raise ValueError(f"--models accepts ae and vae, got {kind!r}")
    if config.name and len(config.models) != 1:
        raise ValueError("--name needs exactly one model in --models")
    if not config.address:  # before anything starts: the local Ray gets this machine's CPUs
        check_cpus("--num-workers", config.num_workers, config.cpus_per_worker, os.cpu_count() or 1, None)
    archs = {config.target_name(kind): Architecture(kind=kind, latent_dim=config.latent_dim,
                                                    hidden=tuple(config.hidden)) for kind in config.models}
    if not config.address:  # a remote cluster's memory is not this machine's
        _check_memory(config, archs)
    _check_statistics_memory(config)  # on this machine, the driver, wherever the workers are
    repository = ModelRepository(config.models_dir)
    repository.ensure_writable(archs, needed_bytes=sum(version_bytes(arch) for arch in archs.values()))
    if config.address:  # a bad form, or nothing listening, said before MNIST is read and checked
        _check_reachable(config.address)
    if _local_runs(config) is None:
        _check_storage_uri(config.storage_path or "")
    started = time.perf_counter()
    run_name: str | None = None
    written: list[Version] = []
    try:
        data = mnist.load(config.data_root)
        train = data.train
        if config.train_limit:
            if config.train_limit > len(train.images):
                print(f"--train-limit {config.train_limit:,} is more than the {len(train.images):,} training images "
                      "there are: training on all of them", file=sys.stderr, flush=True)
            train = mnist.Split(train.images[:config.train_limit], train.labels[:config.train_limit])
        print(f"MNIST from {data.source}: {len(train.images):,} training and {len(data.test.images):,} test "
              "images", flush=True)
        # Named (and its folder made) before Ray starts: a --storage-path that cannot be written is said at
        # once, not after Ray's start-up.
        run_name = _run_name(config, "-".join(archs))
        _train_and_write(config, archs, repository, data, train, run_name, written)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: Ray stops the workers as the driver exits
        ray_start.stopping()
        kept = _kept(config, run_name) if run_name else "it stopped while reading MNIST, before anything started"
        print(_stopped_line(exc, time.perf_counter() - started, list(archs), written, kept), file=sys.stderr,
              flush=True)
        raise
    _remove_checkpoints(config, run_name)
    return written


def _train_and_write(config: TrainConfig, archs: dict[str, Architecture], repository: ModelRepository,
                     data: mnist.Mnist, train: mnist.Split, run_name: str, written: list[Version]) -> None:
    """Starts Ray, trains, and writes each model's version, appending it to `written` as it is written (what a
    stop part-way has to account for)."""
    import ray

    try:
        _start_ray(config.address)
        if config.address:
            check_cpus("--num-workers", config.num_workers, config.cpus_per_worker,
                       ray.cluster_resources().get("CPU", 0), config.address)
        refs = {"train_ref": ray.put(train.images), "test_ref": ray.put(data.test.images)}
        epochs = f"{config.epochs} epoch{'s' if config.epochs != 1 else ''}"
        print(f"training {', '.join(archs)} (latent dim {config.latent_dim}, {epochs}, {config.precision}, "
              f"{config.num_workers} worker(s) x {config.cpus_per_worker} CPU) ...", flush=True)
        started = time.perf_counter()
        states, metrics = _fit(config, archs, refs, run_name)
    except Exception:  # Ray did not start, or the run failed: its folder goes if it holds nothing to resume
        _kept(config, run_name)
        raise
    seconds = time.perf_counter() - started
    diverged = [name for name in archs if not all(_finite(metrics[name].get(key))
                                                  for key in ("train_loss", "test_loss"))]
    if diverged:  # its weights are nan or inf: the statistics and graphs would fail on them, or worse
        # Its checkpoints hold the same nan weights: nothing to resume (a lower --lr is another run), and at
        # about 160 MB a run they would stay in $TMPDIR for good.
        _remove_checkpoints(config, run_name)
        raise UserError(f"training diverged for {', '.join(diverged)} (a loss of nan or inf), nothing written: "
                        f"lower --lr (this run {config.lr:g}, default {TrainConfig().lr:g}); stopped after epoch "
                        f"{metrics.get('epoch', config.epochs)} of {config.epochs}")
    before = _written_before(config, run_name, repository)
    for name, arch in archs.items():
        if name in before:
            print(f"[{name}] written by this run before it was stopped: {before[name].path}", flush=True)
            written.append(before[name])
            continue
        model = build(arch)
        model.load_state_dict(states[name])
        manifest = _manifest(arch.kind, config, arch, data, len(train.images), metrics, seconds)
        print(f"[{name}] computing latent statistics over {len(train.images):,} training images ...", flush=True)
        try:
            means, _ = LoadedModel(manifest, TorchRuntime(model.eval())).encode(train.images)
            stats = compute_stats(means, train.labels, seed=config.seed)
            check = train.images[:256].astype(np.float32) / np.float32(255)
            version = write_version(repository, name, manifest, model, stats, check, data.test.floats())
        except (NonFiniteOutput, onnx_export.OnnxExportError) as exc:  # nan, or far past float32's precision
            raise UserError(f"[{name}] not written: {exc}; the model is numerically unusable (test loss "
                            f"{metrics[name]['test_loss']:.4g} nats/img), lower --lr (this run {config.lr:g}, "
                            f"default {TrainConfig().lr:g}); {_checkpoint_stays(config)}") from None
        except OSError as exc:  # a full disk, or the repository changed under the run
            where = f" ({Path(exc.filename).name})" if exc.filename else ""
            raise UserError(f"[{name}] cannot write its version under {repository.root}: "
                            f"{exc.strerror or exc}{where}; {_checkpoint_stays(config)}"
                            + (f"; written: {', '.join(map(str, written))}" if written else "")) from None
        m = metrics[name]
        print(f"[{name}] wrote {version.path}  test bce {m['test_bce']:.2f}  total {m['test_loss']:.2f} "
              f"nats/img", flush=True)
        written.append(version)
        _record_written(config, run_name, written)
    session = metrics.get("session_epochs")
    resumed = (f"; this session, resumed: {session} of {config.epochs} epochs"
               if _resumed(session, config.epochs) else "")
    print(f"trained {', '.join(archs)} in {seconds:.0f}s ({metrics['epoch_seconds']:.1f}s per epoch on average"
          f"{resumed})", flush=True)


def _record_written(config: TrainConfig, run_name: str, written: list[Version]) -> None:
    """Notes in the run's folder the versions it has written (WRITTEN_FILE), for a resume after a stop."""
    root = _local_runs(config)
    if root is None:
        return
    record = {v.name: [v.number, sha256_file(v.path / MANIFEST)] for v in written}
    try:
        (root / run_name / WRITTEN_FILE).write_text(json.dumps(record))
    except OSError:  # only a resume's shortcut is lost: it writes them again
        pass


def _written_before(config: TrainConfig, run_name: str, repository: ModelRepository) -> dict[str, Version]:
    """The versions a resumed run wrote before its stop and that are still in place as it wrote them (the same
    number and manifest: a version deleted, or another written under its number since, is written again)."""
    root = _local_runs(config)
    try:
        record = json.loads((root / run_name / WRITTEN_FILE).read_text()) if root is not None else {}
    except (OSError, ValueError):
        return {}
    found: dict[str, Version] = {}
    versions = repository.versions()
    for name, entry in record.items() if isinstance(record, dict) else ():
        for version in versions.get(name, []):
            try:
                if [version.number, sha256_file(version.path / MANIFEST)] == entry:
                    found[name] = version
            except OSError:
                continue
    return found


def _stopped_line(exc: KeyboardInterrupt, seconds: float, names: list[str], written: list[Version],
                  kept: str) -> str:
    """The one line a run stopped by Ctrl-C or SIGTERM ends with, wherever it was: starting Ray, training, or
    writing the versions. Stopped while writing them, the run ended with no word at all, though one version
    could be in place and the next not."""
    sig = stop_signal(exc)
    how = "SIGTERM" if sig == signal.SIGTERM else "SIGHUP" if sig == signal.SIGHUP else "Ctrl-C"
    missing = [name for name in names if name not in {version.name for version in written}]
    what = "nothing written" if not written else f"written: {', '.join(map(str, written))}" + (
        f", not {', '.join(missing)}" if missing else "")
    return f"aevae train: stopped by {how} after {seconds:.0f}s, {what}; {kept}"


def _kept(config: TrainConfig, run_name: str) -> str:
    """What a run that ends early leaves under --storage-path, in words for its last line. A run folder with no
    checkpoint Ray Train can restore (no snapshot of its checkpoints: Ray did not start, or the run stopped
    before its first epoch ended) is removed first: there is nothing in it to resume, and such folders piled up
    under $TMPDIR, while the line said that "the run's last checkpoint" stayed there."""
    root = _local_runs(config)
    if root is not None and not (root / run_name / RAY_SNAPSHOT_FILE).is_file():
        shutil.rmtree(root / run_name, ignore_errors=True)
        _release(root / run_name)
        return "it stopped before its first checkpoint, so there is nothing to resume"
    return _checkpoint_stays(config)


def _checkpoint_stays(config: TrainConfig) -> str:
    """Where the run's last checkpoint stays, for the line of a run that trained and then failed or stopped."""
    if _local_runs(config) is None:
        return f"the run's last checkpoint stays under --storage-path {config.storage_path}"
    return (f"the run's last checkpoint stays under --storage-path {config.storage_path} "
            "(`aevae train --resume` with the same options continues it)")


def _check_storage_uri(uri: str) -> None:
    """UserError, before MNIST is read and Ray starts, for a --storage-path URI that cannot be reached from here
    (an unknown scheme, a bucket whose region cannot be resolved): Ray Train found it only in its controller,
    after Ray's start-up, and the run ended with 60 lines of traceback and exit 1."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        filesystem.get_file_info(path)
    except (OSError, ValueError, pyarrow.ArrowException) as exc:
        first = " ".join(str(exc).split())[:300]
        raise UserError(f"--storage-path {uri}: cannot reach it from here ({first}); pass a folder, or a storage URI "
                        "this machine and the Ray cluster can write (s3://bucket/path, gs://bucket/path)") from None


def _local_runs(config: TrainConfig) -> Path | None:
    """The folder holding the runs' checkpoints; None for a remote --storage-path (s3://...), which aevae
    neither lists nor cleans. A file:// URI is the local folder it names, as Ray Train resolves it (pyarrow):
    taken for a remote one, its runs' checkpoints (about 160 MB each) stayed after every finished run, and
    --resume never looked there."""
    storage = config.storage_path or ""
    if "://" not in storage:
        return Path(storage).absolute()
    if not storage.startswith("file://"):
        return None
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage)
    except (OSError, ValueError, pyarrow.ArrowException):  # said by _check_storage_uri
        return None
    return Path(path) if isinstance(filesystem, pyarrow.fs.LocalFileSystem) else None


def stopped_run(config: TrainConfig, prefix: str) -> str | None:
    """The name of the newest run under --storage-path that ran with this configuration and left a checkpoint
    Ray Train can restore: one that was stopped or failed (a run that finished removes its folder)."""
    root = _local_runs(config)
    if root is None or not root.is_dir():
        return None
    identity = config.run_identity()
    found = []
    for folder in root.glob(f"{prefix}-*"):
        try:
            ran = json.loads((folder / RUN_FILE).read_text())
            if ran == identity and (folder / RAY_SNAPSHOT_FILE).is_file():
                # the newest by its last checkpoint, not the folder's time, which a lock file made changes
                found.append(((folder / RAY_SNAPSHOT_FILE).stat().st_mtime, folder.name))
        except (OSError, ValueError):  # another run's folder, one being removed, or not aevae's
            continue
    for _, name in sorted(found, reverse=True):
        problem = _checkpoint_problem(root / name)
        if problem is None:
            if claim(root / name):
                return name
            print(f"run {name} under {root} is another aevae train's (running, or resumed by it); passing it over",
                  file=sys.stderr, flush=True)
            continue
        # Restored as it is, it failed in every worker (a torch unpickling traceback, exit 1) on every --resume,
        # which `aevae up` always passes; passed over instead, and left for its owner to look at.
        print(f"run {name} under {root} cannot be resumed: {problem}; passing it over (it is left as it is)",
              file=sys.stderr, flush=True)
    return None


def claim(folder: Path) -> bool:
    """Takes the run folder's lock for this process's lifetime (LOCK_FILE); False when another process holds
    it. Without blocking: a run someone else drives is passed over, not waited for."""
    if str(folder) in _claimed:
        return True
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return True  # a folder this process may not lock in is no folder another one resumes either
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held
        os.close(fd)
        return False
    except OSError:  # a file system without locks (ENOLCK): as before there were any
        os.close(fd)
        return True
    _claimed[str(folder)] = fd
    return True


def _release(folder: Path) -> None:
    fd = _claimed.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


def _checkpoint_problem(folder: Path) -> str | None:
    """Why the last checkpoint Ray Train would restore in the run `folder` cannot be loaded; None when it loads,
    or when the snapshot does not name one in the form this knows (left to Ray Train). Loaded here, on the
    driver, as the loop loads it (weights only): a few hundred milliseconds against a run that cannot start."""
    try:
        snapshot = json.loads((folder / RAY_SNAPSHOT_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"its {RAY_SNAPSHOT_FILE} is unreadable ({exc})"
    latest = snapshot.get("latest_checkpoint_result") if isinstance(snapshot, dict) else None
    checkpoint = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    if not isinstance(checkpoint, str):
        return None
    from aevae.trainer.loop import CHECKPOINT_FILE

    path = folder / checkpoint / CHECKPOINT_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
        int(state["epoch"])
        for key in ("models", "optimizers", "schedulers"):
            if not isinstance(state[key], dict):
                raise ValueError(f"{key} is not a dict")
    except Exception as exc:  # noqa: BLE001 - missing, truncated, not torch's, or not this loop's
        # the first sentence: torch's next ones advise loading with weights_only=False, which is never wanted
        text = " ".join(str(exc).split()).split(". ")[0][:160]
        reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        return f"its last checkpoint {path} is missing or damaged ({reason})"
    return None


def _run_name(config: TrainConfig, prefix: str) -> str:
    """A new run's name, or with --resume the stopped run's: Ray Train restores a run of the same name and
    storage path from its last checkpoint, and the loop goes on from the epoch after it (loop._restore). The
    run's options are written beside its checkpoints, for a later --resume to match."""
    root = _local_runs(config)
    name = stopped_run(config, prefix) if config.resume else None
    if name:
        print(f"resuming run {name} from its last checkpoint under {root}", flush=True)
    elif config.resume and root is None:  # not an error: `aevae up` always asks, whatever the storage
        print(f"--resume looks for stopped runs in a local --storage-path only, not {config.storage_path}: "
              "starting afresh", flush=True)
    elif config.resume:
        print(f"no stopped run with these options under {root}: starting afresh", flush=True)
    name = name or f"{prefix}-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    if root is not None:
        try:
            (root / name).mkdir(parents=True, exist_ok=True)
            claim(root / name)  # a new run's: a --resume elsewhere must not take it once it has a checkpoint
            (root / name / RUN_FILE).write_text(json.dumps(config.run_identity(), indent=1))
        except OSError as exc:  # before any training: Ray would fail at its first checkpoint
            raise UserError(f"--storage-path {root}: cannot keep the run's checkpoints there "
                            f"({exc.strerror or exc}); pass a writable folder") from None
    return name


def _remove_checkpoints(config: TrainConfig, run_name: str) -> None:
    """Removes the run's checkpoints once every version is written: they are there to resume a failed run
    (and are kept when one fails), and at about 160 MB a run (the models and their optimizer state, the last
    two epochs) they filled $TMPDIR run after run. A remote --storage-path (s3://...) is left to its owner."""
    root = _local_runs(config)
    if root is None:
        return
    folder = root / run_name
    try:
        shutil.rmtree(folder)
    except FileNotFoundError:
        pass
    except OSError as exc:
        print(f"could not remove the run's checkpoints under {folder}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
    _release(folder)
