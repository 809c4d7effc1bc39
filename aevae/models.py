"""The AE and the VAE: one architecture, the VAE's encoder ending in a mean and a log-variance head.

Read it like pytorch/examples' vae/main.py: model, loss, nothing else. Images are N x 32 x 32 floats in [0, 1];
the decoder returns logits so that the loss can use the numerically stable BCE-with-logits.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from aevae.manifest import KINDS  # the model kinds have one owner, the manifest


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a model from its manifest."""

    kind: str = "vae"
    latent_dim: int = 4
    hidden: tuple[int, ...] = (1024, 512, 256)
    activation: str = "silu"
    norm: bool = True
    image_shape: tuple[int, int] = (32, 32)
    name: str = field(default="mlp", compare=False)

    def widths(self) -> tuple[list[int], list[int]]:
        """The layer widths through the encoder and through the decoder, input first: what the model is built
        from, and what a version's size is counted from without building it. The VAE's encoder ends twice as
        wide, for the mean and the log-variance."""
        pixels = self.image_shape[0] * self.image_shape[1]
        heads = 2 if self.kind == "vae" else 1
        return [pixels, *self.hidden, heads * self.latent_dim], [self.latent_dim, *reversed(self.hidden), pixels]

    def parameters(self) -> tuple[int, int]:
        """The encoder's and the decoder's parameter counts, as `_mlp` builds them (a Linear per pair of widths,
        a LayerNorm after each but the last when `norm`), counted without building the model."""
        def count(sizes: list[int]) -> int:
            return sum(n_in * n_out + n_out + (2 * n_out if i < len(sizes) - 2 and self.norm else 0)
                       for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])))

        encoder, decoder = self.widths()
        return count(encoder), count(decoder)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Architecture":
        data = dict(data)
        data["hidden"] = tuple(data["hidden"])
        data["image_shape"] = tuple(data["image_shape"])
        return cls(**data)


_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "elu": nn.ELU, "gelu": nn.GELU}


def _mlp(sizes: list[int], arch: Architecture) -> nn.Sequential:
    """Linear layers with normalization and activation between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            if arch.norm:
                layers.append(nn.LayerNorm(n_out))
            layers.append(_ACTIVATIONS[arch.activation]())
    return nn.Sequential(*layers)


class Autoencoder(nn.Module):
    """AE when `arch.kind == "ae"`, VAE when "vae": the encoder's last layer is twice as wide for the VAE."""

    def __init__(self, arch: Architecture):
        super().__init__()
        if arch.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {arch.kind!r}")
        self.arch = arch
        self.pixels = arch.image_shape[0] * arch.image_shape[1]
        encoder, decoder = arch.widths()
        self.encoder = _mlp(encoder, arch)
        self.decoder = _mlp(decoder, arch)

    @property
    def variational(self) -> bool:
        return self.arch.kind == "vae"

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Images -> (mean, log-variance); the AE's code is its mean and has no log-variance."""
        h = self.encoder(x.reshape(x.shape[0], self.pixels))
        if not self.variational:
            return h, None
        mu, logvar = h.chunk(2, dim=1)
        return mu, logvar

    def decode_logits(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).reshape(z.shape[0], *self.arch.image_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1]."""
        return torch.sigmoid(self.decode_logits(z))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns (reconstruction logits, mean, log-variance)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if logvar is not None else mu
        return self.decode_logits(z), mu, logvar


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """z = mu + sigma * eps (the seed writes sigma squared; that is a slip: sigma = exp(logvar / 2))."""
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + torch.exp(0.5 * logvar) * eps


class BceWithLogitsSum(torch.autograd.Function):
    """sum(softplus(l) - l * x), the BCE of sigmoid(l) against x, summed: what
    F.binary_cross_entropy_with_logits(reduction="sum") returns, at half its cost on CPU.

    torch computes softplus through log1p, which runs element by element here (1.2 ms for one batch of 256
    images, against 0.15 ms for exp or log: they are vectorized); that was a tenth of a bf16 training step's
    time outside the matrix products. softplus(l) = max(l, 0) + log(1 + exp(-|l|)) uses only vectorized
    operations; where exp(-|l|) < 6e-8, 1 + exp(-|l|) rounds to 1 and a pixel's term is short by at most
    6e-8 nats (1e-4 per image at worst). The gradient is exact: sigmoid(l) - x, computed in backward.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        terms = torch.exp(-logits.abs()).add_(1).log_()
        return terms.add_(logits.clamp_min(0)).sub_(logits * x).sum()

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, x = ctx.saved_tensors  # type: ignore[attr-defined]
        return torch.sigmoid(logits).sub_(x).mul_(grad), None


def loss_terms(
    logits: torch.Tensor, x: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-batch sums, in nats: BCE over the pixels, and the KL to N(0, I) (zero for the AE)."""
    bce = BceWithLogitsSum.apply(logits, x.reshape(logits.shape))
    if logvar is None:
        return bce, torch.zeros((), dtype=bce.dtype)
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce, kl


def build(arch: Architecture) -> Autoencoder:
    return Autoencoder(arch)
