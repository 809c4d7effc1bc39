"""`aevae report`: the page and its figures from a real run, and the measurements behind them.

One report run (module fixture) on a copy of the session's small repository: it trains `ae-2d` itself (a
short but real Ray training, 8 epochs on 2,000 images, enough for a decoder that depends on its latent) and
loads the digit classifier that the `classifier` fixture trained into a temporary cache. Budget: ~60-90 s.
"""

from __future__ import annotations

import json
import re
import shutil
from html import escape
from pathlib import Path

import numpy as np
import pytest
from helpers import run_aevae

from aevae import mnist
from aevae.report import classifier as digit_classifier
from aevae.report import information, samples
from aevae.report.page import HEADINGS
from aevae.report.quantize import quantize, rate_distortion
from aevae.store import ModelStore

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CLASSIFIER_IMAGES = digit_classifier.TRAIN_IMAGES  # the default the CLI uses: the report reuses this cache


@pytest.fixture(scope="module")
def data(mnist_root: Path) -> mnist.Mnist:
    return mnist.load(mnist_root)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def classifier(data: mnist.Mnist, cache_dir: Path) -> digit_classifier.DigitClassifier:
    return digit_classifier.load_or_train(
        data.train.floats()[:CLASSIFIER_IMAGES], data.train.labels[:CLASSIFIER_IMAGES],
        data.sha256["train-images-idx3-ubyte"], cache_dir, seed=0)


