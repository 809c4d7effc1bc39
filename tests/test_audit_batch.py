"""Faults injected into `aevae decode-batch` and `aevae train`: each must end in one line saying what was wrong
and what to do, exit 2, and keep the finished work. Mostly without Ray (the functions that check and the
shard's own code path, which Ray's actors and the fleet engine both call); one local Ray run for a model version
damaged while a job runs."""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aevae.batch import png, sources
from aevae.batch.cli import root_cause
from aevae.batch.job import Job, prepare, run_shard
from aevae.batch.model import Loaded, resolve
from aevae.batch.sinks import Sink
from aevae.cli import main
from aevae.errors import UserError
from helpers import run_aevae, without_mnist_or_ray


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Runs the command in process; it must exit 2 with one line and no traceback. Returns that line."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _decode_job(repo: Path, out: Path, source: sources.Source | None = None, rows: int = 30,
                fmt: str = "parquet") -> Job:
    ref = resolve(str(repo), "vae", None)
    return Job("decode", ref, source or sources.Prior(rows, 0, ref.latent_dim), Sink(out, fmt), shard_size=10)


# -- decode-batch: input and output named wrongly -----------------------------------------------------------------

def test_an_empty_output_or_input_is_refused_not_taken_for_the_current_folder(
        tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--output "$OUT"` with OUT unset wrote the job's shards and job file into the current folder."""
    monkeypatch.chdir(tmp_path)
    line = _refused(["decode-batch", "--prior", "10", "--models-dir", str(tiny_repo), "--output", ""], capsys)
    assert "--output is empty" in line
    line = _refused(["decode-batch", "--input", " ", "--models-dir", str(tiny_repo), "--output", "out"], capsys)
    assert "--input is empty" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_an_output_holding_the_inputs_own_files_is_refused_and_they_stay(tiny_repo: Path, tmp_path: Path) -> None:
    """--input out --output out --overwrite removed the input before a worker read it (then a Ray traceback)."""
    out = tmp_path / "out"
    first = _decode_job(tiny_repo, out)
    model = Loaded(first.model)
    for shard in prepare(first).todo:
        run_shard(first, model, shard)
    before = sorted(p.name for p in out.iterdir())
    for overwrite in (False, True):
        again = _decode_job(tiny_repo, out, sources.ParquetFile(out))
        with pytest.raises(UserError, match=r"holds the input's own files \(part-000000.parquet, part-000001"):
            prepare(again, overwrite=overwrite)
    assert sorted(p.name for p in out.iterdir()) == before


def test_parquet_files_of_one_folder_that_differ_are_named_in_one_line(tmp_path: Path) -> None:
    z = np.zeros((5, 4), np.float32)
    pq.write_table(pa.table({"latent": pa.FixedSizeListArray.from_arrays(pa.array(z.ravel()), 4)}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"latent": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(10, np.float32)), 5)}),
                   tmp_path / "b.parquet")
    with pytest.raises(UserError) as refused:
        sources.ParquetFile(tmp_path)
    message = str(refused.value)
    assert "b.parquet has 'latent' of type fixed_size_list<element: float>[5], a.parquet" in message
    assert "\n" not in message
    pq.write_table(pa.table({"other": [1.0]}), tmp_path / "b.parquet")
    with pytest.raises(UserError, match="b.parquet has no column 'latent'"):
        sources.ParquetFile(tmp_path)


def test_null_scalars_and_float64_beyond_float32_are_called_what_they_are(tmp_path: Path) -> None:
    """A null became NaN, 1e300 became inf: both were reported as "NaN or infinity" (with numpy's overflow
    warning)."""
    pq.write_table(pa.table({f"z{i}": [1.0, None if i == 1 else 2.0] for i in range(4)}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match="a column has null rows"):
        sources.ParquetFile(tmp_path / "n.parquet", column="z0,z1,z2,z3").check(4, (32, 32))
    pq.write_table(pa.table({"latent": [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], [1.0, None, 2.0, 3.0]]}),
                   tmp_path / "l.parquet")
    with pytest.raises(UserError, match="row 2 holds a null value; every value must be a number"):
        sources.ParquetFile(tmp_path / "l.parquet", column="latent").check(4, (32, 32))
    z = np.zeros((3, 4))
    z[2, 1] = 1e300
    np.save(tmp_path / "wide.npy", z)
    with pytest.raises(UserError, match=r"row 2 holds values beyond float32's range .*\[-10000, 10000\]"):
        sources.ArrayFile(tmp_path / "wide.npy").check(4, (32, 32))
    z[2, 1] = np.inf
    np.save(tmp_path / "wide.npy", z)
    with pytest.raises(UserError, match="row 2 holds NaN or infinity"):
        sources.ArrayFile(tmp_path / "wide.npy").check(4, (32, 32))


def test_float64_beyond_float32_in_parquet_columns_is_named_with_its_row(tmp_path: Path) -> None:
    """The .npy case was named; in a Parquet list column (or one column per dimension) 1e300 was cast to
    infinity first, with numpy's overflow warning, and called "NaN or infinity"."""
    import warnings

    pq.write_table(pa.table({"latent": [[1.0, 2.0, 3.0, 4.0], [1.0, 1e300, 2.0, 3.0]]}), tmp_path / "l.parquet")
    pq.write_table(pa.table({f"z{i}": [1.0, 1e300 if i == 2 else 2.0] for i in range(4)}), tmp_path / "c.parquet")
    for name, column in (("l.parquet", "latent"), ("c.parquet", "z0,z1,z2,z3")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy's overflow warning would fail here
            with pytest.raises(UserError, match=r"row 1 holds values beyond float32's range .*\[-10000, 10000\]"):
                sources.ParquetFile(tmp_path / name, column=column).check(4, (32, 32))


def test_png_rows_of_16_bits_other_sizes_or_huge_are_read_right_or_named() -> None:
    """A 16-bit PNG was clipped to almost white by Pillow's conversion and encoded without a word; rows of
    another size than the first gave numpy's message naming no row; a 20000 x 20000 PNG was Pillow's
    decompression-bomb traceback."""
    from PIL import Image

    def png_bytes(image: Image.Image) -> bytes:
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()

    wide = np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 64  # 0 .. 65472
    sixteen = png_bytes(Image.fromarray(wide))  # mode I;16
    grey = png_bytes(Image.fromarray((wide >> 8).astype(np.uint8)))
    images = png.decode_many([grey, sixteen])
    np.testing.assert_array_equal(images[1], (wide >> 8).astype(np.uint8))  # the top byte, not 255 everywhere
    np.testing.assert_array_equal(images[0], images[1])
    small = png_bytes(Image.fromarray(np.zeros((28, 28), np.uint8)))
    with pytest.raises(ValueError, match="row 12 is a 28 x 28 image and row 10 32 x 32; every image"):
        png.decode_many([grey, grey, small], first=10)
    huge = png_bytes(Image.new("L", (20000, 20000)))
    with pytest.raises(ValueError, match="row 3 is an image of over 16,777,216 pixels"):
        png.decode_many([huge], first=3)
    big = png_bytes(Image.new("L", (5000, 5000)))
    with pytest.raises(ValueError, match="row 0 is a 5000 x 5000 image; at most 16,777,216 pixels"):
        png.decode_many([big])


def test_a_second_job_on_an_output_being_written_is_refused(tiny_repo: Path, tmp_path: Path) -> None:
    """Nothing refused it: the second job's start removed the first's shard in the making (which then failed
    with a message about free space), or both decoded every row. The output folder is locked (flock) by the
    process writing it, and the kernel drops the lock however that process ends."""
    import subprocess
    import sys

    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from aevae.batch.job import hold; hold(Path(sys.argv[1])); print('held', flush=True); "
                               "time.sleep(60)", str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        done = run_aevae("decode-batch", "--prior", "50", "--models-dir", str(tiny_repo), "--output", str(out),
                         "--format", "npz", timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "is being written by another job now" in done.stderr and not list(out.iterdir())
    finally:
        holder.kill()
        holder.wait()
    done = run_aevae("decode-batch", "--prior", "50", "--models-dir", str(tiny_repo), "--output", str(out),
                     "--format", "npz", timeout=300)  # the holder gone (killed): its lock went with it
    assert done.returncode == 0, done.stdout + done.stderr


# -- decode-batch: faults while a shard runs ---------------------------------------------------------------------

def test_a_full_disk_fails_the_shard_in_one_line_and_leaves_no_partial_file(
        tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pyarrow's ENOSPC reached the user as Ray's remote traceback, its reason in the middle of its text."""
    from aevae.batch.worker import ShardWorker

    out = tmp_path / "out"
    job = _decode_job(tiny_repo, out)
    prepare(job)
    model = Loaded(job.model)
    assert run_shard(job, model, 0)["rows"] == 10

    def full(self: Sink, path: Path, columns: Any, digest: Any) -> None:
        path.write_bytes(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(Sink, "_parquet", full)
    with pytest.raises(UserError) as failed:
        run_shard(job, model, 1)
    assert str(failed.value).startswith(f"shard 1 (rows 10 to 19): cannot write it into --output {out}: No space "
                                        "left on device; free space")
    assert sorted(p.name for p in out.iterdir()) == ["_aevae_batch.json", "part-000000.parquet"]
    worker = ShardWorker(job)  # the actor returns it as a row, which run_ray raises without Ray's traceback
    assert "No space left on device" in str(worker({"shard": np.array([2])})["error"][0])


def test_an_input_truncated_after_the_check_fails_its_shard_in_one_line(tiny_repo: Path, tmp_path: Path) -> None:
    path = tmp_path / "z.npy"
    np.save(path, np.zeros((30, 4), np.float32))
    job = _decode_job(tiny_repo, tmp_path / "out", sources.ArrayFile(path))
    prepare(job)
    in_worker = pickle.loads(pickle.dumps(job))  # as Ray ships it: the source opens the file anew
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match=r"shard 2 \(rows 20 to 29\): cannot read the input any more .*changed or "
                                        r"disappeared after the job started"):
        run_shard(in_worker, Loaded(job.model), 2)


def test_a_version_damaged_after_the_job_checked_it_is_reported_not_retried(tiny_repo: Path, tmp_path: Path) -> None:
    """Raised in the actor's constructor, Ray restarted the actor without end and printed each death's
    traceback; now the first shard reports it."""
    from aevae.batch.worker import ShardWorker

    job = _decode_job(tiny_repo, tmp_path / "out")
    prepare(job)
    (tiny_repo / "vae" / "1" / "decoder.onnx").write_bytes(b"not a graph")
    worker = ShardWorker(job)
    error = str(worker({"shard": np.array([0])})["error"][0])
    assert f"model vae/1 in {tiny_repo} could not be loaded by a worker" in error
    assert "decoder.onnx" in error and "run the same command again" in error and "\n" not in error
    assert not list((tmp_path / "out").glob("part-*"))


def test_a_workers_failure_is_named_by_its_root_cause_in_one_line() -> None:
    class Remote(Exception):
        def __init__(self, cause: BaseException):
            super().__init__("ray::MapWorker.submit()\n  File \"worker.py\", line 1\nTraceback ...")
            self.cause = cause

    try:
        try:
            raise OSError(errno.EIO, "Input/output error")
        except OSError as exc:
            raise RuntimeError("UDF failed to process a data block.\nmore") from exc
    except RuntimeError as wrapped:
        text = root_cause(Remote(wrapped))
    assert text == "OSError: [Errno 5] Input/output error"
    assert root_cause(ValueError("x" * 1000)).endswith("...") and len(root_cause(ValueError("x" * 1000))) == 300


def test_the_mnist_error_is_one_line_in_encode_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from aevae import mnist

    def fail(*args: object) -> None:
        raise mnist.MnistError("MNIST not available. Error downloading a.gz:\nTried https://x/, got:\n<urlopen error>\n")

    monkeypatch.setattr(mnist, "load", fail)
    source = sources.MnistImages(str(tmp_path / "elsewhere"), "test")
    with pytest.raises(UserError) as refused:
        source.check(4, (32, 32))
    assert str(refused.value) == "MNIST not available. Error downloading a.gz: Tried https://x/, got: <urlopen error>"


# -- train -------------------------------------------------------------------------------------------------------

def _fake_training(monkeypatch: pytest.MonkeyPatch, losses: float | None = 700.0) -> list[str]:
    """`aevae train` without MNIST's files or Ray: 300 random images, and _fit returning fresh weights with
    `losses` as every loss (None: as a run resumed after its last epoch reports a nan from Ray's snapshot).
    Returns the run names _fit was given."""
    from aevae.models import build
    from aevae.trainer import job

    without_mnist_or_ray(monkeypatch)
    runs: list[str] = []

    def fit(config: Any, archs: dict, refs: Any, run_name: str) -> tuple[dict, dict]:
        runs.append(run_name)
        figures = {"train_loss": losses, "test_bce": losses, "test_kl": 0.0, "test_loss": losses}
        return ({name: build(arch).state_dict() for name, arch in archs.items()},
                {**{name: figures for name in archs}, "epoch_seconds": 1.0})

    monkeypatch.setattr(job, "_fit", fit)
    return runs


def test_a_diverged_run_resumed_after_its_last_epoch_says_so_and_drops_its_checkpoints(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Its nan losses come back from Ray's snapshot as null: a TypeError traceback at the end of the run. The
    checkpoints of a diverged run hold nan weights and stayed in $TMPDIR for good."""
    runs = _fake_training(monkeypatch, losses=None)
    storage = tmp_path / "ray"
    line = _refused(["train", "--models", "vae", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(storage)], capsys)
    assert "training diverged for vae (a loss of nan or inf), nothing written" in line
    assert len(runs) == 1 and not (storage / runs[0]).exists()
    assert not list((tmp_path / "m").glob("*/[0-9]*"))


def test_a_bad_address_or_storage_path_is_refused_before_mnist_or_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from aevae import mnist
    from aevae.trainer import job

    _fake_training(monkeypatch)

    def started(*args: object) -> None:
        raise AssertionError("started: it should have been refused first")

    monkeypatch.setattr(mnist, "load", started)
    line = _refused(["train", "--address", "bogus", "--hidden", "16", "--models-dir", str(tmp_path / "m")], capsys)
    assert "--address takes host:port, ray://host:port or auto, got 'bogus'" in line
    _fake_training(monkeypatch)
    monkeypatch.setattr(job, "_start_ray", started)
    (tmp_path / "file").write_text("")
    line = _refused(["train", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(tmp_path / "file")], capsys)
    assert f"--storage-path {tmp_path / 'file'}: cannot keep the run's checkpoints there" in line

    def unreachable(address: object) -> None:
        raise UserError("cannot connect to the Ray cluster")

    monkeypatch.setattr(job, "_start_ray", unreachable)  # the run's folder is made first: it goes again
    line = _refused(["train", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(tmp_path / "ray")], capsys)
    assert "cannot connect to the Ray cluster" in line and list((tmp_path / "ray").iterdir()) == []


def _stopped_run(root: Path, name: str, identity: dict, state: bytes | None, age: float) -> None:
    import io

    import torch

    folder = root / name
    (folder / "checkpoint_1").mkdir(parents=True)
    (folder / "aevae-run.json").write_text(json.dumps(identity))
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}
    (folder / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    if state is None:
        buffer = io.BytesIO()
        torch.save({"epoch": 3, "models": {}, "optimizers": {}, "schedulers": {}}, buffer)
        state = buffer.getvalue()
    (folder / "checkpoint_1" / "state.pt").write_bytes(state)
    when = folder.stat().st_mtime - age
    for path in (folder, folder / "checkpoint_manager_snapshot.json"):  # its last checkpoint's time
        os.utime(path, (when, when))


def test_resume_passes_over_a_run_whose_last_checkpoint_is_damaged(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Restored as it was, it failed in every worker with torch's unpickling traceback (exit 1), on every
    --resume, which `aevae up` always passes."""
    from aevae.trainer import job
    from aevae.trainer.config import TrainConfig

    config = TrainConfig(models=("vae",), epochs=6, storage_path=str(tmp_path), resume=True)
    _stopped_run(tmp_path, "vae-old", config.run_identity(), None, age=100)
    # fixed bytes: random ones fail torch.load with one exception type or another
    _stopped_run(tmp_path, "vae-new", config.run_identity(), b"\x80\x02not a torch checkpoint" * 4, age=0)
    assert job.stopped_run(config, "vae") == "vae-old"
    out = capsys.readouterr().err  # a warning: stderr
    assert "run vae-new under" in out and "cannot be resumed: its last checkpoint" in out
    assert "is missing or damaged (" in out and "passing it over" in out
    (tmp_path / "vae-old" / "checkpoint_1" / "state.pt").unlink()
    assert job.stopped_run(config, "vae") is None
    assert (tmp_path / "vae-new").is_dir()  # left for its owner


def test_resume_passes_over_a_run_another_trainer_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two `aevae train --resume` with the same options (two `aevae up` on one machine) both took the newest
    stopped run, or a live run's folder once it had a checkpoint, and trained into one folder. The driver of a
    run holds its folder's lock: a resume passes such a run over, and takes it once the lock is gone."""
    import fcntl

    from aevae.trainer import job
    from aevae.trainer.config import TrainConfig

    config = TrainConfig(models=("vae",), epochs=6, storage_path=str(tmp_path), resume=True)
    _stopped_run(tmp_path, "vae-old", config.run_identity(), None, age=100)
    _stopped_run(tmp_path, "vae-new", config.run_identity(), None, age=0)
    other = os.open(tmp_path / "vae-new" / job.LOCK_FILE, os.O_RDWR | os.O_CREAT)  # as another driver's
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert job.stopped_run(config, "vae") == "vae-old"
        assert "run vae-new under" in capsys.readouterr().err
        assert not job.claim(tmp_path / "vae-new")
    finally:
        os.close(other)  # that driver ends: its lock goes with it
    assert job.stopped_run(config, "vae") == "vae-new"
    for folder in ("vae-old", "vae-new"):
        job._release(tmp_path / folder)


def test_a_long_runs_eta_is_readable() -> None:
    from aevae.trainer.job import _eta

    assert [_eta(s) for s in (0, 61, 3 * 3600 + 7 * 60 + 5, 41 * 86400 + 7 * 3600, 4.4e11, float("nan"))] == \
        ["0m00s", "1m01s", "3h07m", "41d07h", "5,092,592d14h", "0m00s"]


# -- one local Ray run ---------------------------------------------------------------------------------------------

def test_a_version_damaged_while_the_job_starts_ends_it_in_one_line_with_exit_2(
        tiny_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """On Ray Data: damaged after the driver checked it and before the actors load it. The job ended in a screen
    of tracebacks (Ray restarting the actor), or exit 1 from Ray's core worker when its iteration threads
    outlived ray.shutdown()."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    from aevae.batch import job as batch_job

    real = batch_job.run_ray

    def damaged_first(*args: Any, **kwargs: Any) -> None:
        (tiny_repo / "vae" / "1" / "decoder.onnx").write_bytes(b"not a graph")
        real(*args, **kwargs)

    monkeypatch.setattr(batch_job, "run_ray", damaged_first)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["decode-batch", "--prior", "40", "--shard-size", "10", "--workers", "1", "--models-dir",
                 str(tiny_repo), "--output", str(tmp_path / "out"), "--quiet"])
    err = capfd.readouterr().err
    assert code == 2, err
    assert not ray.is_initialized()
    [line] = [line for line in err.splitlines() if "error:" in line]
    assert "model vae/1 in" in line and "could not be loaded by a worker" in line
    assert "(0 of 4 shards are on disk and kept)" in line
    assert "Traceback" not in err and "ActorDiedError" not in err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["_aevae_batch.json"]


@pytest.mark.parametrize("fmt", ["parquet", "npz"])
def test_a_file_shard_reaches_the_disk_before_its_name(tmp_path: Path, fmt: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """After a power cut a rename may be on the disk without the data renamed: a complete-looking shard that
    done() would keep. The shard's file is flushed before it takes its name."""
    import aevae.batch.sinks as sinks

    events: list[str] = []
    monkeypatch.setattr(sinks, "fsync_path", lambda path: events.append(f"fsync {Path(path).name}"))
    real_replace = os.replace
    monkeypatch.setattr(sinks.os, "replace", lambda a, b: (events.append(f"rename {Path(b).name}"),
                                                           real_replace(a, b))[1])
    sink = Sink(tmp_path, fmt)
    sink.write(0, {"id": np.arange(3, dtype=np.int64), "latent": np.zeros((3, 4), np.float32),
                   "image": np.zeros((3, 4, 4), np.uint8)})
    final = sink.path(0).name
    assert events[-1] == f"rename {final}" and events[-2].startswith(f"fsync .{final}")
    assert sink.done(0, 3)


def test_a_png_shard_with_an_empty_image_is_not_done(tmp_path: Path) -> None:
    """A PNG shard's files are not flushed one by one: an image a power cut emptied makes it not done."""
    sink = Sink(tmp_path, "png")
    sink.write(0, {"id": np.arange(3, dtype=np.int64), "latent": np.zeros((3, 4), np.float32),
                   "image": np.zeros((3, 4, 4), np.uint8)})
    assert sink.done(0, 3)
    next(sink.path(0).glob("*.png")).write_bytes(b"")
    assert not sink.done(0, 3)
