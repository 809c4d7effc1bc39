"""Rate-distortion of a latent code: quantize each dimension uniformly, decode, measure the test BCE.

The quantizer is the plain mid-rise one: 2**bits equal bins over the training range [lo, hi] of a dimension,
each value replaced by the centre of its bin (values outside the range fall into the end bins). It needs no
side information beyond lo and hi, which the repository's latent statistics already hold, so `bits` per
dimension is the whole cost of a code.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from aevae.inference import LoadedModel
from aevae.runtimes import torch_module

BITS = tuple(range(1, 17))
TOLERANCE_NATS = 1.0


def quantize(latents: np.ndarray, lo: Sequence[float], hi: Sequence[float], bits: int) -> np.ndarray:
    """N x d latents -> the centres of their bins on a 2**bits-level grid over [lo, hi] per dimension."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    lo_ = np.asarray(lo, dtype=np.float64)
    hi_ = np.asarray(hi, dtype=np.float64)
    if np.any(hi_ <= lo_):
        raise ValueError(f"every range needs hi > lo, got lo={lo_.tolist()} hi={hi_.tolist()}")
    levels = 2 ** bits
    step = (hi_ - lo_) / levels
    index = np.clip(np.floor((np.asarray(latents, dtype=np.float64) - lo_) / step), 0, levels - 1)
    return (lo_ + (index + 0.5) * step).astype(np.float32)


def bce_per_image(model: LoadedModel, latents: np.ndarray, images: np.ndarray, batch: int = 2000) -> np.ndarray:
    """BCE in nats of each image against the decoder's output for its latent, computed from the logits
    (numerically stable, the same loss the trainer reports)."""
    import torch
    from torch.nn import functional as F

    # Coarsely quantized codes repeat a lot (1 bit x 4 dims has 16 values): decode each distinct code once.
    codes, inverse = np.unique(np.asarray(latents, dtype=np.float32), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if not len(codes):
        return np.zeros(0)
    out = []
    with torch.inference_mode():
        module = torch_module(model)
        logits = torch.cat([module.decode_logits(torch.from_numpy(codes[s:s + batch]))
                            for s in range(0, len(codes), batch)])
        for start in range(0, len(latents), batch):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch], dtype=np.float32))
            chosen = logits[torch.from_numpy(inverse[start:start + batch])]
            bce = F.binary_cross_entropy_with_logits(chosen, x, reduction="none")
            out.append(bce.reshape(len(x), -1).sum(dim=1).double().numpy())
    return np.concatenate(out)


@dataclass(frozen=True)
class RateDistortion:
    """Test BCE (nats per image) of one model at each bit depth, and with its float32 code."""

    model: str
    latent_dim: int
    bits: tuple[int, ...]
    bce: tuple[float, ...]
    float_bce: float

    @property
    def total_bits(self) -> tuple[int, ...]:
        return tuple(b * self.latent_dim for b in self.bits)

    def bits_within(self, tolerance: float = TOLERANCE_NATS) -> int | None:
        """The fewest bits per dimension whose BCE is within `tolerance` nats of the float result."""
        return next((b for b, v in zip(self.bits, self.bce) if v <= self.float_bce + tolerance), None)

    def bce_at_total_bits(self, total: int) -> float | None:
        return next((v for t, v in zip(self.total_bits, self.bce) if t == total), None)

    def to_json(self) -> dict:
        return {"model": self.model, "latent_dim": self.latent_dim, "bits_per_dim": list(self.bits),
                "total_bits": list(self.total_bits), "bce": [round(v, 4) for v in self.bce],
                "float_bce": round(self.float_bce, 4), "bits_within_1_nat": self.bits_within()}


def rate_distortion(model: LoadedModel, latents: np.ndarray, images: np.ndarray, lo: Sequence[float],
                    hi: Sequence[float], bits: Iterable[int] = BITS, float_bce: float | None = None) -> RateDistortion:
    """The BCE curve of `model` for its (deterministic) test latents quantized at each bit depth; pass
    `float_bce` when the unquantized result is already known."""
    bits = tuple(bits)
    curve = tuple(float(bce_per_image(model, quantize(latents, lo, hi, b), images).mean()) for b in bits)
    return RateDistortion(model=model.name, latent_dim=latents.shape[1], bits=bits, bce=curve,
                          float_bce=float_bce if float_bce is not None
                          else float(bce_per_image(model, latents, images).mean()))
