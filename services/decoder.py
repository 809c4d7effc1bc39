"""The decoder's logic, transport-independent: numpy latents in, numpy images out, typed errors.

Two steps, so that concurrent requests can share a forward pass: `prepare` validates one request against
its model (a bad request fails alone, before it meets others), `run` decodes a list of prepared requests of
one model and dtype in one chunked pass (LoadedModel.decode, which bounds the hidden layers' memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import numpy as np

from aevae.errors import InvalidArgument, shorten
from aevae.inference import LoadedModel
from aevae.services import inputs
from aevae.services.settings import Limits
from aevae.store import ModelStore, ModelSummary

OUTPUT_DTYPES = ("float32", "uint8")


@dataclass(frozen=True)
class Decoded:
    model: str
    version: int
    images: np.ndarray
    content: int = 0  # LoadedModel.content of what decoded them


@dataclass(frozen=True)
class DecodeJob:
    model: LoadedModel
    latents: np.ndarray
    dtype: str

    @property
    def key(self) -> Hashable:
        """Jobs with equal keys can share a forward pass."""
        return id(self.model), self.dtype

    @property
    def rows(self) -> int:
        return len(self.latents)

    @property
    def output_bytes(self) -> int:
        return self.rows * self.model.manifest.pixels * np.dtype(self.dtype).itemsize


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
        """True when preparing needs no disk access: the caller may then run it inline."""
        return self.store.peek(model, version) is not None

    def prepare(self, model: str, version: int | None, latents: np.ndarray, dtype: str = "float32") -> DecodeJob:
        dtype = output_dtype(dtype)
        loaded = self.store.peek(model, version) or self.store.get(inputs.model_name(model), version)
        z = inputs.latents(latents, loaded.latent_dim, loaded.name)
        self.limits.check_batch(len(z), "latents")
        self.limits.check_response(len(z), loaded.manifest.pixels * np.dtype(dtype).itemsize, "latents")
        return DecodeJob(loaded, z, dtype)

    @staticmethod
    def run(jobs: Sequence[DecodeJob]) -> list[Decoded]:
        """Decodes jobs of one key in one pass; each gets its own rows (views on one output array). A runtime
        whose rows depend on the batch beside them (the int8 decoder's) runs each job alone, still in the one
        task the batch took: a caller's 4 latents shared a pass with another's 32 large ones, and their images
        moved by up to 208 of 255 levels."""
        model, dtype = jobs[0].model, jobs[0].dtype
        if len(jobs) > 1 and not model.runtime.rows_alone:
            return [decoded for job in jobs for decoded in DecoderLogic.run([job])]
        z = jobs[0].latents if len(jobs) == 1 else np.concatenate([j.latents for j in jobs])
        images = model.decode(z, dtype)
        out, start = [], 0
        for job in jobs:
            out.append(Decoded(model.name, model.number, images[start:start + job.rows], model.content))
            start += job.rows
        return out

    def decode(self, model: str, version: int | None, latents: np.ndarray, dtype: str = "float32") -> Decoded:
        return self.run([self.prepare(model, version, latents, dtype)])[0]

    def list_models(self) -> list[ModelSummary]:
        return self.store.summaries()
