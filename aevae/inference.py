"""A loaded model version with numpy in and out: what the services, the report and the benchmarks call.

Keeping the torch calls here means the in-process baseline of the benchmarks is exactly the code the
services run, so a throughput ratio compares transport, not two implementations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from aevae.models import Architecture, Autoencoder, build
from aevae.repository import WEIGHTS, Version, sha256_file

@dataclass
class LoadedModel:
    version: Version
    model: Autoencoder

    @classmethod
    def from_version(cls, version: Version) -> "LoadedModel":
        expected = version.manifest["files"].get(WEIGHTS)
        weights = version.path / WEIGHTS
        if expected and sha256_file(weights) != expected:
            raise ValueError(f"{weights} does not match the checksum in its manifest (truncated or altered)")
        # weights_only=True: a file carrying a pickle payload raises instead of running code.
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model = build(Architecture.from_json(version.manifest["architecture"]))
        model.load_state_dict(state)
        model.eval()
        return cls(version=version, model=model)

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def kind(self) -> str:
        return self.version.kind

    @property
    def latent_dim(self) -> int:
        return self.version.latent_dim

    @property
    def manifest(self) -> dict[str, Any]:
        return self.version.manifest

    def latent_stats(self) -> dict[str, Any]:
        return self.version.latent_stats()

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """N x 32 x 32 float32 in [0, 1] -> (mean, log-variance or None), each N x latent_dim float32."""
        mu, logvar = self.model.encode(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
        return mu.numpy(), None if logvar is None else logvar.numpy()

    @torch.inference_mode()
    def decode(self, latents: np.ndarray) -> np.ndarray:
        """N x latent_dim float32 -> N x 32 x 32 float32 in [0, 1]."""
        return self.model.decode(torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32))).numpy()

