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
from aevae.report import claims
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
            "traversal_ae", "traversal_vae", "traversal_ae-2d", "interpolations"} <= set(figures)
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
    for i in range(1, 9):
        assert re.search(rf"\] {i}/8 .*: done in", out), f"no progress line for part {i}"
    assert "ae-2d is missing: training it" in out and "[ae-2d] epoch 8/8" in out
    assert "digit classifier: cached" in out  # the fixture's classifier was reused, not retrained


def test_claims_table_comes_first_with_verdicts_and_intervals(report: dict) -> None:
    html, n = (report["out"] / "index.html").read_text(), report["numbers"]
    assert html.index("The seed's claims, measured") < html.index(f"<h2>{escape(HEADINGS[0])}</h2>")
    rows = n["claims"]
    assert len(rows) == 8  # ranges, N(0, I), boxes, interpolations, one dimension, 2-d AE, compression, bits
    assert {r["verdict"] for r in rows} <= {"supported", "partly", "not reproduced"}
    for row in rows:
        assert escape(row["ours"]) in html and escape(row["verdict"]) in html and row["rule"]
    vae = n["samples"]["shares"]["vae: N(0, I)"]
    assert (vae["lo"], vae["hi"]) == pytest.approx(claims.wilson(vae["k"], vae["n"]))
    assert vae["n"] == 200 and claims.fmt_share(vae) in rows[1]["ours"]
    assert "[-22.59, 74.46]" in rows[0]["seed"]  # the seed's numbers, labelled as the seed's


def test_both_populations_for_the_ranges(report: dict) -> None:
    html, r = (report["out"] / "index.html").read_text(), report["numbers"]["ranges"]
    e = r["explorer_inputs"]
    assert e["count"] == 23 and e["source"] == "inputs.json"
    for name in ("ae", "vae"):
        assert f"[{e[name]['min']:.2f}, {e[name]['max']:.2f}]" in html
    assert "Two populations" in html


def test_sample_grids_mark_the_valid_samples(report: dict) -> None:
    from matplotlib.image import imread

    n = report["numbers"]["samples"]
    marked = sum(len(g["valid_indices"]) for g in n["grids"].values())
    assert all(g["shown"] == 64 and set(g["valid_indices"]) <= set(range(64)) for g in n["grids"].values())
    pixels = imread(report["out"] / report["numbers"]["figures"]["samples"])[..., :3]
    green = ((pixels[..., 1] > 0.7) & (pixels[..., 0] < 0.35) & (pixels[..., 2] < 0.5)).sum()
    assert (green > 0) == (marked > 0)  # a green frame exactly when some shown sample counted valid


def test_interpolations_score_every_in_between_frame(report: dict) -> None:
    it = report["numbers"]["interpolations"]
    assert it["pairs"] == 200 and it["steps"] == 9
    for name in ("ae", "vae", "ae-2d"):
        share = it["shares"][name]
        assert share["n"] == 200 * 7  # the two ends of each pair excluded
        assert len(it["digits"][name]) == 4 and all(len(d) == 9 for d in it["digits"][name])
    assert all(p["from"] != p["to"] for p in it["shown"])
    assert "8. Interpolations between test digits" in (report["out"] / "index.html").read_text()


def test_bits_per_dimension_finding_is_stated(report: dict) -> None:
    html = (report["out"] / "index.html").read_text()
    curves = report["numbers"]["information"]["rate_distortion"]
    assert "<strong>Bits per dimension:</strong>" in html
    ae, vae = curves["ae"]["bits_within_1_nat"], curves["vae"]["bits_within_1_nat"]
    if ae != vae:
        assert f"({min(ae, vae) if vae < ae else vae} against {ae if vae < ae else ae})" in html or \
            f"({vae} against {ae})" in html


def test_wilson_interval() -> None:
    assert claims.wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert claims.wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert claims.wilson(737, 1000) == pytest.approx((0.7088, 0.7634), abs=1e-4)
    assert claims.wilson(3, 0) == (0.0, 1.0)
    for k, n in ((0, 1000), (1000, 1000), (0, 7), (1, 3)):  # the share itself always lies inside
        lo, hi = claims.wilson(k, n)
        assert lo <= k / n <= hi


