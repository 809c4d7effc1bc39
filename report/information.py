"""The seed's information-theory numbers, computed from the data and the models instead of quoted.

An image of 32 x 32 pixels at 8 bits holds 8192 bits; a float32 latent holds 32 bits per dimension. The BCE
of a reconstruction cannot go below the entropy of the grey levels themselves: a pixel of value p scored
against a prediction q costs -p ln q - (1 - p) ln(1 - q) nats, which is smallest, at the binary entropy H(p),
when q = p. Summed over the pixels that is the floor a perfect reconstruction still pays.
"""

from __future__ import annotations

import numpy as np

BITS_PER_PIXEL = 8
FLOAT_BITS = 32


def image_bits(shape: tuple[int, ...] = (32, 32), bits_per_pixel: int = BITS_PER_PIXEL) -> int:
    """Bits in one uncompressed image: pixels times bits per pixel (the seed's 8192 for 32 x 32 x 8)."""
    return int(np.prod(shape)) * bits_per_pixel


def latent_bits(latent_dim: int, bits_per_value: int = FLOAT_BITS) -> int:
    """Bits a latent vector can carry at the given precision (the seed's 128 for four float32 values)."""
    return latent_dim * bits_per_value


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """H(p) in nats, elementwise; 0 at p = 0 and p = 1 (the limit), so black and white pixels cost nothing."""
    p = np.asarray(p, dtype=np.float64)
    inner = (p > 0) & (p < 1)
    q = np.where(inner, p, 0.5)
    h = -(q * np.log(q) + (1 - q) * np.log1p(-q))
    return np.where(inner, h, 0.0)


def bce_floor(images: np.ndarray) -> float:
    """Mean over images of the summed binary entropy of their pixels: nats per image a perfect
    reconstruction scores in BCE (about 45.5 on the MNIST test set)."""
    images = np.asarray(images)
    per_image = binary_entropy(images.reshape(len(images), -1)).sum(axis=1)
    return float(per_image.mean())
