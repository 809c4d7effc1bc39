"""The encoder's logic, transport-independent: numpy images in, numpy latents out, typed errors.

Like the decoder's: `prepare` validates one request against its model, `run` encodes prepared requests of
one model and image layout in one chunked pass. The gRPC servicer (grpc_encoder.py) is one front end; the
Ray Serve deployment wraps the same classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from aevae.errors import FailedPrecondition
from aevae.inference import LoadedModel, sample
from aevae.services import inputs
from aevae.services.settings import Limits
from aevae.store import ModelStore, ModelSummary, broken_reason


@dataclass(frozen=True)
class Encoded:
    model: str
    version: int
    mean: np.ndarray
    logvar: np.ndarray | None
    sample: np.ndarray | None
    content: int = 0  # LoadedModel.content of what encoded them


@dataclass(frozen=True)
class EncodeJob:
    model: LoadedModel
    images: np.ndarray
    noise: np.random.Generator | None  # given: also draw a sample from it

    @property
    def key(self) -> Hashable:
        return id(self.model), self.images.shape[1:], self.images.dtype.str

    @property
    def rows(self) -> int:
        return len(self.images)

    @property
    def output_bytes(self) -> int:
        """The mean, and the log-variance and the sample when there are any: float32, latent_dim each."""
        outputs = 1 + int(self.model.variational) + int(self.noise is not None)
        return self.rows * self.model.latent_dim * 4 * outputs


class EncoderLogic:
    def __init__(self, store: ModelStore, limits: Limits):
        self.store = store
        self.limits = limits

    def ready(self, model: str, version: int | None) -> bool:
        """True when preparing needs no disk access: the caller may then run it inline."""
        return self.store.peek(model, version) is not None

    def prepare(self, model: str, version: int | None, images: np.ndarray,
                noise: np.random.Generator | None = None) -> EncodeJob:
        loaded = self.store.peek(model, version) or self.store.get(inputs.model_name(model), version)
        checked = inputs.images(images, loaded.image_shape)
        self.limits.check_batch(len(checked), "images")
        return EncodeJob(loaded, checked, noise)

    @staticmethod
    def run(jobs: Sequence[EncodeJob]) -> list[Encoded]:
        """Encodes jobs of one key in one pass; a job with noise also gets z = mean + exp(logvar / 2) * eps
        drawn from it (the AE's sample is its mean), in job order."""
        model = jobs[0].model
        x = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
        mean, logvar = model.encode(x)
        out, start = [], 0
        for job in jobs:
            rows = slice(start, start + job.rows)
            lv = None if logvar is None else logvar[rows]
            z = None if job.noise is None else sample(mean[rows], lv, job.noise)
            out.append(Encoded(model.name, model.number, mean[rows], lv, z, model.content))
            start += job.rows
        return out

    def encode(self, model: str, version: int | None, images: np.ndarray,
               noise: np.random.Generator | None = None) -> Encoded:
        return self.run([self.prepare(model, version, images, noise)])[0]

    def list_models(self) -> list[ModelSummary]:
        return self.store.summaries()

    def latent_stats(self, model: str, version: int | None) -> tuple[str, int, dict[str, Any]]:
        loaded = self.store.get(inputs.model_name(model), version)  # the statistics of a loadable version
        try:
            return loaded.name, loaded.number, loaded.latent_stats()
        except (OSError, ValueError) as exc:  # replaced on disk since it was loaded and checked
            raise FailedPrecondition(f"the latent statistics of {loaded.name}/{loaded.number} cannot be read: "
                                     f"{broken_reason(exc)}") from None