def _numbers(vae_share: tuple[int, int], ae_share: tuple[int, int], box: tuple[int, int], vae_box: tuple[int, int],
             ranges: tuple[float, float], bits: tuple[int, int]) -> dict:
    """A minimal numbers.json for claims.evaluate: the fields it reads."""
    def curve(float_bce: float, bce: list[float], within: int) -> dict:
        return {"bits_per_dim": list(range(1, len(bce) + 1)), "bce": bce, "float_bce": float_bce,
                "bits_within_1_nat": within}

    def span(width: float) -> dict:
        return {"min": -width / 2, "max": width / 2}

    return {
        "run": {"test_images": 10000},
        "ranges": {"vae": span(ranges[0]), "ae": span(ranges[1]), "width_ratio_ae_over_vae": ranges[1] / ranges[0],
                   "seed": {"vae": [-5.93, 5.98], "ae": [-22.59, 74.46]},
                   "explorer_inputs": {"count": 23, "vae": span(ranges[0]), "ae": span(ranges[1])}},
        "samples": {"shares": {"vae: N(0, I)": claims.share(*vae_share), "ae: N(0, I)": claims.share(*ae_share),
                               "ae: uniform in its box": claims.share(*box),
                               "vae: uniform in its box": claims.share(*vae_box),
                               "real test digits": claims.share(900, 1000)}},
        "interpolations": {"pairs": 200, "shares": {"vae": claims.share(1200, 1400), "ae": claims.share(500, 1400)}},
        "traversals": {m: {"sweeps": [{"distinct_digits": list("0123")}]} for m in ("vae", "ae")},
        "information": {"image_bits": 8192, "latent_bits": {"vae": 128}, "bce_floor": 45.5, "tolerance_nats": 1.0,
                        "rate_distortion": {"ae": curve(102.0, [300.0, 150.0, 104.0], bits[0]),
                                            "vae": curve(104.0, [310.0, 140.0, 105.0], bits[1])},
                        "ae2d_vs_vae": {"ae2d_float_bce": 130.0, "vae_float_bce": 104.0, "difference": 26.0,
                                        "at_equal_total_bits": {"8": {"ae-2d": 150.0, "vae": 160.0},
                                                                "16": {"ae-2d": 135.0, "vae": 120.0}}}},
    }


def test_claim_verdicts_follow_their_rules() -> None:
    by = {c.claim.split(" ")[1]: c for c in claims.evaluate(_numbers((737, 1000), (571, 1000), (529, 1000),
                                                                      (650, 1000), (8.0, 16.0), (7, 6)))}
    verdicts = [c.verdict for c in claims.evaluate(_numbers((737, 1000), (571, 1000), (529, 1000), (650, 1000),
                                                            (8.0, 16.0), (7, 6)))]
    assert verdicts == ["partly",  # 2x as wide, the seed's 8.8x: wider, but not half as much
                        "supported",  # 73.7 % against 57.1 % and 52.9 %: the intervals are apart
                        "supported",  # 65 % against 52.9 %
                        "partly",  # VAE 86 % of in-between frames, AE 36 %
                        "supported",  # four digits along one sweep in each model
                        "partly",  # the 2-d AE is worse at float32 but better at 8 bits
                        "partly",  # the AE wins at float32 and at 2 of 3 bit depths
                        "supported"]  # 8192 / 128
    assert by["AE's"].ours.startswith("on the explorer's 23 inputs")
    close = [c.verdict for c in claims.evaluate(_numbers((560, 1000), (540, 1000), (700, 1000), (600, 1000),
                                                         (8.0, 80.0), (7, 6)))]
    assert close[:3] == ["supported", "partly", "not reproduced"]  # 10x; overlapping intervals; box below


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
    assert not (tmp_path / "out").exists()  # the --out it made at the start (and its empty figures/) went again
    done = run_aevae("report", "--samples", "0")
    assert done.returncode == 2 and "--samples must be a positive integer, got 0" in done.stderr
