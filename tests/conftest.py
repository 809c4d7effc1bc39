"""Shared fixtures: the MNIST data root and one small repository trained by the real Ray job per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AEVAE = [sys.executable, "-m", "aevae.cli"]
SMALL_TRAINING = ["--train-limit", "2000", "--epochs", "1", "--batch-size", "128"]


def data_root() -> Path:
    value = os.environ.get("AEVAE_DATA_ROOT") or str(ROOT.parent / "shared" / "datasets")
    path = Path(value)
    if not (path / "MNIST" / "raw").is_dir():
        pytest.fail(f"MNIST not found: set AEVAE_DATA_ROOT to a folder holding MNIST/raw/ (tried {path})")
    return path


def run_aevae(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs the real console script in a subprocess and returns what it printed."""
    return subprocess.run([*AEVAE, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    return data_root()


@pytest.fixture(scope="session")
def trained_repo(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    """A model repository with ae/1 and vae/1, written by `aevae train` on 2,000 images for one epoch.

    Read-only for tests: copy it (shutil.copytree) before changing anything in it.
    """
    models = tmp_path_factory.mktemp("repo") / "models"
    done = run_aevae("train", "--data-root", str(mnist_root), "--models-dir", str(models),
                     "--storage-path", str(models.parent / "ray"), *SMALL_TRAINING)
    assert done.returncode == 0, done.stdout + done.stderr
    return models
