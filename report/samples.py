"""Where generated latents come from: the VAE's prior, and the AE's bounding box (the seed's "luck")."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def standard_normal(count: int, latent_dim: int, rng: np.random.Generator) -> np.ndarray:
    """Draws from N(0, I), the prior the VAE is trained towards and the natural guess for any model."""
    return rng.standard_normal((count, latent_dim)).astype(np.float32)


def uniform_box(count: int, lo: Sequence[float], hi: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """Draws uniformly from the box [lo, hi] per dimension: the best guess without a prior."""
    lo_, hi_ = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    return rng.uniform(lo_, hi_, size=(count, len(lo_))).astype(np.float32)


def uniform_noise_images(count: int, rng: np.random.Generator, shape: tuple[int, int] = (32, 32)) -> np.ndarray:
    """Images of independent uniform pixels: the reference a digit classifier must not call digits."""
    return rng.random((count, *shape), dtype=np.float32)
