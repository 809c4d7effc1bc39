"""The model runtimes: torch over the version's weights (`weights.pt`, loaded with weights_only=True).

A runtime is chosen per version by `open_runtime`; each imports its framework only when it is opened, so a
serving process that never opens the torch runtime never loads torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from aevae.repository import WEIGHTS, Version

RUNTIMES = ("auto", "torch")


class TorchRuntime:
    name = "torch"

    def __init__(self, model: Any):
        """`model`: an aevae.models.Autoencoder in eval mode."""
        import torch

        self._torch = torch
        self.model = model

    @classmethod
    def open(cls, version: Version) -> "TorchRuntime":
        import torch

        from aevae.models import Architecture, build

        # weights_only=True: a file carrying a pickle payload raises instead of running code.
        state = torch.load(version.file(WEIGHTS), map_location="cpu", weights_only=True)
        model = build(Architecture.from_json(version.manifest.architecture))
        model.load_state_dict(state)
        return cls(model.eval())

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        with self._torch.inference_mode():
            mu, logvar = self.model.encode(self._torch.from_numpy(images))
        return mu.numpy(), None if logvar is None else logvar.numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            return self.model.decode(self._torch.from_numpy(latents)).numpy()


def open_runtime(version: Version, prefer: str = "auto") -> TorchRuntime:
    if prefer not in RUNTIMES:
        raise ValueError(f"runtime must be one of {list(RUNTIMES)}, got {prefer!r}")
    return TorchRuntime.open(version)


def torch_module(model: Any) -> Any:
    """The torch Autoencoder behind a LoadedModel on the torch runtime (for code that needs logits)."""
    runtime = model.runtime
    if not isinstance(runtime, TorchRuntime):
        raise TypeError(f"{model.name}/{model.number} runs on {runtime.name}; open its store with runtime='torch'")
    return runtime.model
