"""Reduced precision, fast tier: the int8 decoder every version carries, the decoding precision chosen by the
setting through ModelStore, its outputs close to fp32's, the label ListModels reports, the fallback for a
version without the int8 graph, and the settings and flags that carry the precision."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from aevae.errors import FailedPrecondition
from aevae.onnx_export import DECODER_INT8, decode_quality
from aevae.repository import ModelRepository
from aevae.store import ModelStore

# The largest pixel difference (of 1.0) to fp32 decoding on these tiny random-weight models: int8 weights
# per channel and int8 activations per batch; bf16 keeps 8 bits of mantissa. Measured ~0.007 and ~0.004.
INT8_TOLERANCE = 0.03
BF16_TOLERANCE = 0.02


def _latents(dim: int = 4, n: int = 300) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(n, dim)).astype(np.float32)


def test_every_version_carries_an_int8_decoder_with_its_check(tiny_repo: Path) -> None:
    for name in ("ae", "vae", "vae8"):
        (version,) = ModelRepository(tiny_repo).versions()[name]
        assert DECODER_INT8 in version.manifest.files
        entry = version.manifest.runtimes["int8"]
        assert entry["files"] == [DECODER_INT8]
        assert 0 < entry["max_abs_diff"] <= INT8_TOLERANCE  # quantized: different, but close
        assert version.manifest.runtimes["bf16"]["max_abs_diff"] <= BF16_TOLERANCE


@pytest.mark.parametrize("precision,runtime,label,tolerance", [
    ("int8", "onnx", "onnx-int8", INT8_TOLERANCE),
    ("bf16", "torch", "torch-bf16", BF16_TOLERANCE),
])
def test_the_setting_chooses_the_decoder_and_its_images_are_close_to_fp32(
        tiny_repo: Path, precision: str, runtime: str, label: str, tolerance: float) -> None:
    fp32 = ModelStore(tiny_repo).get("vae")
    store = ModelStore(tiny_repo, precision=precision)
    reduced = store.get("vae")
    assert (reduced.runtime.name, reduced.runtime.precision) == (runtime, precision)  # type: ignore[attr-defined]
    z = _latents()
    expected, got = fp32.decode(z), reduced.decode(z)
    assert 0 < np.abs(got - expected).max() <= tolerance
    assert got.dtype == np.float32 and got.min() >= 0 and got.max() <= 1
    # the uint8 path rounds the same images
    assert np.abs(reduced.decode(z, dtype="uint8").astype(int) - np.rint(got * 255)).max() <= 1
    # encoding stays float32 in every precision
    images = np.random.default_rng(2).random((50, 32, 32), dtype=np.float32)
    np.testing.assert_allclose(reduced.encode(images)[0], fp32.encode(images)[0], atol=1e-4)
    summaries = {s.name: s for s in store.summaries()}
    assert summaries["vae"].runtime == label
    assert {s.runtime for s in ModelStore(tiny_repo).summaries()} == {"onnx"}


def test_a_version_without_the_int8_graph_decodes_in_fp32(tiny_repo: Path) -> None:
    folder = tiny_repo / "ae" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"][DECODER_INT8]
    (folder / DECODER_INT8).unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    store = ModelStore(tiny_repo, precision="int8")
    model = store.get("ae")
    assert model.runtime.precision == "fp32"  # type: ignore[attr-defined]
    z = _latents()
    np.testing.assert_array_equal(model.decode(z), ModelStore(tiny_repo).get("ae").decode(z))
    assert {s.name: s.runtime for s in store.summaries()} == {"ae": "onnx", "vae": "onnx-int8", "vae8": "onnx-int8"}


def test_export_onnx_adds_the_int8_decoder_to_an_older_version(tiny_repo: Path) -> None:
    from aevae.export_command import run

    folder = tiny_repo / "vae" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"][DECODER_INT8], manifest["runtimes"]["int8"], manifest["runtimes"]["bf16"]
    (folder / DECODER_INT8).unlink()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    run(argparse.Namespace(models=["vae"], models_dir=str(tiny_repo), data_root=None))
    (version,) = ModelRepository(tiny_repo).versions()["vae"]
    assert DECODER_INT8 in version.manifest.files  # checksummed: the store verifies it on load
    assert version.manifest.runtimes["int8"]["max_abs_diff"] <= INT8_TOLERANCE
    assert ModelStore(tiny_repo, precision="int8").get("vae").runtime.precision == "int8"  # type: ignore[attr-defined]


def test_impossible_combinations_are_refused_with_the_reason(tiny_repo: Path) -> None:
    with pytest.raises(FailedPrecondition, match="int8 decoding runs on ONNX Runtime"):
        ModelStore(tiny_repo, runtime="torch", precision="int8").get("vae", 1)
    with pytest.raises(FailedPrecondition, match="bf16 decoding runs on torch"):
        ModelStore(tiny_repo, runtime="onnx", precision="bf16").get("vae", 1)
    with pytest.raises(FailedPrecondition, match="precision must be one of"):
        ModelStore(tiny_repo, precision="fp16").get("vae", 1)


def test_decode_quality_is_like_for_like() -> None:
    """The same decoder twice costs nothing; the VAE's loss adds its KL, the AE's is its BCE; a decoder
    that is off by a little costs a little."""
    rng = np.random.default_rng(0)
    images = rng.random((300, 8, 8), dtype=np.float32)

    def decode(z: np.ndarray) -> np.ndarray:
        return np.full((len(z), 8, 8), 0.5, np.float32) + 0.01 * np.tanh(z[:, :1, None])

    def worse(z: np.ndarray) -> np.ndarray:
        return decode(z) + np.float32(0.05)

    def vae(x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        return x.reshape(len(x), -1)[:, :4] - 0.5, np.full((len(x), 4), -1.0, np.float32)

    quality = decode_quality(images, vae, {"fp32": decode, "same": decode, "worse": worse}, chunk=128)
    assert quality["same"] == quality["fp32"]
    assert quality["fp32"]["loss"] > quality["fp32"]["bce"] > 64 * np.log(2) * 0.9
    assert quality["worse"]["bce"] > quality["fp32"]["bce"]
    ae = decode_quality(images, lambda x: (x.reshape(len(x), -1)[:, :4], None), {"fp32": decode})
    assert ae["fp32"]["loss"] == ae["fp32"]["bce"]


def test_settings_and_flags_carry_the_precision(tiny_repo: Path) -> None:
    from aevae.services.server import open_store
    from aevae.services.settings import ServiceSettings
    from aevae.trainer.cli import config_from_args, register
    from aevae.trainer.config import TrainConfig

    parser = argparse.ArgumentParser()
    ServiceSettings.add_arguments(parser)
    settings = ServiceSettings.from_args(parser.parse_args(["--precision", "int8", "--models-dir", str(tiny_repo)]))
    assert settings.precision == "int8" and ServiceSettings().precision == "fp32"
    assert open_store(settings).get("vae").runtime.precision == "int8"  # type: ignore[attr-defined]
    assert ServiceSettings.from_mapping({"precision": "bf16"}).precision == "bf16"
    with pytest.raises(ValueError, match="precision"):
        ServiceSettings(precision="fp16")

    cli = argparse.ArgumentParser()
    register(cli.add_subparsers())
    config = config_from_args(cli.parse_args(["train", "--precision", "bf16"]))
    assert config.precision == "bf16" and config.to_json()["precision"] == "bf16"
    assert cli.parse_args(["train"]).precision == TrainConfig().precision
    with pytest.raises(SystemExit):
        cli.parse_args(["train", "--precision", "fp16"])
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp16")


def test_the_bf16_training_step_keeps_float32_state() -> None:
    """The loop's own step: under bf16 the matrix products run in bfloat16, while the weights, their
    gradients and Adam's moments stay float32, and the loss is close to fp32's."""
    import torch

    from aevae.models import Architecture, build
    from aevae.trainer.loop import autocast, member, train_step

    torch.manual_seed(0)
    x = torch.rand(64, 32, 32)
    losses = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = build(Architecture(kind="vae", hidden=(64, 32)))
        with autocast(precision), torch.no_grad():
            assert model(x)[0].dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
        m = member(precision, model, model, lr=1e-3, total_steps=10)
        losses[precision] = train_step(m, x, precision).item()
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
                   for p in model.parameters())
        state = [v for s in m.optimizer.state.values() for k, v in s.items() if k != "step"]
        assert state and all(v.dtype == torch.float32 for v in state)
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=0.02)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_a_caller_s_images_do_not_depend_on_whose_rows_share_its_pass(tiny_repo: Path, precision: str) -> None:
    """The int8 decoder quantizes activations per batch: a caller's 4 latents merged with another caller's 32
    large ones came back up to 208 of 255 levels off what they decode to alone."""
    from aevae.services.decoder import DecoderLogic
    from aevae.services.settings import Limits

    logic = DecoderLogic(ModelStore(tiny_repo, precision=precision), Limits(1 << 24, 1 << 16))
    rng = np.random.default_rng(3)
    mine = logic.prepare("vae", 1, rng.standard_normal((4, 4)).astype(np.float32), "uint8")
    theirs = logic.prepare("vae", 1, 50 * rng.standard_normal((32, 4)).astype(np.float32), "uint8")
    alone = DecoderLogic.run([mine])[0].images
    together = DecoderLogic.run([theirs, mine, theirs])
    np.testing.assert_array_equal(together[1].images, alone)
    assert [len(d.images) for d in together] == [32, 4, 32]
    merged_anyway = mine.model.decode(np.concatenate([theirs.latents, mine.latents]), "uint8")[32:]
    assert (precision == "int8") == (not np.array_equal(merged_anyway, alone))  # what a shared pass would give
