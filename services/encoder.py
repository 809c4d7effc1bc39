"""The encoder's logic, transport-independent: numpy images in, numpy latents out, typed errors.

The gRPC servicer (grpc_encoder.py) is one front end; a Ray Serve deployment can wrap the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aevae.services import inputs
from aevae.services.limits import Limits
from aevae.services.model_cache import ModelCache, ModelSummary


@dataclass(frozen=True)
class Encoded:
    model: str
    version: int
    mean: np.ndarray
    logvar: np.ndarray | None
    sample: np.ndarray | None


class EncoderLogic:
    def __init__(self, cache: ModelCache, limits: Limits = Limits()):
        self.cache = cache
        self.limits = limits

    def ready(self, model: str, version: int) -> bool:
        """True when encoding needs no disk access: the caller may then run it inline."""
        return self.cache.peek(model, version or None) is not None

    def encode(
        self,
        model: str,
        version: int,
        images: np.ndarray,
        noise: np.random.Generator | None = None,
    ) -> Encoded:
        """`noise` given: also draw z = mean + exp(logvar / 2) * eps from it (the AE's sample is its mean)."""
        loaded = self.cache.get(inputs.model_name(model), inputs.version_number(version))
        self.limits.check_batch(len(images), "images")
        mean, logvar = loaded.encode(inputs.images(images))
        sample = None
        if noise is not None:
            sample = mean.copy()
            if logvar is not None:
                eps = noise.standard_normal(mean.shape, dtype=np.float32)
                sample += np.exp(0.5 * logvar) * eps
        return Encoded(loaded.name, loaded.version.version, mean, logvar, sample)

    def list_models(self) -> list[ModelSummary]:
        return self.cache.summaries()

    def latent_stats(self, model: str, version: int) -> tuple[str, int, dict[str, Any]]:
        resolved = self.cache.resolve(inputs.model_name(model), inputs.version_number(version))
        return resolved.name, resolved.version, resolved.latent_stats()
