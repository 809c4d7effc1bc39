"""The real Ray Train job on a subset: a complete repository, faithful reloads, versions, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from aevae import mnist
from aevae.repository import MANIFEST, STATS, WEIGHTS, ModelRepository
from aevae.runtimes import torch_module
from aevae.store import ModelStore
from aevae.trainer.loop import evaluate
from helpers import SMALL_TRAINING, run_aevae


def test_repository_is_complete(trained_repo: Path) -> None:
    versions = ModelRepository(trained_repo).versions()
    assert sorted(versions) == ["ae", "vae"]
    for name, kind in (("ae", "ae"), ("vae", "vae")):
        [version] = versions[name]
        assert version.number == 1
        for filename in (MANIFEST, WEIGHTS, STATS):
            assert (version.path / filename).is_file()
        manifest = version.manifest
        assert manifest.kind == kind and manifest.latent_dim == 4 and manifest.number == 1
        assert manifest.image_shape == (32, 32) and set(manifest.files) >= {WEIGHTS, STATS}
        assert manifest.training["train_limit"] == 2000 and manifest.training["seed"] == 0
        assert manifest.data["sha256"]["train-images-idx3-ubyte"] == mnist.FILES["train-images-idx3-ubyte"][1]
        assert manifest.packages["torch"] == torch.__version__
        metrics = manifest.metrics
        assert 45.5 < metrics["test_bce"] < 400
        assert metrics["test_loss"] == pytest.approx(metrics["test_bce"] + metrics["test_kl"], abs=1e-3)
        assert (metrics["test_kl"] > 0) == (kind == "vae")
        stats = version.latent_stats()
        assert stats["count"] == 2000 and len(stats["dims"]) == 4
        for dim in stats["dims"]:
            assert dim["min"] <= dim["quantiles"]["0.5"] <= dim["max"]
            assert len(dim["grid"]) == len(dim["density"]) == 128
            area = np.trapezoid(dim["density"], dim["grid"])
            assert area == pytest.approx(1.0, abs=0.05)  # a density, not raw counts
        labels = np.array(stats["pca"]["labels"])
        counts = np.bincount(labels, minlength=10)
        assert counts.min() > 0 and counts.max() <= 200
        assert np.array(stats["pca"]["points"]).shape == (len(labels), 2)
    assert not list(trained_repo.glob("*/.incoming-*"))


def test_reload_reproduces_the_trained_model(trained_repo: Path, mnist_root: Path) -> None:
    """The weights on disk give the test metrics measured in training and the latents in the statistics."""
    data = mnist.load(mnist_root)
    for name in ("ae", "vae"):
        loaded = ModelStore(trained_repo, runtime="torch").get(name)
        metrics = evaluate(torch_module(loaded), torch.from_numpy(data.test.floats()))
        assert metrics["test_loss"] == pytest.approx(loaded.manifest.metrics["test_loss"], abs=1e-2)
        pca = loaded.latent_stats()["pca"]
        from aevae.latent_stats import balanced_sample

        idx = balanced_sample(data.train.labels[:2000], 200, seed=0)
        assert (data.train.labels[idx] == np.array(pca["labels"])).all()
        mean, logvar = loaded.encode(data.train.floats()[:2000][idx])
        np.testing.assert_allclose(mean, np.array(pca["latents"]), atol=2e-4)
        assert (logvar is None) == (name == "ae")
        images = loaded.decode(mean[:5])
        assert images.shape == (5, 32, 32) and images.min() >= 0 and images.max() <= 1


def test_second_run_with_two_workers_writes_version_2(trained_repo: Path, mnist_root: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained_repo, models)
    done = run_aevae("train", "--data-root", str(mnist_root), "--models-dir", str(models), "--num-workers", "2",
                     "--storage-path", str(tmp_path / "ray"), *SMALL_TRAINING)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[vae] epoch 1/1" in done.stdout and "img/s" in done.stdout and "ETA" in done.stdout
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.is_file()]  # its checkpoints, removed once written
    repo = ModelRepository(models)
    for name in ("ae", "vae"):
        assert [v.number for v in repo.versions()[name]] == [1, 2]
        newest = repo.versions()[name][-1]
        assert newest.number == 2 and newest.manifest.training["num_workers"] == 2
        assert newest.manifest.metrics["test_bce"] < 400


def _copy_raw(mnist_root: Path, target: Path) -> Path:
    raw = target / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.FILES:
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    return raw


def test_missing_mnist_file_names_option_variable_and_files(mnist_root: Path, tmp_path: Path) -> None:
    raw = _copy_raw(mnist_root, tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    done = run_aevae("train", "--data-root", str(tmp_path), "--models-dir", str(tmp_path / "m"), timeout=120)
    assert done.returncode == 2
    for needle in ("t10k-labels-idx1-ubyte", "--data-root", "AEVAE_DATA_ROOT", "train-images-idx3-ubyte"):
        assert needle in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "m").exists()


def test_no_data_root_and_no_download_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(mnist.DATA_ROOT_ENV, raising=False)
    with pytest.raises(mnist.MnistError) as error:
        mnist.load(None, cache=tmp_path / "cache")  # these machines reach no download host
    assert "--data-root" in str(error.value) and mnist.DATA_ROOT_ENV in str(error.value)


@pytest.mark.parametrize("damage", ["truncate", "corrupt"])
def test_damaged_mnist_file_is_named(mnist_root: Path, tmp_path: Path, damage: str) -> None:
    raw = _copy_raw(mnist_root, tmp_path)
    name = "train-labels-idx1-ubyte"
    original = (raw / name).read_bytes()
    (raw / name).unlink()
    (raw / name).write_bytes(original[:-100] if damage == "truncate" else original[:-1] + b"\x07")
    with pytest.raises(mnist.MnistError) as error:
        mnist.load(tmp_path)
    assert name in str(error.value)
    assert ("truncated" if damage == "truncate" else "corrupt") in str(error.value)


def test_bad_training_flags_are_clear_errors(tmp_path: Path) -> None:
    done = run_aevae("train", "--models", "ae,gan", "--models-dir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "--models accepts" in done.stderr and "gan" in done.stderr
    done = run_aevae("train", "--epochs", "0", "--models-dir", str(tmp_path), timeout=60)
    assert done.returncode == 2 and "--epochs must be positive" in done.stderr


def test_killed_worker_resumes_from_last_checkpoint(mnist_root: Path, tmp_path: Path) -> None:
    """Kill the Ray Train worker during training: the FailureConfig restarts it from the last checkpoint."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from helpers import ROOT

    models = tmp_path / "models"
    command = [sys.executable, "-m", "aevae.cli", "train", "--data-root", str(mnist_root), "--models", "vae",
               "--models-dir", str(models), "--storage-path", str(tmp_path / "ray"), "--train-limit", "3000",
               "--epochs", "3"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    lines = []
    killed = False
    for line in driver.stdout:
        lines.append(line)
        if not killed and "epoch 2/3" in line:
            workers = [p for p in psutil.Process(driver.pid).children(recursive=True)
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            assert workers, "no Ray Train worker found under the driver"
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)
            killed = True
    output = "".join(lines)
    assert driver.wait(timeout=300) == 0, output
    assert killed
    assert "resumed from the checkpoint of epoch" in output
    assert "epoch 3/3" in output
    # progress lines of earlier epochs evaluate a subset of the test set, the last epoch all of it
    [first] = [line for line in lines if "epoch 1/3" in line]
    [last] = [line for line in lines if "epoch 3/3" in line]
    assert "test(2,000) bce" in first and "test(10,000) bce" in last
    assert [v.number for v in ModelRepository(models).versions()["vae"]] == [1]


def test_sigterm_stops_training_and_its_workers_with_one_line(mnist_root: Path, tmp_path: Path) -> None:
    """SIGTERM (a container stop, `kill`) mid-run: exit 143 with one line saying nothing was written and where
    the checkpoint is, no traceback, no Ray stack dump, and no process of the run left behind. ray.init had made
    SIGTERM a sys.exit, which skipped the driver's own account of the stop. Then `--resume` with the same
    options continues the run from its checkpoint (before, the checkpoint could only be left behind) and
    removes it once the version is written."""
    import signal
    import subprocess
    import sys
    import time

    import psutil

    from helpers import ROOT

    models = tmp_path / "models"
    command = [sys.executable, "-m", "aevae.cli", "train", "--data-root", str(mnist_root), "--models", "vae",
               "--models-dir", str(models), "--storage-path", str(tmp_path / "ray"), "--train-limit", "3000",
               "--epochs", "20"]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    assert driver.stdout is not None
    lines, family = [], []
    for line in driver.stdout:
        lines.append(line)
        if not family and "epoch 1/20" in line:
            family = psutil.Process(driver.pid).children(recursive=True)
            driver.send_signal(signal.SIGTERM)
    output = "".join(lines)
    assert driver.wait(timeout=120) == 128 + signal.SIGTERM, output
    assert family and "epoch 20/20" not in output
    assert "stopped by SIGTERM" in output and "nothing written" in output and str(tmp_path / "ray") in output
    assert "Traceback" not in output and "Stack" not in output, output
    assert not (models / "vae").exists() or not ModelRepository(models).versions().get("vae")
    deadline = time.monotonic() + 60
    while [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [" ".join(p.cmdline()[:3]) for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, left

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resuming run vae-" in resumed.stdout and "resumed from the checkpoint of epoch" in resumed.stdout
    assert "epoch 1/20" not in resumed.stdout, resumed.stdout  # it went on from the checkpoint, not from the start
    [version] = ModelRepository(models).versions()["vae"]
    assert version.manifest.training["epochs"] == 20
    # its seconds are the resumed session's, and the manifest and the last line say so
    assert "seconds cover this session" in version.manifest.training["resumed"]
    assert "of 20 epochs)" in resumed.stdout and "this session, resumed:" in resumed.stdout
    assert not list((tmp_path / "ray").iterdir())  # the finished run's checkpoints are gone
