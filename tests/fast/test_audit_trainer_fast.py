"""The training side as a fault-injection harness sees it, fast: MNIST files that are damaged in the ways a
disk or a hurried user damages them, and `aevae train` stopped at each stage, in-process (no Ray, no
subprocess; MNIST and the Ray Train run faked). The real runs are in tests/test_audit_trainer.py."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aevae import cli, mnist
from aevae.errors import Terminated
from helpers import without_mnist_or_ray

COUNT = 3  # images per split in the fake IDX files


def _idx(magic: int, count: int) -> bytes:
    """A small valid IDX file: images (magic 2051) of 28 x 28 or labels (2049), filled with their index."""
    if magic == 2051:
        header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
        return header + bytes(i % 256 for i in range(count * 28 * 28))
    return magic.to_bytes(4, "big") + count.to_bytes(4, "big") + bytes(range(count))


@pytest.fixture
def raw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data root's MNIST/raw/ of four small IDX files, which mnist.FILES is made to describe."""
    folder = tmp_path / "data" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    files = {}
    for name, (_, _, magic, _) in mnist.FILES.items():
        data = _idx(magic, COUNT)
        (folder / name).write_bytes(data)
        files[name] = (len(data), hashlib.sha256(data).hexdigest(), magic, COUNT)
    monkeypatch.setattr(mnist, "FILES", files)
    return folder


def test_small_idx_files_load_as_the_real_ones_do(raw: Path) -> None:
    """The fixture's files are valid: what the damage tests below change is all that is wrong."""
    data = mnist.load(raw.parent.parent)
    assert data.train.images.shape == (COUNT, 32, 32) and data.test.labels.tolist() == [0, 1, 2]
    assert data.train.images[1, 2, 2] == (28 * 28) % 256  # padded by 2, row-major from the file
    assert data.sha256 == {name: sha for name, (_, sha, _, _) in mnist.FILES.items()}


def _error(raw: Path) -> str:
    with pytest.raises(mnist.MnistError) as error:
        mnist.load(raw.parent.parent)
    return str(error.value)