@pytest.fixture(scope="module")
def report(trained_repo: Path, mnist_root: Path, classifier, cache_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Runs the real CLI once; returns where it wrote and what it printed."""
    work = tmp_path_factory.mktemp("report")
    models = work / "models"
    shutil.copytree(trained_repo, models)  # the report adds ae-2d: never into the shared fixture
    out = work / "out"
    done = run_aevae("report", "--models-dir", str(models), "--data-root", str(mnist_root), "--out", str(out),
                     "--cache-dir", str(cache_dir), "--test-limit", "1000", "--samples", "200", "--ae2d-epochs", "8",
                     "--storage-path", str(work / "ray"))
    assert done.returncode == 0, done.stdout + done.stderr
    return {"out": out, "models": models, "stdout": done.stdout,
            "numbers": json.loads((out / "numbers.json").read_text())}


# --- the page ---------------------------------------------------------------------------------------------


def test_report_writes_the_page_and_every_figure(report: dict, trained_repo: Path) -> None:
    out, numbers = report["out"], report["numbers"]
    html = (out / "index.html").read_text()
    figures = numbers["figures"]
    assert {"reconstructions", "pca", "violins", "samples", "validity", "ranges", "rate_distortion",
            "traversal_ae", "traversal_vae", "traversal_ae-2d"} <= set(figures)
    for path in figures.values():
        assert (out / path).read_bytes()[:8] == PNG_MAGIC, path
        assert f'src="{path}"' in html, f"{path} is not on the page"
    on_disk = {p.relative_to(out).as_posix() for p in (out / "figures").glob("*.png")}
    assert on_disk == set(figures.values())
    for heading in HEADINGS:
        assert f"<h2>{escape(heading)}</h2>" in html, heading
    # ae-2d was trained into the copy, not into the shared fixture
    assert ModelStore(report["models"]).get("ae-2d").latent_dim == 2
    assert not (trained_repo / "ae-2d").exists()


def test_page_shows_the_numbers_of_this_run(report: dict) -> None:
    html, n = (report["out"] / "index.html").read_text(), report["numbers"]
    info = n["information"]
    assert info["image_bits"] == 8192 and "8,192" in html
    assert info["latent_bits"] == {"ae": 128, "vae": 128, "ae-2d": 64}
    assert f"{info['bce_floor']:.2f}" in html
    for name in ("ae", "vae"):
        r = n["ranges"][name]
        assert f"[{r['min']:.2f}, {r['max']:.2f}]" in html
    assert "[-5.93, 5.98]" in html and "[-22.59, 74.46]" in html  # the seed's, labelled as such
    for label, value in n["samples"]["validity"].items():
        assert f"{value:.1%}" in html, label
    for name, curve in info["rate_distortion"].items():
        assert f"{curve['float_bce']:.2f}" in html, name
    assert "quantized <em>mean</em>" in html  # the VAE's deterministic evaluation is stated
    assert "Two AE latents against four VAE latents" in html
    assert n["run"]["test_images"] == 1000 and n["samples"]["count"] == 200


def test_progress_is_printed_part_by_part(report: dict) -> None:
    out = report["stdout"]
    for i in range(1, 8):
        assert re.search(rf"\] {i}/7 .*: done in", out), f"no progress line for part {i}"
    assert "ae-2d is missing: training it" in out and "[ae-2d] epoch 8/8" in out
    assert "digit classifier: cached" in out  # the fixture's classifier was reused, not retrained


def test_quantization_at_16_bits_matches_float_and_1_bit_is_clearly_worse(report: dict) -> None:
    curve = report["numbers"]["information"]["rate_distortion"]["ae-2d"]
    assert curve["bits_per_dim"] == list(range(1, 17))
    assert abs(curve["bce"][-1] - curve["float_bce"]) <= 0.5
    assert curve["bce"][0] > curve["float_bce"] + 5
    assert 1 <= curve["bits_within_1_nat"] <= 16


def test_rate_distortion_in_process(report: dict, data: mnist.Mnist) -> None:
    """The same measurement called directly on the report's ae-2d: exact at 16 bits, far off at 1."""
    model = ModelStore(report["models"], runtime="torch").get("ae-2d")
    dims = model.latent_stats()["dims"]
    images = data.test.floats()[:500]
    latents, _ = model.encode(images)
    curve = rate_distortion(model, latents, images, [d["min"] for d in dims], [d["max"] for d in dims], (1, 16))
    assert abs(curve.bce[1] - curve.float_bce) <= 0.5
    assert curve.bce[0] - curve.float_bce > 5
    assert curve.bits_within(1.0) == 16


def test_traversals_sweep_each_dimension_over_its_training_range(report: dict) -> None:
    n = report["numbers"]
    for name, dim in (("ae", 4), ("vae", 4), ("ae-2d", 2)):
        sweeps = n["traversals"][name]["sweeps"]
        assert len(sweeps) == dim
        stats = ModelStore(report["models"]).get(name).latent_stats()["dims"]
        assert n["traversals"][name]["median"] == pytest.approx([d["quantiles"]["0.5"] for d in stats], abs=1e-5)
        for sweep, d in zip(sweeps, stats):
            assert sweep["from"] == pytest.approx(d["min"], abs=1e-5)
            assert sweep["to"] == pytest.approx(d["max"], abs=1e-5)
            assert len(sweep["digits"]) == 12


# --- measurements as pure functions ---------------------------------------------------------------------


def test_validity_is_high_on_real_digits_and_low_on_noise(classifier, data: mnist.Mnist) -> None:
    rng = np.random.default_rng(1)
    digits = data.test.floats()[:2000]
    probabilities = classifier.probabilities(digits)
    assert (probabilities.argmax(axis=1) == data.test.labels[:2000]).mean() >= 0.9
    assert digit_classifier.validity(probabilities) >= 0.7
    assert digit_classifier.validity(classifier.probabilities(samples.uniform_noise_images(1000, rng))) <= 0.1
    blank = np.zeros((10, 32, 32), np.float32)
    assert digit_classifier.validity(classifier.probabilities(blank + 1.0)) == 0.0  # an all-white image


def test_validity_counts_confident_rows() -> None:
    p = np.array([[0.95, 0.05], [0.5, 0.5], [0.1, 0.9], [0.0, 0.0]])
    assert digit_classifier.validity(p) == 0.5
    with pytest.raises(ValueError, match="empty"):
        digit_classifier.validity(np.zeros((0, 10)))


def test_classifier_cache_is_plain_arrays_and_reused(classifier, data: mnist.Mnist, cache_dir: Path) -> None:
    lines: list[str] = []
    again = digit_classifier.load_or_train(
        data.train.floats()[:CLASSIFIER_IMAGES], data.train.labels[:CLASSIFIER_IMAGES],
        data.sha256["train-images-idx3-ubyte"], cache_dir, seed=0, say=lines.append)
    assert any("cached" in line for line in lines) and not any("training" in line for line in lines)
    (path,) = cache_dir.glob("digit-classifier-*.npz")
    np.load(path, allow_pickle=False).close()  # no object arrays: nothing to unpickle
    images = data.test.floats()[:100]
    np.testing.assert_array_equal(again.probabilities(images), classifier.probabilities(images))


def test_numpy_prediction_matches_scikit_learn(data: mnist.Mnist) -> None:
    images, labels = data.train.floats()[:1500], data.train.labels[:1500]
    small, mlp = digit_classifier.train(images, labels, seed=0)
    test = data.test.floats()[:200]
    projected = (digit_classifier.features_in(test) - small.pca_mean) @ small.pca_components.T
    np.testing.assert_allclose(small.probabilities(test, gate=False), mlp.predict_proba(projected), atol=1e-5)


def test_quantize_uses_bin_centres_and_clips() -> None:
    z = np.array([[-1.0, 0.0], [0.1, 1.0], [0.9, 5.0], [2.0, -3.0]], np.float32)
    q = quantize(z, lo=[0.0, 0.0], hi=[1.0, 4.0], bits=1)
    np.testing.assert_allclose(q, [[0.25, 1.0], [0.25, 1.0], [0.75, 3.0], [0.75, 1.0]])
    rng = np.random.default_rng(0)
    fine = rng.uniform(-3, 7, size=(1000, 3)).astype(np.float32)
    step = 10 / 2 ** 16
    assert np.abs(quantize(fine, [-3] * 3, [7] * 3, 16) - fine).max() <= step / 2 + 1e-6
    assert len(np.unique(quantize(fine, [-3] * 3, [7] * 3, 2)[:, 0])) == 4
    with pytest.raises(ValueError, match="bits"):
        quantize(z, [0, 0], [1, 1], 0)
    with pytest.raises(ValueError, match="hi > lo"):
        quantize(z, [0, 1], [1, 1], 4)


def test_bce_floor_is_the_entropy_of_the_grey_levels(data: mnist.Mnist) -> None:
    import torch
    from torch.nn import functional as F

    images = data.test.floats()
    floor = information.bce_floor(images)
    assert 44.5 < floor < 46.5  # the brief: about 45.5 nats per image
    # it is exactly the BCE of a perfect reconstruction (prediction = target)
    x = torch.from_numpy(images[:200].astype(np.float64)).clamp(1e-12, 1 - 1e-12)
    perfect = F.binary_cross_entropy(x, x, reduction="sum").item() / 200
    assert perfect == pytest.approx(information.bce_floor(images[:200]), abs=1e-3)
    np.testing.assert_allclose(information.binary_entropy(np.array([0.0, 1.0, 0.5])), [0, 0, np.log(2)])


def test_bits_of_images_and_latents() -> None:
    assert information.image_bits((32, 32)) == 8192  # the seed's 32 * 32 * log2(256)
    assert information.latent_bits(4) == 128 and information.latent_bits(2) == 64


def test_uniform_box_samples_stay_inside() -> None:
    rng = np.random.default_rng(0)
    z = samples.uniform_box(500, [-2.0, 10.0], [1.0, 11.0], rng)
    assert z.shape == (500, 2) and z.dtype == np.float32
    assert (z[:, 0] >= -2).all() and (z[:, 0] <= 1).all() and (z[:, 1] >= 10).all() and (z[:, 1] <= 11).all()


# --- errors ---------------------------------------------------------------------------------------------


def test_missing_models_and_bad_flags_give_clear_errors(tmp_path: Path, mnist_root: Path) -> None:
    done = run_aevae("report", "--models-dir", str(tmp_path / "empty"), "--data-root", str(mnist_root),
                     "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "unknown model 'ae'" in done.stderr and "aevae train" in done.stderr
    done = run_aevae("report", "--samples", "0")
    assert done.returncode == 2 and "--samples must be a positive integer, got 0" in done.stderr
