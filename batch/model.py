"""The model a batch job runs: resolved and checked once on the driver, loaded by number in every worker.

The only place the batch jobs touch the model store: `resolve` (driver) and `Loaded` (workers).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aevae.errors import UserError


@dataclass(frozen=True)
class ModelRef:
    """A pinned model version: every shard of a job, and every rerun, uses exactly this one."""

    name: str
    number: int
    kind: str
    latent_dim: int
    image_shape: tuple[int, int]
    models_dir: str = ""  # empty when the model is served by a fleet, not loaded from a repository
    precision: str = "fp32"  # of decoding (aevae.runtimes.PRECISIONS); a fleet's is what its services run

    def describe(self) -> dict:
        """What identifies the model of a job (its record, its outputs' metadata). The precision is named only
        when reduced, so that a job written before it was recorded is still the same job."""
        described = {"name": self.name, "version": self.number, "kind": self.kind, "latent_dim": self.latent_dim,
                     "image_shape": list(self.image_shape)}
        if self.precision != "fp32":
            described["precision"] = self.precision
        return described


def _get(models_dir: str, name: str, number: int | None, threads: int | None = None, precision: str = "fp32"):
    """The loaded model (the newest loadable one for None), its runtime on `threads` threads (default: the
    runtime's), decoding in `precision`. LookupError/ValueError-like errors propagate."""
    from aevae.store import ModelStore

    return ModelStore(models_dir, threads=threads, precision=precision).get(name, number)


def resolve(models_dir: str | None, name: str, number: int | None, precision: str = "fp32") -> ModelRef:
    """Loads the version once (checksums, weights, the runtime of `precision`) so that a missing or broken
    model, or one that cannot decode in that precision, stops the job here."""
    from aevae.repository import models_dir as default_models_dir

    root = default_models_dir(models_dir).resolve()
    named = f"model {name!r}{f' version {number}' if number else ''} in {root}"
    try:
        model = _get(str(root), name, number or None, precision=precision)
    except Exception as exc:  # noqa: BLE001 - unknown, broken or unreadable: the job cannot start
        raise UserError(f"{named}: {exc}") from None
    # The store decodes a version without an int8 graph in fp32 (serving goes on); a job would then label
    # fp32 images int8, so it stops instead.
    runs = getattr(model.runtime, "precision", "fp32")
    if runs != precision:
        raise UserError(f"{named}: version {model.number} cannot decode in {precision} (it has no "
                        f"decoder.int8.onnx; `aevae export-onnx` adds it), so it would run {runs}; pass "
                        f"--precision {runs} or add the graph")
    manifest = model.manifest
    return ModelRef(name=name, number=model.number, kind=manifest.kind, latent_dim=manifest.latent_dim,
                    image_shape=tuple(manifest.image_shape), models_dir=str(root), precision=precision)


class Loaded:
    """What a worker runs: uint8 images from latents, (mean, log-variance) from images, chunked."""

    def __init__(self, ref: ModelRef, threads: int | None = None):
        """`threads`: the runtime's threads (ONNX Runtime's intra-op pool, or torch's), one worker's CPUs, so
        that the workers of a machine do not oversubscribe its cores."""
        self.ref = ref
        self.model = _get(ref.models_dir, ref.name, ref.number, threads, ref.precision)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x latent_dim float32 -> N x H x W uint8, rounded as the decoder service rounds."""
        return self.model.decode(latents, dtype="uint8")

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N x H x W (uint8 or float32 in [0, 1], or the shape before padding) -> (mean, log-variance)."""
        return self.model.encode(images)
