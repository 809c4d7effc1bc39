"""The latent statistics a version carries: what the UI's violins, axes and PCA scatter plot need.

Computed once by the trainer over the whole training set, so that the services only read JSON.
"""

from __future__ import annotations

from typing import Any

import numpy as np

QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
GRID_POINTS = 128
SAMPLE_PER_CLASS = 200


def density(values: np.ndarray, lo: float, hi: float, points: int = GRID_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """A Gaussian kernel density on an even grid, via a fine histogram (fast for 60k values, no scipy)."""
    grid = np.linspace(lo, hi, points)
    bins = points * 8
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi), density=True)
    centers = (edges[:-1] + edges[1:]) / 2
    bandwidth = max(1.06 * values.std() * len(values) ** (-1 / 5), (hi - lo) / bins)  # Silverman's rule
    step = edges[1] - edges[0]
    radius = int(np.ceil(4 * bandwidth / step))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) * step / bandwidth) ** 2)
    smooth = np.convolve(hist, kernel / kernel.sum(), mode="same")
    return grid, np.interp(grid, centers, smooth)


def balanced_sample(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to `per_class` items of each label, the same for the same seed."""
    rng = np.random.default_rng(seed)
    picks = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
    return np.sort(np.concatenate(picks))


def pca(latents: np.ndarray, components: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, components as rows, explained variance ratio) of the latents: the eigenvectors of their
    covariance, largest first, each signed so that its largest entry is positive (scikit-learn's convention, so
    the plots keep their orientation). In numpy: a d x d eigenproblem for d of 4 or 8 needs no scikit-learn,
    whose import alone took a second of every training run."""
    x = latents.astype(np.float64)
    mean = x.mean(axis=0)
    centred = x - mean
    variances, vectors = np.linalg.eigh(centred.T @ centred / max(len(x) - 1, 1))
    order = np.argsort(variances)[::-1][:components]
    rows = vectors[:, order].T
    rows *= np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])[:, None]
    total = variances.clip(min=0).sum()
    ratio = variances[order].clip(min=0) / total if total > 0 else np.zeros(len(order))
    return mean, rows, ratio


def compute(latents: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """Per dimension: range, quantiles, mean, std and a density for violins; a PCA and its labelled sample."""
    dims = []
    for values in latents.T:
        lo, hi = float(values.min()), float(values.max())
        # A constant dimension (a dead unit), or one whose values differ by a few float32 steps, gets a window of
        # 1 either side: numpy cannot cut 1,024 bins out of a range of one float32 step ("Too many bins for data
        # range"), which failed a training run after its last epoch.
        margin = 0.05 * (hi - lo) if hi - lo > 1e-6 * max(1.0, abs(lo), abs(hi)) else 1.0
        grid, dens = density(values.astype(np.float64), lo - margin, hi + margin)
        dims.append({
            "min": lo, "max": hi, "mean": float(values.mean()), "std": float(values.std()),
            "quantiles": {str(q): float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))},
            "grid": grid.round(5).tolist(), "density": dens.round(7).tolist(),
        })
    mean, components, ratio = pca(latents, min(2, latents.shape[1]))
    idx = balanced_sample(labels, SAMPLE_PER_CLASS, seed)
    projected = (latents[idx] - mean) @ components.T
    return {
        "count": int(len(latents)),
        "latent_dim": int(latents.shape[1]),
        "source": "encoder mean over the training set",
        "dims": dims,
        "pca": {
            "mean": mean.tolist(),
            "components": components.tolist(),
            "explained_variance_ratio": ratio.tolist(),
            "points": projected.round(4).tolist(),
            "labels": labels[idx].astype(int).tolist(),
            "latents": latents[idx].round(4).tolist(),
        },
    }
