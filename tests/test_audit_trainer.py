"""The real `aevae train` (Ray Train on 500 images, one epoch, a small model) as an operator and a fault-injection
harness meet it: stopped at each stage of a run, and given an MNIST file it may not read. The in-process
versions of these are in tests/fast/test_audit_trainer_fast.py."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from aevae import mnist
from aevae.repository import ModelRepository
from helpers import AEVAE, ROOT

TINY = ["--train-limit", "500", "--epochs", "1", "--hidden", "32"]


def _stopped_at(marker: str, sig: int, delay: float, mnist_root: Path, tmp_path: Path) -> tuple[int, str, str]:
    """Runs `aevae train`, sends `sig` `delay` seconds after it prints a line holding `marker`; returns its exit
    status, stdout and stderr."""
    command = [*AEVAE, "train", "--data-root", str(mnist_root), "--models-dir", str(tmp_path / "models"),
               "--storage-path", str(tmp_path / "ray"), *TINY]
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert driver.stdout is not None and driver.stderr is not None
    lines, sent = [], False
    try:
        for line in driver.stdout:
            lines.append(line)
            if not sent and marker in line:
                time.sleep(delay)
                driver.send_signal(sig)
                sent = True
        code = driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    out, err = "".join(lines), driver.stderr.read()
    assert sent, out + err
    return code, out, err


def test_sigterm_while_the_versions_are_written_says_which_were(mnist_root: Path, tmp_path: Path) -> None:
    """After the training, between the AE's version and the VAE's: it ended with 143 and no word, ae/1 in
    place and vae not. Now one line on stderr says so, and the run's checkpoint stays for --resume."""
    code, out, err = _stopped_at("[vae] computing latent statistics", signal.SIGTERM, 0.0, mnist_root, tmp_path)
    assert code == 128 + signal.SIGTERM, out + err
    assert "[ae] wrote" in out
    [line] = err.splitlines()
    assert line.startswith("aevae train: stopped by SIGTERM after "), err
    assert line.endswith(f"written: ae/1, not vae; the run's last checkpoint stays under --storage-path "
                         f"{tmp_path / 'ray'} (`aevae train --resume` with the same options continues it)"), err
    scan = ModelRepository(tmp_path / "models").scan()
    assert {name: [v.number for v in vs] for name, vs in scan.versions.items()} == {"ae": [1]}
    assert not scan.broken and not list((tmp_path / "models").rglob(".incoming-*"))
    assert len(list((tmp_path / "ray").iterdir())) == 1  # the run's checkpoints, kept


def test_ctrl_c_before_the_first_checkpoint_claims_none_and_leaves_no_run_folder(mnist_root: Path,
                                                                                tmp_path: Path) -> None:
    """Half a second after "training ...", Ray Train is still starting its worker: the line said "the run's last
    checkpoint stays under --storage-path" and `aevae train --resume` continues it, where there was nothing but
    the folder of aevae-run.json, left there for good."""
    code, out, err = _stopped_at("training ae, vae", signal.SIGINT, 0.5, mnist_root, tmp_path)
    assert code == 130, out + err
    assert "epoch 1/1" not in out, "the epoch ended before the stop: the test needs a shorter delay"
    assert "Traceback" not in err
    [line] = err.splitlines()
    assert line.startswith("aevae train: stopped by Ctrl-C after "), err
    assert line.endswith("nothing written; it stopped before its first checkpoint, so there is nothing to resume")
    assert list((tmp_path / "ray").iterdir()) == []
    assert not ModelRepository(tmp_path / "models").versions()


def test_sigterm_while_ray_starts_is_a_stop_with_its_line(mnist_root: Path, tmp_path: Path) -> None:
    """A second after MNIST is read the driver is importing or starting Ray: ray.init's own SIGTERM handler
    (sys.exit(15)) ended the run with status 15 and not a word."""
    code, out, err = _stopped_at("MNIST from", signal.SIGTERM, 1.0, mnist_root, tmp_path)
    assert code == 128 + signal.SIGTERM, out + err
    assert "training ae, vae" not in out, "Ray had started: the test needs a shorter delay"
    assert err.startswith("aevae train: stopped by SIGTERM after ") and "nothing written" in err, err
    assert len(err.splitlines()) == 1, err
    assert list((tmp_path / "ray").iterdir()) == []


def test_an_mnist_file_the_user_may_not_read_is_one_line(mnist_root: Path, tmp_path: Path) -> None:
    """As a user who may not read one of the files (a user namespace: root reads everything): a
    PermissionError traceback and exit 1; now one line naming the file, exit 2, nothing made."""
    probe = [] if shutil.which("unshare") is None else ["unshare", "--user", *AEVAE[:1], "-c", "import aevae.cli"]
    if not probe or subprocess.run(probe, capture_output=True, cwd=ROOT).returncode != 0:
        pytest.skip("no user namespace here in which this interpreter runs as nobody")
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in mnist.FILES:
        (raw / name).symlink_to(mnist_root / "MNIST" / "raw" / name)
    unreadable = raw / "t10k-labels-idx1-ubyte"
    unreadable.unlink()
    shutil.copyfile(mnist_root / "MNIST" / "raw" / unreadable.name, unreadable)
    unreadable.chmod(0)
    for folder in (tmp_path, tmp_path / "data", tmp_path / "data" / "MNIST", raw):
        folder.chmod(0o777)  # the namespace's user is nobody: it makes the models' folder beside them
    done = subprocess.run(["unshare", "--user", *AEVAE, "train", "--data-root", str(tmp_path / "data"),
                           "--models-dir", str(tmp_path / "models"), "--storage-path", str(tmp_path / "ray"), *TINY],
                          capture_output=True, text=True, cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                                                      "HOME": str(tmp_path)})
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr == f"aevae train: error: {unreadable} cannot be read: Permission denied.\n"
    assert not (tmp_path / "models").exists() and not (tmp_path / "ray").exists()


def test_a_diverged_run_stops_after_the_epoch_it_diverged_in(mnist_root: Path, tmp_path: Path) -> None:
    """With a learning rate far too high the weights are nan after the first epoch, and stay so: the run trained
    on, nan after nan, to its last epoch (15 by default) before it said that it diverged."""
    done = subprocess.run([*AEVAE, "train", "--data-root", str(mnist_root), "--models-dir", str(tmp_path / "models"),
                           "--storage-path", str(tmp_path / "ray"), *TINY, "--epochs", "5", "--lr", "1e308"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "[vae] epoch 1/5  train nan" in done.stdout and "epoch 2/5" not in done.stdout, done.stdout
    assert done.stderr == ("aevae train: error: training diverged for ae, vae (a loss of nan or inf), nothing "
                           "written: lower --lr (this run 1e+308, default 0.003); stopped after epoch 1 of 5\n")
    assert list((tmp_path / "ray").iterdir()) == []  # nan checkpoints: nothing to resume
    assert not (tmp_path / "models").exists()
