"""What the client returns: plain dataclasses, numpy arrays and dicts, never protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aevae.v1 import encoder_pb2, tensor_pb2
from aevae.client.errors import bad_answer
from aevae.v1.tensors import TensorError, from_tensor


@dataclass(frozen=True)
class EncodeResult:
    mean: np.ndarray  # N x d float32
    logvar: np.ndarray | None  # N x d float32; None for the AE
    sample: np.ndarray | None  # N x d float32; None unless asked for
    model: str
    version: int


@dataclass(frozen=True)
class DecodeResult:
    images: np.ndarray  # N x H x W, float32 in [0, 1] or uint8
    model: str
    version: int  # the version that decoded them: the one asked for, or the newest when none was


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: int  # the newest loadable (0 when none loads)
    versions: list[int]  # those not known to be broken
    kind: str  # "ae" or "vae"
    latent_dim: int
    image_shape: tuple[int, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    broken: dict[int, str] = field(default_factory=dict)  # version -> why it cannot be served: the newest 16
    runtime: str = ""  # "onnx" or "torch": what serves the newest
    broken_count: int = 0  # how many versions are broken, named in `broken` or not


def model_infos(response: tensor_pb2.ListModelsResponse) -> list[ModelInfo]:
    return [
        ModelInfo(
            name=m.name, version=int(m.version), versions=[int(v) for v in m.versions], kind=m.kind,
            latent_dim=int(m.latent_dim), image_shape=tuple(int(s) for s in m.image_shape), metrics=dict(m.metrics),
            broken={int(b.version): b.reason for b in m.broken}, runtime=m.runtime,
            broken_count=max(int(m.broken_count), len(m.broken)),  # a server before broken_count sends 0
        )
        for m in response.models
    ]


def latent_stats(message: encoder_pb2.LatentStats) -> dict[str, Any]:
    """The message as latent_stats.json's structure; a message whose PCA tensors cannot be read is the
    server's fault, AevaeError (INTERNAL) saying which."""
    try:
        return _latent_stats(message)
    except (TensorError, ValueError) as exc:
        raise bad_answer(f"the latent statistics: {exc}") from None


def _latent_stats(message: encoder_pb2.LatentStats) -> dict[str, Any]:
    """The structure of the repository's latent_stats.json, plus "model" and "version"."""
    pca = message.pca
    return {
        "count": int(message.count),
        "latent_dim": int(message.latent_dim),
        "source": message.source,
        "dims": [
            {
                "min": d.min, "max": d.max, "mean": d.mean, "std": d.std,
                "quantiles": dict(sorted(d.quantiles.items(), key=lambda kv: float(kv[0]))),
                "grid": list(d.grid), "density": list(d.density),
            }
            for d in message.dims
        ],
        "pca": {
            "mean": list(pca.mean),
            "components": from_tensor(pca.components, "pca.components").tolist(),
            "explained_variance_ratio": list(pca.explained_variance_ratio),
            "points": from_tensor(pca.points, "pca.points").tolist(),
            "labels": [int(x) for x in pca.labels],
            "latents": from_tensor(pca.latents, "pca.latents").tolist(),
        },
        "model": message.model,
        "version": int(message.version),
    }
