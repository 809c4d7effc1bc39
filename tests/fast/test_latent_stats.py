"""The latent statistics' PCA, computed in numpy, against scikit-learn's on the same data."""

from __future__ import annotations

import numpy as np
import pytest

from aevae.latent_stats import compute, pca


@pytest.mark.parametrize("dim", [2, 4, 8])
def test_pca_matches_scikit_learn(dim: int) -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(dim)
    latents = (rng.normal(size=(5000, dim)) * np.linspace(3, 0.5, dim) @ rng.normal(size=(dim, dim))
               + rng.normal(size=dim)).astype(np.float32)
    mean, components, ratio = pca(latents, 2)
    reference = PCA(n_components=2).fit(latents)
    np.testing.assert_allclose(mean, reference.mean_, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(components, reference.components_, atol=1e-4)  # the same signs too
    np.testing.assert_allclose(ratio, reference.explained_variance_ratio_, rtol=1e-4)
    np.testing.assert_allclose((latents - mean) @ components.T, reference.transform(latents), atol=1e-3)


def test_stats_of_constant_latents_are_finite() -> None:
    latents = np.ones((300, 4), np.float32)
    stats = compute(latents, np.arange(300) % 10)
    assert stats["pca"]["explained_variance_ratio"] == [0.0, 0.0]
    assert np.isfinite(np.array(stats["pca"]["points"])).all()
    assert len(stats["pca"]["labels"]) == 300 and stats["latent_dim"] == 4


def test_a_dimension_a_float32_step_wide_has_a_violin() -> None:
    """A dimension whose values differ by one float32 step failed numpy's histogram ("Too many bins for data
    range") after a whole training run; it gets the window a constant one gets."""
    latents = np.random.default_rng(0).normal(size=(300, 2)).astype(np.float32)
    latents[:, 1] = np.float32(3.0)
    latents[::2, 1] = np.nextafter(np.float32(3.0), np.float32(4.0))
    stats = compute(latents, np.arange(300) % 10)
    narrow = stats["dims"][1]
    assert narrow["grid"][0] == pytest.approx(2.0) and narrow["grid"][-1] == pytest.approx(4.0)
    assert np.isfinite(narrow["density"]).all() and max(narrow["density"]) > 0
    wide = stats["dims"][0]  # an ordinary one keeps its 5 % margins
    assert wide["grid"][0] == pytest.approx(wide["min"] - 0.05 * (wide["max"] - wide["min"]), abs=1e-5)
