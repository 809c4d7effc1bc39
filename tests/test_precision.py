"""Reduced precision end to end: `aevae train --precision bf16` runs one short epoch through the real Ray job
and writes a usable version (with its int8 decoder and the measured test-set quality of each precision), and a
decoder service started with `--precision int8` serves the int8 graph, says so in ListModels, and returns
images close to fp32's."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from aevae.client import DecoderClient
from aevae.onnx_export import DECODER_INT8
from aevae.repository import ModelRepository
from aevae.services.process import ServiceProcess
from aevae.store import ModelStore
from helpers import SMALL_TRAINING, run_aevae

# Largest pixel difference (of 1.0) of int8 decoding to fp32's on the briefly trained VAE, and the most test
# BCE it may cost (nats per image; the bar for the default models is 0.5).
INT8_TOLERANCE = 0.3  # the default-trained models measure ~0.1 on N(0, I) latents
INT8_BCE_COST = 1.0


@pytest.fixture(scope="module")
def bf16_repo(tmp_path_factory: pytest.TempPathFactory, mnist_root: Path) -> Path:
    models = tmp_path_factory.mktemp("bf16") / "models"
    done = run_aevae("train", "--data-root", str(mnist_root), "--models-dir", str(models), "--storage-path",
                     str(models.parent / "ray"), "--models", "vae", "--precision", "bf16", *SMALL_TRAINING)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "bf16" in done.stdout
    return models


def test_bf16_training_writes_a_usable_version(bf16_repo: Path, mnist_root: Path) -> None:
    (version,) = ModelRepository(bf16_repo).versions()["vae"]
    manifest = version.manifest
    assert manifest.training["precision"] == "bf16"
    # one epoch on 2,000 images: far from converged, far better than chance (710 nats for 1,024 coin flips)
    assert 45.5 < manifest.metrics["test_bce"] < 300 and 0 < manifest.metrics["test_kl"] < 100
    assert DECODER_INT8 in manifest.files
    int8, bf16 = manifest.runtimes["int8"]["test"], manifest.runtimes["bf16"]["test"]
    assert int8["images"] == 10_000
    # the fp32 graph's BCE from probabilities matches training's from logits on the same posterior sample's
    # distribution (another sample generator, so within a nat)
    assert int8["fp32_bce"] == pytest.approx(manifest.metrics["test_bce"], abs=1.0)
    assert abs(int8["bce_cost"]) <= INT8_BCE_COST and abs(bf16["bce_cost"]) <= INT8_BCE_COST
    assert int8["loss"] - int8["bce"] == pytest.approx(manifest.metrics["test_kl"], abs=1.0)
    model = ModelStore(bf16_repo).get("vae")  # float32 weights: the fp32 runtimes load them as ever
    images = model.decode(np.zeros((4, 4), np.float32))
    assert images.shape == (4, 32, 32) and np.isfinite(images).all()


@pytest.fixture(scope="module")
def int8_decoder(bf16_repo: Path) -> Iterator[ServiceProcess]:
    service = ServiceProcess("decoder", bf16_repo, args=["--precision", "int8"]).start()
    try:
        service.wait_healthy()
        yield service
    finally:
        service.stop()


def test_the_decoder_service_serves_int8_when_asked(int8_decoder: ServiceProcess, bf16_repo: Path) -> None:
    z = np.random.default_rng(0).normal(size=(500, 4)).astype(np.float32)
    with DecoderClient(int8_decoder.address) as client:
        images = client.decode(z, model="vae")
        (info,) = [m for m in client.list_models() if m.name == "vae"]
    assert info.runtime == "onnx-int8"
    expected = ModelStore(bf16_repo).get("vae").decode(z)
    assert 0 < np.abs(images - expected).max() <= INT8_TOLERANCE
    assert np.abs(images - expected).mean() <= 0.01


def test_a_batch_job_on_an_int8_fleet_records_its_precision_and_refuses_another(int8_decoder: ServiceProcess,
                                                                                 tmp_path: Path) -> None:
    """A client cannot choose the fleet's precision: decode-batch --decoder takes the one served, checks a
    --precision given against it, and records it in the job (so a rerun on an fp32 fleet is another job)."""
    from aevae.batch.job import fleet_model
    from aevae.errors import UserError

    with DecoderClient(int8_decoder.address) as client:
        ref = fleet_model(client, "--decoder", "vae", None)
        assert ref.precision == "int8" and ref.describe()["precision"] == "int8"
        assert fleet_model(client, "--decoder", "vae", None, "int8").precision == "int8"
        with pytest.raises(UserError, match=r"decodes 'vae' in int8 \(onnx-int8\), not fp32.*--precision fp32"):
            fleet_model(client, "--decoder", "vae", None, "fp32")
    done = run_aevae("decode-batch", "--prior", "200", "--model", "vae", "--output", str(tmp_path / "out"),
                     "--format", "npz", "--decoder", int8_decoder.address, "--precision", "bf16")
    assert done.returncode == 2 and "not bf16" in done.stderr and not (tmp_path / "out").exists()


def test_a_batch_job_refuses_a_fleet_whose_replicas_decode_in_different_precisions(
        int8_decoder: ServiceProcess, bf16_repo: Path, tmp_path: Path) -> None:
    """The spans of one batch go to every replica: an fp32 and an int8 replica would mix their pixels in one
    output while the job records one precision, so decode-batch refuses the fleet, naming each replica's."""
    fp32 = ServiceProcess("decoder", bf16_repo).start()
    try:
        fp32.wait_healthy()
        fleet = f"{int8_decoder.address},{fp32.address}"
        done = run_aevae("decode-batch", "--prior", "9000", "--model", "vae", "--output", str(tmp_path / "out"),
                         "--format", "npz", "--decoder", fleet)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "different precisions" in done.stderr, done.stderr
        assert f"{int8_decoder.address}: int8 (onnx-int8)" in done.stderr
        assert f"{fp32.address}: fp32 (onnx)" in done.stderr
        assert not (tmp_path / "out").exists()
        # one precision throughout: the same fleet of one kind runs
        done = run_aevae("decode-batch", "--prior", "300", "--model", "vae", "--output", str(tmp_path / "ok"),
                         "--format", "npz", "--decoder", f"{fp32.address},{fp32.address}")
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        fp32.stop()
