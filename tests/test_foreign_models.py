"""Energy models written the common way, with an ``nn.Linear(k, 1)`` head (scores of shape (N, 1)), work through
the outer layers as they do through the sampler: the training step, OOD scores, generation, the FLOP count and the
benchmark's CD iteration. Other output shapes are refused with the sampler's message."""

import pytest
import torch
from torch import nn

from ebmfast import LangevinSampler, ReplayBuffer
from ebmfast.benchmark.flops import count_step_flops, flops_per_sample_step
from ebmfast.benchmark.training import CDIteration
from ebmfast.cd import CD_METRICS, CDStep
from ebmfast.evaluation.generate import generate
from ebmfast.evaluation.ood import batch_scores

SHAPE = (1, 28, 28)


def mlp(out: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.SiLU(), nn.Linear(16, out))
    model.input_shape = SHAPE  # what generate() and the benchmarks read when no sample shape is given
    return model


@pytest.mark.slow
def test_train_step_with_an_n_by_1_model():
    model = mlp()
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    buffer = ReplayBuffer(SHAPE, capacity=16, generator=gen)
    sampler = LangevinSampler(model, steps=2, backend="eager", seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    real = torch.rand(4, *SHAPE) * 2 - 1
    step = CDStep(model, optimizer, sampler, buffer, generator=gen, alpha=0.1, real_noise_std=0.005, grad_norm_clip=0.1)
    metrics = dict(zip(CD_METRICS, step(real).tolist()))
    assert metrics["update_skipped"] == 0
    assert metrics["loss"] == pytest.approx(metrics["loss_regularization"] + metrics["loss_contrastive_divergence"])
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_scores_generation_flops_and_benchmark_with_an_n_by_1_model():
    model = mlp()
    x = torch.rand(5, *SHAPE) * 2 - 1
    scores = batch_scores(model, x, batch_size=2)
    assert scores.shape == (5,)
    # batches of 2 and of 5 take different GEMM kernels, whose 784-term float32 sums round differently (CI saw 5e-8)
    assert torch.allclose(scores, model(x).reshape(5), rtol=1e-5, atol=1e-6)
    samples = generate(model, n=3, steps=2, backend="eager", device="cpu")
    assert samples.shape == (3, *SHAPE) and bool(((samples >= -1) & (samples <= 1)).all())
    assert flops_per_sample_step(model, SHAPE) == 2 * (2 * 784 * 16 + 2 * 16 * 1)
    metrics = CDIteration(model, "eager", batch=4, steps=2, device="cpu")(torch.rand(4, *SHAPE) * 2 - 1)
    assert metrics.shape == (len(CD_METRICS),) and torch.isfinite(metrics).all()


def test_other_output_shapes_are_refused():
    model = mlp(out=2)
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, 1\)"):
        batch_scores(model, torch.rand(3, *SHAPE))
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, 1\)"):
        count_step_flops(model, (2, *SHAPE))
