"""Checks what a request carries, numpy only, against the model that will serve it.

Every error names the field, what is accepted and what came, so that a caller can fix the request without
reading this file. Arrays are checked, not converted: the model converts them chunk by chunk, so a big
request costs little more memory than its own bytes.
"""

from __future__ import annotations

import numpy as np

from aevae.errors import InvalidArgument, shorten
from aevae.finite import nonfinite
from aevae.inference import PAD, accepted_image_shapes

# Latents beyond this magnitude are refused: far outside any trained latent space (|z| < 100 here), and past
# about 1e19 float32 arithmetic overflows into NaN images.
LATENT_BOUND = 1e4


def model_name(name: str) -> str:
    if not name:
        raise InvalidArgument("model: expected a model name such as 'vae' or 'ae', got an empty string")
    return name


def _finite(array: np.ndarray, field: str) -> None:
    refusal = nonfinite(array, field)
    if refusal is not None:
        raise InvalidArgument(refusal)


def images(array: np.ndarray, image_shape: tuple[int, int], field: str = "images") -> np.ndarray:
    """N x H x W of the model's image shape (or the shape before padding by PAD pixels per side), uint8
    0..255 or float32 in [0, 1]."""
    shapes = accepted_image_shapes(image_shape)
    if array.ndim != 3 or tuple(array.shape[1:]) not in shapes:
        wanted = " or ".join(f"N x {h} x {w}" for h, w in shapes)
        raise InvalidArgument(f"{field}.shape: expected {wanted}, got {list(array.shape)}")
    if array.dtype != np.uint8:
        _finite(array, field)
        if array.size and (array.min() < 0 or array.max() > 1):
            row = int(np.flatnonzero((array.min(axis=(1, 2)) < 0) | (array.max(axis=(1, 2)) > 1))[0])
            raise InvalidArgument(
                f"{field}: float32 pixels must lie in [0, 1] (send uint8 for 0..255), "
                f"got values in [{array.min():.9g}, {array.max():.9g}], the first outside in image {row}"
            )  # 1.0000001 is not "1" here: 9 digits
    return array


def latents(array: np.ndarray, latent_dim: int, model: str, field: str = "latents") -> np.ndarray:
    """N x latent_dim float32, finite, each value within +-LATENT_BOUND."""
    if array.ndim != 2 or array.shape[1] != latent_dim:
        raise InvalidArgument(
            f"{field}.shape: model {shorten(model)} expects N x {latent_dim} latents, got {list(array.shape)}"
        )
    if not array.size or np.abs(array).max() <= LATENT_BOUND:  # one pass when all is well (NaN fails it)
        return array
    _finite(array, field)
    if array.size:
        rows = np.flatnonzero(np.abs(array).max(axis=1) > LATENT_BOUND)
        if len(rows):
            raise InvalidArgument(f"{field}: values must lie in [-{LATENT_BOUND:g}, {LATENT_BOUND:g}]; row "
                                  f"{rows[0]} holds {array[rows[0]].tolist()}")
    return array


__all__ = ["LATENT_BOUND", "PAD", "images", "latents", "model_name"]
