"""The decoder's logic, transport-independent: numpy latents in, numpy images out, typed errors.

Big batches are decoded in chunks into one preallocated output (LoadedModel.decode), which bounds the memory
the model's hidden layers take whatever the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aevae.errors import InvalidArgument, shorten
from aevae.services import inputs
from aevae.services.settings import Limits
from aevae.store import ModelStore, ModelSummary

OUTPUT_DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class Decoded:
    model: str
    version: int
    images: np.ndarray


def output_dtype(dtype: str) -> str:
    """"" means float32."""
    dtype = dtype or "float32"
    if dtype not in OUTPUT_DTYPES:
        raise InvalidArgument(f"dtype: expected float32 or uint8 (or empty for float32), got {shorten(dtype)}")
    return dtype


class DecoderLogic:
    def __init__(self, store: ModelStore, limits: Limits):
        self.store = store
        self.limits = limits

    def ready(self, model: str, version: int | None) -> bool:
        """True when decoding needs no disk access: the caller may then run it inline."""
        return self.store.peek(model, version) is not None

    def decode(self, model: str, version: int | None, latents: np.ndarray, dtype: str = "float32") -> Decoded:
        dtype = output_dtype(dtype)
        loaded = self.store.get(inputs.model_name(model), version)
        z = inputs.latents(latents, loaded.latent_dim, loaded.name)
        self.limits.check_batch(len(z), "latents")
        self.limits.check_response(len(z), loaded.manifest.pixels * np.dtype(dtype).itemsize, "latents")
        return Decoded(loaded.name, loaded.number, loaded.decode(z, dtype))

    def list_models(self) -> list[ModelSummary]:
        return self.store.summaries()
