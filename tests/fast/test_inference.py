"""The one chunked encode/decode: chunking does not change results, uint8 rounds, shapes come from the
manifest, and non-finite output is never returned."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aevae.inference import LoadedModel, NonFiniteOutput, sample
from aevae.store import ModelStore


def test_chunked_decode_equals_one_pass_and_uint8_rounds(tiny_repo: Path) -> None:
    model = ModelStore(tiny_repo).get("vae")
    z = np.random.default_rng(0).normal(size=(37, 4)).astype(np.float32)
    whole = model.decode(z, chunk=1000)
    assert whole.shape == (37, 32, 32) and whole.dtype == np.float32
    assert np.allclose(model.decode(z, chunk=5), whole, atol=1e-6)
    as_uint8 = model.decode(z, "uint8", chunk=7)
    assert as_uint8.dtype == np.uint8 and np.array_equal(as_uint8, np.floor(whole * 255 + 0.5).astype(np.uint8))


def test_encode_takes_uint8_and_unpadded_images_chunk_by_chunk(tiny_repo: Path) -> None:
    model = ModelStore(tiny_repo).get("vae")
    digits = np.random.default_rng(1).integers(0, 256, size=(9, 28, 28), dtype=np.uint8)
    padded = np.pad(digits.astype(np.float32) / 255, ((0, 0), (2, 2), (2, 2)))
    mean, logvar = model.encode(digits, chunk=4)
    mean2, logvar2 = model.encode(padded, chunk=100)
    assert mean.shape == logvar.shape == (9, 4)  # type: ignore[union-attr]
    assert np.allclose(mean, mean2, atol=1e-5) and np.allclose(logvar, logvar2, atol=1e-5)  # type: ignore[arg-type]


def test_a_model_of_another_shape_is_served_by_its_manifest(tiny_repo: Path) -> None:
    model = ModelStore(tiny_repo).get("vae8")
    assert model.latent_dim == 8 and model.image_shape == (24, 20)
    assert model.decode(np.zeros((2, 8), np.float32)).shape == (2, 24, 20)


def test_sample_uses_sigma_and_the_ae_sample_is_its_mean() -> None:
    mean = np.zeros((20000, 1), np.float32)
    z = sample(mean, np.full((20000, 1), np.log(4.0), np.float32), np.random.default_rng(0))
    assert z.std() == pytest.approx(2.0, rel=0.03)
    assert np.array_equal(sample(mean, None, np.random.default_rng(0)), mean)


class _NaNRuntime:
    name = "nan"
    rows_alone = True

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, None]:
        return np.full((len(images), 4), np.nan, np.float32), None

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return np.full((len(latents), 32, 32), np.nan, np.float32)


def test_non_finite_output_is_never_returned(tiny_repo: Path) -> None:
    manifest = ModelStore(tiny_repo).get("ae").manifest
    model = LoadedModel(manifest, _NaNRuntime())
    with pytest.raises(NonFiniteOutput):
        model.decode(np.zeros((1, 4), np.float32))
    with pytest.raises(NonFiniteOutput):
        model.encode(np.zeros((1, 32, 32), np.float32))


def test_the_onnx_runtime_computes_what_torch_computes(tiny_repo: Path) -> None:
    onnx, torch_ = ModelStore(tiny_repo, runtime="onnx").get("vae"), ModelStore(tiny_repo, runtime="torch").get("vae")
    assert (onnx.runtime.name, torch_.runtime.name) == ("onnx", "torch")
    assert ModelStore(tiny_repo).get("vae").runtime.name == "onnx"  # auto prefers the graphs
    z = np.random.default_rng(3).normal(size=(50, 4)).astype(np.float32)
    assert np.abs(onnx.decode(z) - torch_.decode(z)).max() <= 1e-5
    images = torch_.decode(z)
    for a, b in zip(onnx.encode(images), torch_.encode(images)):
        assert np.abs(a - b).max() <= 1e-5  # type: ignore[operator]


def test_export_onnx_adds_graphs_to_a_version_written_without_them(tiny_repo: Path) -> None:
    import argparse
    import json

    from aevae.export_command import run
    from aevae.repository import ModelRepository

    folder = tiny_repo / "ae" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    for name in ("encoder.onnx", "decoder.onnx"):
        (folder / name).unlink()
        del manifest["files"][name]
    del manifest["runtimes"]["onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert ModelStore(tiny_repo).get("ae").runtime.name == "torch"
    run(argparse.Namespace(models=["ae"], models_dir=str(tiny_repo)))
    (version,) = ModelRepository(tiny_repo).versions()["ae"]
    assert {"encoder.onnx", "decoder.onnx"} <= set(version.manifest.files)
    assert version.manifest.runtimes["onnx"]["max_abs_diff"] <= 1e-4
    assert ModelStore(tiny_repo).get("ae").runtime.name == "onnx"
    from aevae.errors import UserError

    with pytest.raises(UserError, match=r"no such model or version: ae/7, gan; available: .*ae: 1"):
        run(argparse.Namespace(models=["ae/7", "gan"], models_dir=str(tiny_repo)))
    with pytest.raises(UserError, match=r"no model versions under .*empty: `aevae train` writes them"):
        run(argparse.Namespace(models=[], models_dir=str(tiny_repo.parent / "empty")))


def test_a_request_of_both_infinities_is_not_finite_and_leaves_no_warning_in_the_log() -> None:
    """+inf and -inf in one request summed to NaN with numpy's RuntimeWarning, printed into a service's log."""
    import warnings

    from aevae.finite import all_finite, quiet_sums

    with warnings.catch_warnings(record=True) as seen:
        quiet_sums()  # as a service sets its warnings up (pytest's own catch_warnings dropped the import's)
        assert not all_finite(np.array([[np.inf, -np.inf]], np.float32))
        assert not all_finite(np.array([[np.nan, 1.0]], np.float32)) and all_finite(np.ones((2, 4), np.float32))
    assert not [w for w in seen if "invalid value" in str(w.message)], [str(w.message) for w in seen]
