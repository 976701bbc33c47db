"""The eager reference: one step against a closed form, the seed's ordering, flags restored, bad input."""

import numpy as np
import pytest
import torch
from energies import Quadratic

from ebmfast import CNNModel, langevin_reference


def one_step_closed_form(x0, z, mu, a, sigma, s, c, lo, hi):
    """The seed's step in float64 numpy: noise -> clamp -> gradient -> grad-clip -> step -> clamp."""
    x1 = np.clip(x0 + sigma * z, lo, hi)
    g = a * (x1 - mu)
    g = np.clip(g, -c, c)
    return np.clip(x1 - s * g, lo, hi)


@pytest.mark.parametrize("shape", [(1, 3), (5, 7), (3, 1, 4, 4)])
def test_one_step_matches_closed_form_and_ordering(shape):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(shape, generator=gen) * 2 - 1
    x0.view(-1)[0] = 0.999  # near the bound: the clamp after the noise matters
    z = torch.randn((1, *shape), generator=gen)
    z.view(-1)[0] = 1.0
    mu = torch.rand(shape[1:], generator=gen) * 2 - 1
    a, sigma, s, c = 3.0, 0.05, 10.0, 0.03  # |a (x - mu)| often > c: the clip matters
    model = Quadratic(mu, a)
    got = langevin_reference(model, x0, steps=1, step_size=s, noise_std=sigma, grad_clip=c, noise=z)
    want = one_step_closed_form(x0.double().numpy(), z[0].double().numpy(), mu.double().numpy(), a, sigma, s, c, -1, 1)
    np.testing.assert_allclose(got.double().numpy(), want, atol=2e-6, rtol=0)  # fp32 arithmetic, |x| <= 1

    # The ordering is observable: gradient before the noise, or no clip, or no clamp give different answers.
    x0n, zn, mun = x0.double().numpy(), z[0].double().numpy(), mu.double().numpy()
    grad_first = np.clip(np.clip(x0n - s * np.clip(a * (x0n - mun), -c, c), -1, 1) + sigma * zn, -1, 1)
    no_clip = np.clip(np.clip(x0n + sigma * zn, -1, 1) - s * a * (np.clip(x0n + sigma * zn, -1, 1) - mun), -1, 1)
    assert np.abs(got.double().numpy() - grad_first).max() > 1e-3
    assert np.abs(got.double().numpy() - no_clip).max() > 1e-3


def test_multi_step_trajectory_and_input_untouched():
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, 6, generator=gen) * 2 - 1
    mu = torch.zeros(6)
    z = torch.randn(3, 4, 6, generator=gen)
    model = Quadratic(mu, 2.0)
    before = x0.clone()
    out, traj = langevin_reference(model, x0, steps=3, noise=z, return_trajectory=True)
    assert torch.equal(x0, before)
    assert traj.shape == (3, 4, 6) and torch.equal(traj[-1], out)
    x = x0.double().numpy()
    for k in range(3):
        x = one_step_closed_form(x, z[k].double().numpy(), 0.0, 2.0, 0.005, 10.0, 0.03, -1, 1)
        np.testing.assert_allclose(traj[k].double().numpy(), x, atol=2e-6)
    assert not out.requires_grad and out.grad_fn is None


def test_flags_restored_and_grad_mode():
    model = CNNModel(hidden_features=8)
    model.train()
    model.cnn_layers[0].weight.requires_grad_(False)  # a frozen layer stays frozen (the seed would unfreeze it)
    x = torch.rand(2, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        langevin_reference(model, x, steps=2)
        assert not torch.is_grad_enabled()  # the caller's grad mode is left as it was
    assert model.training
    assert model.cnn_layers[0].weight.requires_grad is False
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "cnn_layers.0.weight")


def test_flags_restored_on_error():
    model = CNNModel(hidden_features=8).train()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        langevin_reference(model, torch.zeros(2, 1, 27, 28), steps=1)
    assert model.training and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=-3), "steps must be a positive integer"),
        (dict(step_size=0.0), "step_size must be > 0"),
        (dict(noise_std=-1.0), "noise_std must be >= 0"),
        (dict(grad_clip=float("nan")), "grad_clip must be finite"),
        (dict(clamp=(1.0, -1.0)), "low < high"),
        (dict(noise=torch.zeros(2, 3, 4)), r"noise must have shape"),
    ],
)
def test_bad_arguments(kwargs, match):
    model = Quadratic(torch.zeros(4), 1.0)
    with pytest.raises((ValueError, TypeError), match=match):
        langevin_reference(model, torch.zeros(3, 4), **kwargs)


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]), "non-finite"),
        (torch.zeros(3, 4, dtype=torch.int64), "floating-point"),
        (torch.zeros(4), "batch dimension"),
        (torch.zeros(0, 4), "empty batch"),
    ],
)
def test_bad_inputs(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        langevin_reference(Quadratic(torch.zeros(4), 1.0), x, steps=1)


class _ExpandedGradient(torch.nn.Module):
    """f(x) = w * sum(x): autograd's input gradient is an expanded (stride-0) tensor, read-only in place."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x.flatten(1).sum(1) * self.w


def test_reference_never_writes_into_autograds_gradient():
    """Issue 22: ``g.clamp_`` ran in place on autograd's gradient and crashed for expanded gradients."""
    x = torch.zeros(3, 1, 4, 4)
    z = torch.zeros(2, *x.shape)
    out = langevin_reference(_ExpandedGradient(), x, steps=2, step_size=1.0, grad_clip=0.03, noise=z)
    # g = -w everywhere, clipped to -0.03: each step moves every pixel by +0.03
    assert torch.allclose(out, torch.full_like(x, 0.06))
