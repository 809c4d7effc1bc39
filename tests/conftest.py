"""Fixtures: the MNIST data root, a small repository trained by the real Ray job once per session, and tiny
repositories written without Ray for the fast tier. Helpers live in tests/helpers.py."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import Iterator

import pytest

from helpers import SMALL_TRAINING, data_root, run_aevae, write_tiny_set

# Started in the background of a shell without job control (`bash .ci/run &` in a script), the run inherits
# SIGINT ignored, and so would every command the tests start (an ignored signal stays ignored across exec): the
# tests of Ctrl-C found `aevae train` running to the end. The handler of a normal start, for the run and its
# children (a handler, unlike an ignored signal, is reset to the default by exec).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _signal_handlers() -> Iterator[None]:
    """Each test ends with the Ctrl-C and SIGTERM handlers it began with: a command run in process that was
    stopped leaves them ignored (aevae.ray_start.stopping), which would make the rest of the run deaf to both."""
    handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    yield
    for number, handler in handlers.items():
        signal.signal(number, handler)


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


@pytest.fixture(scope="session")
def _tiny_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_set(tmp_path_factory.mktemp("tiny") / "models")


@pytest.fixture
def tiny_repo(_tiny_template: Path, tmp_path: Path) -> Path:
    """ae/1 and vae/1 (4-d latent, 32 x 32) and vae8/1 (8-d latent, 24 x 20): small random models written
    with the trainer's writer (ONNX graphs included), a fresh copy for each test (change them freely)."""
    return Path(shutil.copytree(_tiny_template, tmp_path / "models"))
