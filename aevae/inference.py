"""A loaded model version: numpy in and out, in chunks, over a runtime. What the services, the batch jobs,
the report and the benchmarks call.

Keeping the one chunked encode/decode here means the in-process baseline of the benchmarks is exactly the
code the services run, so a throughput ratio compares transport, not two implementations. The runtime does
the arithmetic (`aevae.runtimes`): torch over the weights, or ONNX Runtime over the version's graphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from aevae import allocation
from aevae.finite import all_finite
from aevae.manifest import Manifest
from aevae.repository import Version

CHUNK = 4096  # rows per forward pass: bounds the hidden layers' memory whatever the batch
# Encoding reads 4 KiB of float32 pixels per row: 1,024 rows per pass bound its temporaries to a few MiB, and
# measured as fast here as 4,096 (a big Encode's peak memory is then mostly its own request bytes).
ENCODE_CHUNK = 1024
PAD = 2  # MNIST's 28 x 28 digits are zero-padded by 2 pixels per side to the models' 32 x 32, as in training


def accepted_image_shapes(image_shape: tuple[int, int]) -> tuple[tuple[int, int], ...]:
    """The model's own image shape, and the shape before padding (28 x 28 for 32 x 32)."""
    h, w = image_shape
    return ((h, w), (h - 2 * PAD, w - 2 * PAD)) if h > 2 * PAD and w > 2 * PAD else ((h, w),)


def to_model_input(images: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """uint8 0..255 or float32 in [0, 1], the model's shape or the shape before padding -> float32 in the
    model's shape. Called per chunk, so the float copy of a big uint8 batch never exists whole."""
    floats = images.astype(np.float32) / np.float32(255) if images.dtype == np.uint8 else \
        np.ascontiguousarray(images, dtype=np.float32)
    if floats.shape[1:] != tuple(image_shape):
        floats = np.pad(floats, ((0, 0), (PAD, PAD), (PAD, PAD)))
    return floats


class Runtime(Protocol):
    """The arithmetic of one model: float32 in, float32 out, whole batches."""

    name: str
    # Whether a row's image is the same whatever rows are decoded with it. The int8 decoder's is not: it
    # quantizes activations per batch (scales from the batch's own range), so callers must not share a pass.
    rows_alone: bool

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N x H x W float32 in [0, 1] -> (mean, log-variance or None for the AE), each N x latent_dim."""

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x latent_dim float32 -> N x H x W float32 in [0, 1]."""


class NonFiniteOutput(ArithmeticError):
    """The model produced NaN or infinity: never returned to a caller."""


@dataclass
class LoadedModel:
    """A model ready to run: its manifest, its runtime, and the version it was loaded from (None for a model
    still in memory, e.g. the trainer's before it is written)."""

    manifest: Manifest
    runtime: Runtime
    version: Version | None = None
    _stats: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    _content: int | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def number(self) -> int:
        return self.manifest.number

    @property
    def content(self) -> int:
        """What the version's files are (a hash of the checksums its manifest lists): two loads of one version
        number whose files were replaced in between differ here, not in their number."""
        if self._content is None:
            self._content = hash(tuple(sorted(self.manifest.files.items())))
        return self._content

    def latent_stats(self) -> dict[str, Any]:
        """The version's latent_stats.json, read once: a version never changes on disk (the store drops a
        loaded model whose files changed). ValueError when there is none or it is not JSON."""
        if self._stats is None:
            if self.version is None:
                raise ValueError("a model in memory has no latent statistics on disk")
            self._stats = self.version.latent_stats()
        return self._stats

    @property
    def latent_dim(self) -> int:
        return self.manifest.latent_dim

    @property
    def image_shape(self) -> tuple[int, int]:
        return self.manifest.image_shape

    @property
    def variational(self) -> bool:
        return self.manifest.kind == "vae"

    def encode(self, images: np.ndarray, chunk: int = ENCODE_CHUNK) -> tuple[np.ndarray, np.ndarray | None]:
        """N x H x W images (see `to_model_input`) -> (mean, log-variance or None), each N x latent_dim."""
        n = len(images)
        mean = np.empty((n, self.latent_dim), np.float32)
        logvar = np.empty((n, self.latent_dim), np.float32) if self.variational else None
        for start in range(0, n, chunk):
            mu, lv = self.runtime.encode(to_model_input(images[start:start + chunk], self.image_shape))
            mean[start:start + len(mu)] = mu
            if logvar is not None and lv is not None:
                logvar[start:start + len(lv)] = lv
        _check_finite(mean, "mean")
        if logvar is not None:
            _check_finite(logvar, "log-variance")
        return mean, logvar

    def decode(self, latents: np.ndarray, dtype: str = "float32", chunk: int = CHUNK,
               out: np.ndarray | None = None) -> np.ndarray:
        """N x latent_dim float32 -> N x H x W images, float32 in [0, 1] or uint8 0..255 (rounded), written
        into `out` when given."""
        n = len(latents)
        if out is None and n <= chunk and np.dtype(dtype) == np.float32:
            images = self.runtime.decode(np.ascontiguousarray(latents, dtype=np.float32))
            _check_finite(images, "images")
            return images  # one pass: the runtime's own output, not a copy of it
        if out is None:
            out = allocation.empty((n, *self.image_shape), dtype)
        for start in range(0, n, chunk):
            images = self.runtime.decode(np.ascontiguousarray(latents[start:start + chunk], dtype=np.float32))
            _check_finite(images, "images")
            if out.dtype == np.uint8:
                np.multiply(images, 255, out=images)
                np.add(images, 0.5, out=images)  # the cast below truncates, so +0.5 rounds
            out[start:start + len(images)] = images
        return out


def sample(mean: np.ndarray, logvar: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    """z = mean + sigma * eps with sigma = exp(logvar / 2) (the seed writes sigma squared: a slip); the AE's
    sample is its mean."""
    z = mean.copy()
    if logvar is not None:
        z += np.exp(0.5 * logvar) * rng.standard_normal(mean.shape, dtype=np.float32)
    return z


def _check_finite(array: np.ndarray, what: str) -> None:
    if not all_finite(array):
        raise NonFiniteOutput(f"the model produced non-finite {what}")


def load(version: Version, prefer: str = "auto", threads: int | None = None, precision: str = "fp32") -> LoadedModel:
    """Verifies every file the manifest lists against its SHA-256, then loads the version safely (weights
    only, never a pickle; from the bytes the runtime reads checked again, see Version.verified, so a file
    replaced after this check is refused, not loaded unchecked) on a runtime: "auto" takes ONNX Runtime when
    the version has graphs and onnxruntime is installed, torch otherwise; `precision` of decoding, fp32, bf16
    or int8 (see `aevae.runtimes.open_runtime`). ValueError with the reason when the version is unusable."""
    from aevae.runtimes import open_runtime

    version.check_files()
    return LoadedModel(manifest=version.manifest, runtime=open_runtime(version, prefer, threads, precision),
                       version=version)


def describe(model: LoadedModel) -> dict[str, Any]:
    """The one-line facts benchmarks and reports print about a model."""
    return {"model": f"{model.name}/{model.number}", "kind": model.manifest.kind, "latent_dim": model.latent_dim,
            "image_shape": list(model.image_shape), "runtime": model.runtime.name,
            "precision": getattr(model.runtime, "precision", "fp32")}
