"""The ONNX Runtime path end to end: a decoder process serves the trained graphs without loading torch, and
its images equal torch's; a model of another shape is served beside the defaults."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from aevae.client import DecoderClient, EncoderClient
from aevae.services.process import ServiceProcess
from aevae.store import ModelStore
from helpers import running, write_tiny


@pytest.fixture(scope="module")
def repo(trained_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("onnx") / "models"
    shutil.copytree(trained_repo, copy)
    write_tiny(copy, "vae8", latent_dim=8, image_shape=(24, 20))  # another latent size and image shape
    return copy


@pytest.fixture(scope="module")
def services(repo: Path) -> Iterator[dict[str, ServiceProcess]]:
    with running(repo) as started:
        yield started


def _libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


def test_the_decoder_serves_onnx_without_torch_and_equals_torch(services: dict[str, ServiceProcess],
                                                                repo: Path) -> None:
    z = np.random.default_rng(0).normal(size=(300, 4)).astype(np.float32)
    with DecoderClient(services["decoder"].address) as client:
        images = client.decode(z, model="vae")
        (info,) = [m for m in client.list_models() if m.name == "vae"]
    pid = services["decoder"].process.pid  # type: ignore[union-attr]
    maps = _libraries(pid)
    assert "onnxruntime" in maps and "libtorch" not in maps
    assert info.runtime == "onnx"
    expected = ModelStore(repo, runtime="torch").get("vae").decode(z)
    assert np.abs(images - expected).max() <= 1e-5


def test_a_model_of_another_shape_is_served_beside_the_defaults(services: dict[str, ServiceProcess]) -> None:
    with EncoderClient(services["encoder"].address) as enc, DecoderClient(services["decoder"].address) as dec:
        infos = {m.name: m for m in dec.list_models()}
        assert (infos["vae8"].latent_dim, tuple(infos["vae8"].image_shape)) == (8, (24, 20))
        assert (infos["vae"].latent_dim, tuple(infos["vae"].image_shape)) == (4, (32, 32))
        z = np.random.default_rng(1).normal(size=(5000, 8)).astype(np.float32)  # big enough to stream
        images = dec.decode(z, model="vae8", dtype="uint8")
        assert images.shape == (5000, 24, 20)
        latents = enc.encode(images[:7], model="vae8").mean
        assert latents.shape == (7, 8)
        assert dec.decode(np.zeros((2, 4), np.float32), model="vae").shape == (2, 32, 32)


def test_onnx_runtime_is_loaded_with_its_telemetry_off(tmp_path: Path) -> None:
    """ONNX Runtime 1.32 records usage events under ~/.cache/Microsoft and uploads them (the services looked up
    mobile.events.data.microsoft.com from their containers): a model server must not. A fresh process (ONNX
    Runtime reads the setting once) loading a version and decoding, as the services do, writes none."""
    import os
    import subprocess
    import sys

    write_tiny(tmp_path / "models")
    home = tmp_path / "home"
    code = ("import numpy; from aevae.store import ModelStore; "
            f"m = ModelStore({str(tmp_path / 'models')!r}).get('vae'); m.decode(numpy.zeros((1, 4), 'f4')); "
            "print(m.runtime.name)")
    env = {k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "onnx", done.stdout + done.stderr
    assert not (home / ".cache" / "Microsoft").exists(), sorted(str(p) for p in home.rglob("*"))
