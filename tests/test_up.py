"""`aevae up` over a trained repository: both services come up, answer, and stop cleanly on SIGTERM."""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from aevae.client import AevaeError, DecoderClient, EncoderClient
from helpers import UpProcess as Up


def test_up_serves_both_services_says_how_to_call_them_and_stops_cleanly(trained_repo: Path, tmp_path) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained_repo, models)
    up = Up("--models-dir", str(models), "--encoder-port", "0", "--decoder-port", "0", "--no-ui")
    try:
        up.wait_ready(120)
        addresses = up.addresses()
        encoder, decoder = addresses["encoder"], addresses["decoder"]
        assert f"grpcurl -plaintext {encoder} list" in up.text and "from aevae.client import" in up.text
        assert "training" not in up.text  # the repository was not empty
        with EncoderClient(encoder) as enc, DecoderClient(decoder) as dec:
            assert enc.health() == "SERVING" and dec.health() == "SERVING"
            z = enc.encode(np.zeros((2, 28, 28), np.uint8)).mean
            assert dec.decode(z).shape == (2, 32, 32)
        assert up.stop() == 0, up.text
        assert "aevae up: stopped" in up.text
        for address in (encoder, decoder):
            with DecoderClient(address, timeout=2, retries=0) as gone, pytest.raises(AevaeError) as info:
                gone.health()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, f"{address} still answers after aevae up stopped"
    finally:
        up.kill()


def test_up_on_an_empty_repository_trains_first_then_serves_the_ui(mnist_root: Path, tmp_path: Path) -> None:
    """The main job from nothing: train (a small run here), then both services and the web UI."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        ui_port = s.getsockname()[1]
    models = tmp_path / "models"
    up = Up("--models-dir", str(models), "--data-root", str(mnist_root), "--encoder-port", "0",
            "--decoder-port", "0", "--ui-port", str(ui_port),
            "--train-args", f"--train-limit 2000 --epochs 1 --storage-path {tmp_path / 'ray'}")
    try:
        up.wait_ready(300)
        addresses = up.addresses()
        assert "training with --train-args '--train-limit 2000" in up.text and "[vae] epoch 1/1" in up.text
        assert sorted(p.name for p in models.iterdir()) == ["ae", "vae"]
        assert f"http://127.0.0.1:{ui_port}/" in up.text
        with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with DecoderClient(addresses["decoder"]) as dec:
            assert dec.decode(np.zeros((3, 4), np.float32), model="ae").shape == (3, 32, 32)
        assert up.stop() == 0, up.text
    finally:
        up.kill()


def test_sigterm_while_up_starts_the_services_stops_what_it_started(trained_repo: Path) -> None:
    """SIGTERM before `aevae up` was ready killed it alone: the encoder it had started served on, orphaned."""
    up = Up("--models-dir", str(trained_repo), "--encoder-port", "0", "--decoder-port", "0", "--no-ui", session=True)
    try:
        up.wait_for("[encoder] aevae encoder serving", 120)  # the decoder is still starting
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(60) == 128 + signal.SIGTERM, up.text
        time.sleep(0.5)
        assert up.left() == [], up.text
        assert "aevae up: stopped" in up.text
    finally:
        up.kill()
        up.left()


def test_sigterm_while_up_trains_stops_the_trainer(mnist_root: Path, tmp_path: Path) -> None:
    """SIGTERM during the training killed `aevae up` alone: the trainer trained on and wrote the versions."""
    models = tmp_path / "models"
    up = Up("--models-dir", str(models), "--data-root", str(mnist_root), "--no-ui", "--encoder-port", "0",
            "--decoder-port", "0", "--train-args", f"--train-limit 2000 --epochs 3 --storage-path {tmp_path / 'ray'}",
            session=True)
    try:
        up.wait_for("training ae, vae", 180)  # Ray is up, the workers start
        up.process.send_signal(signal.SIGTERM)
        assert up.process.wait(90) == 128 + signal.SIGTERM, up.text
        time.sleep(1)
        assert up.left() == [], up.text
        assert "wrote" not in up.text and not (models / "vae" / "1").exists(), up.text
        assert "stopped by SIGTERM" in up.text, up.text  # the trainer was sent what `aevae up` got
    finally:
        up.kill()
        up.left()


def test_a_service_that_fails_to_start_is_one_line_of_up(trained_repo: Path) -> None:
    """The error repeated the child's whole output (already echoed above it) under `aevae up: error:`."""
    up = Up("--models-dir", str(trained_repo), "--encoder-port", "0", "--decoder-port", "0", "--no-ui",
            "--serve-args", "--runtime tvm")
    try:
        assert up.process.wait(120) == 2, up.text
        errors = [line for line in up.lines if line.startswith("aevae up: error:")]
        assert errors == ["aevae up: error: the encoder exited with code 2: --runtime must be auto, onnx or torch, "
                          "got 'tvm'\n"], up.text
        assert up.lines[-1] == errors[0], up.text  # nothing after it
    finally:
        up.kill()