def test_an_unreadable_mnist_file_is_named_not_a_traceback(raw: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the user may not read (its permissions; root reads everything, so the error is injected) was a
    PermissionError traceback from `aevae train`, `aevae report` and the batch jobs alike."""
    unreadable = raw / "t10k-labels-idx1-ubyte"
    read_bytes = Path.read_bytes

    def refuse(path: Path) -> bytes:
        if path == unreadable:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert _error(raw) == f"{unreadable} cannot be read: Permission denied."


def test_a_folder_or_a_fifo_in_place_of_an_mnist_file_is_said_not_missing(raw: Path) -> None:
    """Both were "missing file", which sent the user looking for a file whose name is right there."""
    folder = raw / "t10k-images-idx3-ubyte"
    folder.unlink()
    folder.mkdir()
    assert _error(raw) == f"{folder} is a folder; it should be the uncompressed IDX file of that name."
    folder.rmdir()
    os.mkfifo(folder)  # a plain read would wait for a writer for ever
    assert f"{folder} is not a regular file" in _error(raw)


def test_gzip_only_mnist_files_are_told_to_be_decompressed(raw: Path) -> None:
    """The MNIST site and torchvision's download give `<name>.gz`; with only those, "missing file" alone."""
    name = "train-images-idx3-ubyte"
    (raw / name).rename(raw / f"{name}.gz")
    message = _error(raw)
    assert f"missing file {raw / name}: found {name}.gz" in message
    assert f"gunzip -k {raw / name}.gz" in message


def test_a_symlink_to_nothing_is_named_with_its_target(raw: Path, tmp_path: Path) -> None:
    link = raw / "train-labels-idx1-ubyte"
    link.unlink()
    link.symlink_to(tmp_path / "gone")
    assert _error(raw) == f"{link} is a symlink to {tmp_path / 'gone'}, which does not exist."


@pytest.mark.parametrize("given", ["MNIST/raw", "MNIST"])
def test_a_data_root_one_level_off_says_which_one_to_pass(raw: Path, given: str) -> None:
    """--data-root names the folder holding MNIST/raw/; given the raw folder (or MNIST/) the error only said
    where it had looked."""
    root = raw.parent.parent
    with pytest.raises(mnist.MnistError) as error:
        mnist.load(root / given)
    assert f"The files are in {raw}: pass --data-root {root}." in str(error.value)


def test_damaged_files_are_still_named_as_before(raw: Path) -> None:
    name = raw / "train-labels-idx1-ubyte"
    name.write_bytes(name.read_bytes()[:-1])
    assert f"{name} is truncated or wrong" in _error(raw)
    name.write_bytes(_idx(2049, COUNT)[:-1] + b"\x09")
    assert f"{name} is corrupt: sha256" in _error(raw)
    name.unlink()
    assert f"missing file {name}. MNIST not available" in _error(raw)


# -- `aevae train` stopped at each stage -------------------------------------------------------------------


def _fake_run(monkeypatch: pytest.MonkeyPatch, fit: Any = None, write: Any = None) -> None:
    """`aevae train` on 300 random images with no Ray: _start_ray does nothing, `fit` stands for _fit (by default
    one returning freshly built weights), `write(name)` is called before each version is written."""
    from aevae.models import build
    from aevae.trainer import job

    without_mnist_or_ray(monkeypatch)

    def trained(config: Any, archs: dict, refs: Any, run_name: str) -> tuple[dict, dict]:
        figures = {"train_loss": 700.0, "test_bce": 700.0, "test_kl": 0.0, "test_loss": 700.0}
        # as Ray Train leaves a run that reported an epoch: its checkpoints' snapshot
        (Path(config.storage_path) / run_name / job.RAY_SNAPSHOT_FILE).write_text("{}")
        return ({name: build(arch).state_dict() for name, arch in archs.items()},
                {**{name: figures for name in archs}, "epoch_seconds": 1.0})

    monkeypatch.setattr(job, "_fit", fit or trained)
    if write is not None:
        writer = job.write_version

        def write_version(repository: Any, name: str, *args: Any, **kwargs: Any) -> Any:
            write(name)
            return writer(repository, name, *args, **kwargs)

        monkeypatch.setattr(job, "write_version", write_version)


def _train(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["train", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(tmp_path / "r")])
    return code, capsys.readouterr().err


def test_stopped_while_writing_the_versions_says_what_was_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGTERM (or Ctrl-C) after the training, while the versions were written: the run ended with exit 143
    and no word, ae/1 in place and vae not."""
    from aevae.repository import ModelRepository

    def stop_at_vae(name: str) -> None:
        if name == "vae":
            raise Terminated()

    _fake_run(monkeypatch, write=stop_at_vae)
    code, err = _train(tmp_path, capsys)
    assert code == 128 + signal.SIGTERM
    assert "aevae train: stopped by SIGTERM after" in err
    assert (f"written: ae/1, not vae; the run's last checkpoint stays under --storage-path {tmp_path / 'r'} "
            "(`aevae train --resume` with the same options continues it)") in err
    assert len(err.splitlines()) == 1
    assert {name: [v.number for v in vs] for name, vs in ModelRepository(tmp_path / "m").versions().items()} == \
        {"ae": [1]}
    assert not [p for p in (tmp_path / "m").rglob(".incoming-*")]
    [run] = list((tmp_path / "r").iterdir())  # kept: --resume continues it
    assert json.loads((run / "aevae-run.json").read_text())["models"] == ["ae", "vae"]


def test_a_run_resumed_after_a_stop_while_writing_writes_only_what_it_had_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped after ae/1 was written and before vae's version, then resumed: it wrote ae again, as ae/2, the
    same weights under a second number. The run notes what it wrote (WRITTEN_FILE); a resume writes the rest,
    and writes a model again only when its version is gone or is another since."""
    from aevae.repository import ModelRepository

    stops = ["vae"]

    def stop_once_at_vae(name: str) -> None:
        if name in stops:
            stops.remove(name)
            raise Terminated()

    _fake_run(monkeypatch, write=stop_once_at_vae)
    assert _train(tmp_path, capsys)[0] == 128 + signal.SIGTERM
    resume = ["train", "--resume", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
              "--storage-path", str(tmp_path / "r")]
    assert cli.main(resume) == 0
    out = capsys.readouterr().out
    assert f"[ae] written by this run before it was stopped: {tmp_path / 'm' / 'ae' / '1'}" in out
    versions = ModelRepository(tmp_path / "m").versions()
    assert {name: [v.number for v in vs] for name, vs in versions.items()} == {"ae": [1], "vae": [1]}
    assert list((tmp_path / "r").iterdir()) == []  # done: its checkpoints go


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_stopped_before_the_first_checkpoint_leaves_no_run_folder_and_says_so(
        stop: type[KeyboardInterrupt], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Stopped while Ray started or the first epoch ran, the run said that "the run's last checkpoint stays under
    --storage-path" where there was none, and left its folder (aevae-run.json alone) there for good: 18 of
    them had piled up in /tmp/aevae-ray on this machine."""

    def stopped(*args: Any) -> Any:
        raise stop()

    _fake_run(monkeypatch, fit=stopped)
    code, err = _train(tmp_path, capsys)
    assert code == (143 if stop is Terminated else 130)
    how = "SIGTERM" if stop is Terminated else "Ctrl-C"
    assert f"stopped by {how} after" in err
    assert "nothing written; it stopped before its first checkpoint, so there is nothing to resume" in err
    assert "stays under" not in err
    assert list((tmp_path / "r").iterdir()) == []
    assert not (tmp_path / "m").exists() or not list((tmp_path / "m").rglob("[0-9]*"))


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any failure, not a stop only (here: Ray Train's, a worker that failed past its retries)."""

    def failed(*args: Any) -> Any:
        raise RuntimeError("the worker group failed")

    _fake_run(monkeypatch, fit=failed)
    with pytest.raises(RuntimeError, match="the worker group failed"):
        cli.main(["train", "--hidden", "16", "--models-dir", str(tmp_path / "m"), "--storage-path", str(tmp_path / "r")])
    assert list((tmp_path / "r").iterdir()) == []


def test_a_resumed_run_stopped_again_keeps_its_checkpoints(tmp_path: Path) -> None:
    """The folder of a run with a checkpoint snapshot (the one --resume continues) is never removed."""
    from aevae.trainer import job
    from aevae.trainer.config import TrainConfig

    config = TrainConfig(storage_path=str(tmp_path))
    (tmp_path / "run" / "checkpoint_1").mkdir(parents=True)
    (tmp_path / "run" / job.RAY_SNAPSHOT_FILE).write_text("{}")
    assert "`aevae train --resume` with the same options continues it" in job._kept(config, "run")
    assert (tmp_path / "run" / "checkpoint_1").is_dir()
    remote = TrainConfig(storage_path="s3://bucket/runs")
    assert job._kept(remote, "run") == "the run's last checkpoint stays under --storage-path s3://bucket/runs"


def test_sigterm_while_ray_starts_is_a_stop_not_exit_status_15(monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init makes SIGTERM a sys.exit(15) before it connects: a SIGTERM in its start-up ended `aevae train`
    with status 15 and no line, and a stop then left Ray's processes behind. It is a Terminated now, as at any
    other moment, after what had started is shut down; Ctrl-C likewise; other exits pass through."""
    ray = pytest.importorskip("ray")
    from aevae.trainer import job

    if ray.is_initialized():
        pytest.skip("a Ray session is already running in this process")
    shutdowns: list[bool] = []
    monkeypatch.setattr(ray, "shutdown", lambda: shutdowns.append(True))
    for stop, expected in ((SystemExit(signal.SIGTERM), Terminated), (KeyboardInterrupt(), KeyboardInterrupt),
                           (SystemExit(3), SystemExit)):
        def init(*args: Any, stop: BaseException = stop, **kwargs: Any) -> None:
            raise stop

        monkeypatch.setattr(ray, "init", init)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with pytest.raises(expected) as raised:
            job._start_ray(None)
        assert type(raised.value) is expected
        if expected is SystemExit:  # not a stop: nothing shut down, SIGTERM a stop again
            assert len(shutdowns) == 2 and signal.getsignal(signal.SIGTERM) not in (signal.SIG_IGN, signal.SIG_DFL)
        else:  # what had started is shut down, and a second signal does not cut the stop short
            assert shutdowns and signal.getsignal(signal.SIGTERM) == signal.getsignal(signal.SIGINT) == signal.SIG_IGN


def test_stopped_while_mnist_is_read_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Reading and checking MNIST takes a second or two: a SIGTERM then ended the run with 143 and no word."""

    def interrupted(*args: Any) -> Any:
        raise Terminated()

    _fake_run(monkeypatch)
    monkeypatch.setattr(mnist, "load", interrupted)
    code, err = _train(tmp_path, capsys)
    assert code == 143
    assert err.startswith("aevae train: stopped by SIGTERM after ")
    assert err.endswith("nothing written; it stopped while reading MNIST, before anything started\n")
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()


def test_the_stop_line_names_what_was_written_and_what_was_not() -> None:
    from aevae.repository import Version
    from aevae.trainer import job

    ae = Version("ae", 3, Path("/m/ae/3"), None)  # type: ignore[arg-type]
    vae = Version("vae", 1, Path("/m/vae/1"), None)  # type: ignore[arg-type]
    line = job._stopped_line(KeyboardInterrupt(), 61.4, ["ae", "vae"], [ae], "kept")
    assert line == "aevae train: stopped by Ctrl-C after 61s, written: ae/3, not vae; kept"
    assert job._stopped_line(Terminated(), 2, ["ae", "vae"], [ae, vae], "kept").endswith(
        "SIGTERM after 2s, written: ae/3, vae/1; kept")
    assert "nothing written; kept" in job._stopped_line(Terminated(), 0, ["vae"], [], "kept")


# -- found by the second audit of the trainer --------------------------------------------------------------


def test_a_latent_dim_whose_statistics_cannot_fit_is_refused_before_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`--latent-dim 65536 --train-limit 100` passed the workers' memory check, trained, and then failed in the
    latent statistics' PCA (a 32 GiB covariance): a numpy traceback, exit 1, nothing written, the checkpoints
    left. It is refused before MNIST is read or Ray starts; the default latent needs next to nothing."""
    from aevae import memory
    from aevae.trainer import job

    _fake_run(monkeypatch, fit=lambda *args: pytest.fail("trained"))
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * memory.GIB)
    code = cli.main(["train", "--latent-dim", "65536", "--train-limit", "100", "--hidden", "16",
                     "--models-dir", str(tmp_path / "m"), "--storage-path", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert ("the latent statistics of --latent-dim 65536 over 100 training images, computed on this machine after "
            "training, need at least 96.1 GiB, and 8.0 GiB is available; pass a smaller --latent-dim") in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "m").exists()
    assert job.statistics_bytes(4, 60_000) < 8 << 20  # the default: under 8 MiB
    # past the training split, the statistics cover the 60,000 images there are, not --train-limit's
    config = job.TrainConfig(latent_dim=20_000, train_limit=10**9)
    with pytest.raises(job.UserError, match="over 60,000 training images"):
        job._check_statistics_memory(config)


def test_a_single_model_run_does_not_say_that_the_ae_and_the_vae_trained_together(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--models ae` wrote a manifest whose training note said "the AE and the VAE train together, so seconds
    cover both"."""
    from aevae.repository import ModelRepository

    _fake_run(monkeypatch)
    for models in ("ae", "ae,vae"):
        assert cli.main(["train", "--models", models, "--hidden", "16", "--models-dir", str(tmp_path / models),
                         "--storage-path", str(tmp_path / "r")]) == 0
    [[alone]] = ModelRepository(tmp_path / "ae").versions().values()
    assert "note" not in alone.manifest.training
    for [together] in ModelRepository(tmp_path / "ae,vae").versions().values():
        assert together.manifest.training["note"] == "the AE and the VAE train together, so seconds cover both"


def test_a_file_uri_storage_path_is_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """--storage-path file:///... is a folder on this machine (Ray Train writes there through pyarrow's local
    file system), but was taken for a remote one: each finished run left its checkpoints (about 160 MB) there,
    and --resume said it looked in a local --storage-path only and started afresh."""
    from aevae.trainer import job
    from aevae.trainer.config import TrainConfig

    folder = tmp_path / "runs here"
    uri = "file://" + str(folder).replace(" ", "%20")
    assert job._local_runs(TrainConfig(storage_path=uri)) == folder
    assert job._local_runs(TrainConfig(storage_path="s3://bucket/runs")) is None
    assert job._local_runs(TrainConfig(storage_path="file://host/runs")) is None  # not this machine's
    _fake_run(monkeypatch)

    def trained(config: Any, archs: dict, refs: Any, run_name: str) -> tuple[dict, dict]:
        from aevae.models import build

        (folder / run_name / job.RAY_SNAPSHOT_FILE).write_text("{}")  # where Ray Train keeps the run
        figures = {"train_loss": 700.0, "test_bce": 700.0, "test_kl": 0.0, "test_loss": 700.0}
        return {name: build(arch).state_dict() for name, arch in archs.items()}, {"ae": figures, "epoch_seconds": 1.0}

    monkeypatch.setattr(job, "_fit", trained)
    assert cli.main(["train", "--models", "ae", "--hidden", "16", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", uri]) == 0
    assert list(folder.iterdir()) == []  # the finished run's checkpoints are gone
    stopped = folder / "ae-stopped"
    stopped.mkdir()
    config = TrainConfig(models=("ae",), hidden=(16,), storage_path=uri, resume=True)
    (stopped / job.RUN_FILE).write_text(json.dumps(config.run_identity()))
    (stopped / job.RAY_SNAPSHOT_FILE).write_text("{}")
    capsys.readouterr()
    assert job._run_name(config, "ae") == "ae-stopped"
    assert f"resuming run ae-stopped from its last checkpoint under {folder}" in capsys.readouterr().out


def test_a_model_is_not_written_under_the_other_kinds_name(tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`--models vae --name ae` trained and wrote a VAE as the newest "ae", which every client asking for the AE
    was then served. Refused before anything starts; a kind's own name, or any other, still goes."""
    from aevae.trainer.config import TrainConfig

    code = cli.main(["train", "--models", "vae", "--name", "ae", "--models-dir", str(tmp_path / "m"),
                     "--storage-path", str(tmp_path / "r")])
    assert code == 2
    assert ("--name ae is where the AE versions go; write the VAE under its own name (leave --name out) or another, "
            "e.g. vae-2d") in capsys.readouterr().err
    assert not (tmp_path / "m").exists() and not (tmp_path / "r").exists()
    with pytest.raises(ValueError, match="--name vae is where the VAE versions go; write the AE under"):
        TrainConfig(models=("ae",), name="vae")
    assert TrainConfig(models=("ae",), name="ae").target_name("ae") == "ae"
    assert TrainConfig(models=("vae",), name="vae-2d").target_name("vae") == "vae-2d"


def test_a_resumed_run_says_its_seconds_are_the_sessions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A run resumed after its stop recorded `seconds` and `epoch_seconds` of the resumed session alone as the
    run's (19.6 s for a 4-epoch run that had trained all its epochs before the stop): the manifest says which
    epochs they cover, and the last line says it too; a run trained in one session says nothing of it."""
    from aevae.models import build
    from aevae.repository import ModelRepository
    from aevae.trainer import job

    def fit_with(session_epochs: int) -> Any:
        def trained(config: Any, archs: dict, refs: Any, run_name: str) -> tuple[dict, dict]:
            figures = {"train_loss": 700.0, "test_bce": 700.0, "test_kl": 0.0, "test_loss": 700.0}
            return ({name: build(arch).state_dict() for name, arch in archs.items()},
                    {**{name: figures for name in archs}, "epoch_seconds": 1.0, "session_epochs": session_epochs})
        return trained

    for session, folder in ((1, "resumed"), (3, "whole")):
        _fake_run(monkeypatch, fit=fit_with(session))
        assert cli.main(["train", "--models", "ae", "--epochs", "3", "--hidden", "16", "--models-dir",
                         str(tmp_path / folder), "--storage-path", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    [[resumed]] = ModelRepository(tmp_path / "resumed").versions().values()
    assert resumed.manifest.training["resumed"] == ("resumed from a checkpoint: seconds cover this session, 1 of "
                                                    "the 3 epochs")
    [[whole]] = ModelRepository(tmp_path / "whole").versions().values()
    assert "resumed" not in whole.manifest.training
    assert out.count("this session, resumed: 1 of 3 epochs") == 1
    assert job._resumed(0, 4)["resumed"].endswith("(none: it had trained them all before its stop)")
