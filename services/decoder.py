"""The decoder's logic, transport-independent: numpy latents in, numpy images out, typed errors.

Big batches are decoded in chunks into one preallocated output, which bounds the memory the model's hidden
layers take whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aevae.services import inputs
from aevae.services.errors import InvalidArgument
from aevae.services.limits import Limits
from aevae.services.model_cache import ModelCache, ModelSummary

OUTPUT_DTYPES = ("float32", "uint8")
CHUNK = 4096


@dataclass(frozen=True)
class Decoded:
    model: str
    version: int
    images: np.ndarray


class DecoderLogic:
    def __init__(self, cache: ModelCache, limits: Limits = Limits(), chunk: int = CHUNK):
        self.cache = cache
        self.limits = limits
        self.chunk = chunk

    def ready(self, model: str, version: int) -> bool:
        """True when decoding needs no disk access: the caller may then run it inline."""
        return self.cache.peek(model, version or None) is not None

    def decode(self, model: str, version: int, latents: np.ndarray, dtype: str = "float32") -> Decoded:
        dtype = dtype or "float32"
        if dtype not in OUTPUT_DTYPES:
            raise InvalidArgument(f"dtype: expected float32 or uint8 (or empty for float32), got {dtype!r}")
        loaded = self.cache.get(inputs.model_name(model), inputs.version_number(version))
        z = inputs.latents(latents, loaded.latent_dim, loaded.name)
        n = len(z)
        self.limits.check_batch(n, "latents")
        height, width = loaded.manifest.get("image_shape", (32, 32))
        self.limits.check_response(n, height * width * np.dtype(dtype).itemsize, "latents")
        out = np.empty((n, height, width), dtype=dtype)
        for start in range(0, n, self.chunk):
            images = loaded.decode(z[start:start + self.chunk])
            if dtype == "uint8":
                np.multiply(images, 255, out=images)
                np.add(images, 0.5, out=images)
            out[start:start + len(images)] = images  # the cast truncates, so +0.5 rounds
        return Decoded(loaded.name, loaded.version.version, out)

    def list_models(self) -> list[ModelSummary]:
        return self.cache.summaries()
