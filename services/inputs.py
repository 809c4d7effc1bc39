"""Checks and normalizes what a request carries, numpy only: images to the training layout, latents as is.

Every error names the field, what is accepted and what came, so that a caller can fix the request without
reading this file.
"""

from __future__ import annotations

import numpy as np

from aevae.services.errors import InvalidArgument

IMAGE_SHAPES = ((32, 32), (28, 28))
PAD = 2  # 28 x 28 MNIST digits are padded by 2 zero pixels per side to 32 x 32, as in training


def model_name(name: str) -> str:
    if not name:
        raise InvalidArgument("model: expected a model name such as 'vae' or 'ae', got an empty string")
    return name


def version_number(version: int) -> int | None:
    """0 means the newest."""
    if version < 0:
        raise InvalidArgument(f"version: expected 0 (the newest) or a positive version, got {version}")
    return version or None


def _finite(array: np.ndarray, field: str) -> None:
    if array.size and not np.isfinite(array).all():
        bad = np.argwhere(~np.isfinite(array))[0].tolist()
        raise InvalidArgument(f"{field}: expected finite values, got {array[tuple(bad)]} at index {bad}")


def images(array: np.ndarray, field: str = "images") -> np.ndarray:
    """N x 32 x 32 or N x 28 x 28, uint8 0..255 or float32 in [0, 1] -> float32 N x 32 x 32 in [0, 1]."""
    if array.ndim != 3 or tuple(array.shape[1:]) not in IMAGE_SHAPES:
        raise InvalidArgument(
            f"{field}.shape: expected N x 32 x 32 or N x 28 x 28, got {list(array.shape)}"
        )
    if array.dtype == np.uint8:
        floats = array.astype(np.float32) / np.float32(255)
    else:
        _finite(array, field)
        if array.size and (array.min() < 0 or array.max() > 1):
            raise InvalidArgument(
                f"{field}: float32 pixels must lie in [0, 1] (send uint8 for 0..255), "
                f"got values in [{array.min():g}, {array.max():g}]"
            )
        floats = np.asarray(array, dtype=np.float32)
    if floats.shape[1:] == (28, 28):
        floats = np.pad(floats, ((0, 0), (PAD, PAD), (PAD, PAD)))
    return floats


def latents(array: np.ndarray, latent_dim: int, model: str, field: str = "latents") -> np.ndarray:
    """N x latent_dim float32, finite."""
    if array.ndim != 2 or array.shape[1] != latent_dim:
        raise InvalidArgument(
            f"{field}.shape: model {model!r} expects N x {latent_dim} latents, got {list(array.shape)}"
        )
    _finite(array, field)
    return array
