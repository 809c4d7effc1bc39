"""`aevae train --resume` picks the run it continues (trainer.job.stopped_run): the newest run folder under
--storage-path that ran with the same options and left a checkpoint Ray Train can restore."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from aevae.errors import UserError
from aevae.trainer import job
from aevae.trainer.config import TrainConfig


def stopped(root: Path, name: str, config: TrainConfig, snapshot: bool = True, age: float = 0.0) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / job.RUN_FILE).write_text(json.dumps(config.run_identity()))
    if snapshot:
        (folder / job.RAY_SNAPSHOT_FILE).write_text("{}")
    when = folder.stat().st_mtime - age
    for path in (folder, folder / job.RAY_SNAPSHOT_FILE) if snapshot else (folder,):  # its last checkpoint's time
        os.utime(path, (when, when))
    return folder


def test_the_newest_run_of_the_same_options_with_a_checkpoint_is_resumed(tmp_path: Path) -> None:
    config = TrainConfig(models=("vae",), epochs=6, storage_path=str(tmp_path), resume=True)
    stopped(tmp_path, "vae-old", config, age=100)
    stopped(tmp_path, "vae-new", config)
    stopped(tmp_path, "vae-newer-no-checkpoint", config, snapshot=False)  # stopped before its first epoch
    stopped(tmp_path, "vae-other-seed", TrainConfig(models=("vae",), epochs=6, seed=1))
    stopped(tmp_path, "vae-other-epochs", TrainConfig(models=("vae",), epochs=7))
    (tmp_path / "vae-not-aevae").mkdir()
    assert job.stopped_run(config, "vae") == "vae-new"
    # where the data, the repository or Ray are, and the CPUs, do not make another run
    moved = TrainConfig(models=("vae",), epochs=6, storage_path=str(tmp_path), data_root="/elsewhere",
                        models_dir="/else", cpus_per_worker=7, resume=True)
    assert job.stopped_run(moved, "vae") == "vae-new"
    assert job.stopped_run(TrainConfig(models=("vae",), epochs=6, precision="fp32", storage_path=str(tmp_path)),
                           "vae") is None


def test_resume_continues_that_run_or_starts_afresh_and_says_which(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(models=("vae",), epochs=6, storage_path=str(tmp_path), resume=True)
    assert job._run_name(config, "vae").startswith("vae-2")  # nothing to resume
    assert "no stopped run with these options" in capsys.readouterr().out
    [fresh] = list(tmp_path.iterdir())
    assert json.loads((fresh / job.RUN_FILE).read_text()) == config.run_identity()
    (fresh / job.RAY_SNAPSHOT_FILE).write_text("{}")  # as if it had been stopped after an epoch
    assert job._run_name(config, "vae") == fresh.name
    assert f"resuming run {fresh.name}" in capsys.readouterr().out


def test_resume_looks_in_a_local_storage_path_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A remote storage path cannot be listed: the run starts afresh and says so (`aevae up` always passes
    --resume, so refusing would have stopped it), and nothing is written on this machine."""
    assert job._run_name(TrainConfig(storage_path="s3://bucket/runs", resume=True), "ae-vae").startswith("ae-vae-2")
    assert "in a local --storage-path only, not s3://bucket/runs: starting afresh" in capsys.readouterr().out
    assert not (Path.cwd() / "s3:").exists()


def test_a_storage_path_that_cannot_be_written_is_said_before_training(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(UserError, match="cannot keep the run's checkpoints there"):
        job._run_name(TrainConfig(storage_path=str(blocked)), "ae-vae")
