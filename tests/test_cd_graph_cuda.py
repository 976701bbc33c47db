"""CDGraph on CUDA: one replay is one training iteration, equal to the uncaptured CDStep.

Tolerance: with ``torch.backends.cudnn.deterministic = True`` both runs launch the same kernels on the same data, so
they are compared bitwise; the lr-schedule and re-capture checks use the same setting."""

import pytest
import torch

from ebmfast import CNNModel, LangevinSampler, ReplayBuffer
from ebmfast.cd import CD_METRICS, CDStep
from ebmfast.cd_graph import CDGraph

pytestmark = pytest.mark.cuda


def _run(seed=0, batch=16, steps=6):
    dev = torch.device("cuda")
    torch.manual_seed(seed)
    model = CNNModel(hidden_features=16).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=torch.tensor(1e-3, device=dev), betas=(0.0, 0.999), capturable=True)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    buffer = ReplayBuffer((1, 28, 28), capacity=64, device=dev, generator=gen)
    sampler = LangevinSampler(model, steps=steps, backend="fused", seed=seed + 2, check_finite=False)
    step = CDStep(model, opt, sampler, buffer, generator=gen)
    real = torch.rand(batch, 1, 28, 28, device=dev, generator=torch.Generator(device=dev).manual_seed(9)) * 2 - 1
    return model, opt, buffer, step, real


@pytest.fixture
def deterministic():
    saved = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = saved


def test_replayed_iterations_equal_the_uncaptured_step(deterministic):
    eager = _run()
    graphed = _run()
    g = CDGraph(graphed[3])
    for i in range(4):
        want = eager[3](eager[4])
        got = g(graphed[4]).clone()
        assert torch.equal(got, want), (i, got, want)
        if i == 1:  # the schedule writes the lr tensor in place: the graph sees it
            for o in (eager[1], graphed[1]):
                o.param_groups[0]["lr"].fill_(5e-4)
    for a, b in zip(eager[0].parameters(), graphed[0].parameters()):
        assert torch.equal(a, b)
    assert torch.equal(eager[2].storage, graphed[2].storage) and int(eager[2].ptr) == int(graphed[2].ptr)
    assert g.captures == 1


def test_optimizer_state_replaced_means_a_new_capture(deterministic):
    model, opt, buffer, step, real = _run()
    g = CDGraph(step)
    g(real)
    opt.load_state_dict(opt.state_dict())  # what resume and divergence roll-back do: new state tensors
    g(real)
    assert g.captures == 2
    metrics = g(real)
    assert torch.isfinite(metrics[: CD_METRICS.index("grad_norm") + 1]).all()


def test_a_non_finite_iteration_is_skipped_inside_the_graph(deterministic):
    model, opt, buffer, step, real = _run()
    g = CDGraph(step)
    g(real)
    before = [p.clone() for p in model.parameters()], buffer.storage.clone(), int(buffer.ptr)
    bad = real.clone()
    bad[0, 0, 0, 0] = float("nan")
    metrics = g(bad)
    assert metrics[CD_METRICS.index("update_skipped")] == 1
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert torch.equal(before[1], buffer.storage) and before[2] == int(buffer.ptr)
