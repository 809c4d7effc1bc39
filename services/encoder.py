"""The encoder's logic, transport-independent: numpy images in, numpy latents out, typed errors.

The gRPC servicer (grpc_encoder.py) is one front end; the Ray Serve deployment wraps the same class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from aevae.inference import sample
from aevae.services import inputs
from aevae.services.settings import Limits
from aevae.store import ModelStore, ModelSummary


@dataclass(frozen=True)
class Encoded:
    model: str
    version: int
    mean: np.ndarray
    logvar: np.ndarray | None
    sample: np.ndarray | None


class EncoderLogic:
    def __init__(self, store: ModelStore, limits: Limits):
        self.store = store
        self.limits = limits

    def ready(self, model: str, version: int | None) -> bool:
        """True when encoding needs no disk access: the caller may then run it inline."""
        return self.store.peek(model, version) is not None

    def encode(self, model: str, version: int | None, images: np.ndarray,
               noise: np.random.Generator | None = None) -> Encoded:
        """`noise` given: also draw z = mean + exp(logvar / 2) * eps from it (the AE's sample is its mean)."""
        loaded = self.store.get(inputs.model_name(model), version)
        self.limits.check_batch(len(images), "images")
        mean, logvar = loaded.encode(inputs.images(images, loaded.image_shape))
        z = None if noise is None else sample(mean, logvar, noise)
        return Encoded(loaded.name, loaded.number, mean, logvar, z)

    def list_models(self) -> list[ModelSummary]:
        return self.store.summaries()

    def latent_stats(self, model: str, version: int | None) -> tuple[str, int, dict[str, Any]]:
        loaded = self.store.get(inputs.model_name(model), version)  # the statistics of a loadable version
        return loaded.name, loaded.number, loaded.latent_stats()
