"""The model code itself: shapes, the reparameterization, the loss and the repository's atomic writes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from aevae.models import Architecture, BceWithLogitsSum, build, loss_terms, reparameterize


@pytest.mark.parametrize("kind", ["ae", "vae"])
def test_shapes(kind: str) -> None:
    model = build(Architecture(kind=kind, latent_dim=3, hidden=(64, 32)))
    x = torch.rand(5, 32, 32)
    logits, mu, logvar = model(x)
    assert logits.shape == (5, 32, 32) and mu.shape == (5, 3)
    assert (logvar is None) == (kind == "ae")
    assert model.decode(mu).min() >= 0 and model.decode(mu).max() <= 1


def test_reparameterization_uses_sigma_not_sigma_squared() -> None:
    mu = torch.full((200_000, 1), 3.0)
    logvar = torch.full((200_000, 1), math.log(4.0))  # sigma = 2, sigma squared = 4
    z = reparameterize(mu, logvar, generator=torch.Generator().manual_seed(0))
    assert z.mean().item() == pytest.approx(3.0, abs=0.02)
    assert z.std().item() == pytest.approx(2.0, abs=0.02)


def test_kl_is_zero_at_the_prior_and_positive_elsewhere() -> None:
    x = torch.rand(4, 32, 32)
    logits = torch.zeros(4, 32, 32)
    _, kl0 = loss_terms(logits, x, torch.zeros(4, 2), torch.zeros(4, 2))
    _, kl1 = loss_terms(logits, x, torch.ones(4, 2), torch.zeros(4, 2))
    assert kl0.item() == pytest.approx(0.0) and kl1.item() == pytest.approx(4 * 2 * 0.5)
    bce, _ = loss_terms(logits, x, torch.zeros(4, 2), None)
    assert bce.item() == pytest.approx(4 * 1024 * math.log(2), rel=1e-5)  # logit 0 = p 0.5 on every pixel


def test_bce_matches_torchs_in_value_and_gradient() -> None:
    """The hand-written BCE (vectorized exp and log instead of log1p) against torch's own, over logits from
    -40 to 40 (where exp(-|l|) underflows 1 + exp(-|l|)) and targets in [0, 1] and exactly 0 or 1."""
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(64, 1024, generator=generator) * 10).clamp(-40, 40)
    logits[0, :81] = torch.linspace(-40, 40, 81)
    x = torch.rand(64, 1024, generator=generator)
    x[1] = (x[1] > 0.5).float()
    ours_in, torch_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = BceWithLogitsSum.apply(ours_in, x)
    reference = F.binary_cross_entropy_with_logits(torch_in, x, reduction="sum")
    assert ours.item() == pytest.approx(reference.item(), rel=1e-6)
    ours.backward()
    reference.backward()
    assert torch.allclose(ours_in.grad, torch_in.grad, atol=1e-6)
    double = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(BceWithLogitsSum.apply, (double, torch.rand(3, 5, dtype=torch.float64)))


def test_architecture_round_trips_through_json() -> None:
    arch = Architecture(kind="ae", latent_dim=2, hidden=(8, 4))
    assert Architecture.from_json(arch.to_json()) == arch


def test_a_model_of_another_image_shape_decodes_to_that_shape() -> None:
    model = build(Architecture(kind="vae", latent_dim=8, hidden=(8,), image_shape=(24, 20)))
    assert model.decode(torch.zeros(3, 8)).shape == (3, 24, 20)
    mu, logvar = model.encode(torch.zeros(3, 24, 20))
    assert mu.shape == logvar.shape == (3, 8)


@pytest.mark.parametrize("arch", [Architecture(kind="vae"), Architecture(kind="ae", latent_dim=8, hidden=(64, 32)),
                                  Architecture(kind="vae", hidden=(16,), norm=False, image_shape=(8, 8))])
def test_counted_parameters_are_the_built_models(arch: Architecture) -> None:
    """What a version's size is estimated from before training (trainer.job.version_bytes), without building."""
    model = build(arch)
    assert arch.parameters() == (sum(p.numel() for p in model.encoder.parameters()),
                                 sum(p.numel() for p in model.decoder.parameters()))
