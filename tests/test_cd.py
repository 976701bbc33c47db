"""CDStep: the seed's CD iteration, once. On CPU it reproduces, bit for bit, the iteration the trainer ran before it
existed (written out below as the oracle); a non-finite iteration is skipped on the device, leaving parameters,
optimizer state and replay buffer exactly as they were."""

import copy
import math

import pytest
import torch

from ebmfast import CNNModel, LangevinSampler, ReplayBuffer
from ebmfast.cd import CD_METRICS, CDStep


def _setup(seed=0, hidden=8, batch=8, steps=4):
    torch.manual_seed(seed)
    model = CNNModel(hidden_features=hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    gen = torch.Generator().manual_seed(seed + 1)
    buffer = ReplayBuffer((1, 28, 28), capacity=32, generator=gen)
    sampler = LangevinSampler(model, steps=steps, backend="eager", seed=seed + 2)
    real = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(seed + 3)) * 2 - 1
    return model, opt, gen, buffer, sampler, real


def _old_train_step(model, opt, gen, buffer, sampler, real, alpha=0.1, noise_std=0.005, clip=0.1):
    """The trainer's iteration as it was written before CDStep (the oracle)."""
    noise = torch.randn(real.shape, generator=gen)
    real = (real + noise_std * noise).clamp_(-1.0, 1.0)
    fake = sampler.sample(buffer.draw(real.shape[0]))
    model.train()
    real_out, fake_out = model(torch.cat([real, fake], dim=0)).chunk(2, dim=0)
    reg = alpha * (real_out**2 + fake_out**2).mean()
    cdiv = fake_out.mean() - real_out.mean()
    loss = reg + cdiv
    values = torch.stack([loss, reg, cdiv, real_out.mean(), fake_out.mean()]).tolist()
    if not math.isfinite(values[0]):
        return values
    opt.zero_grad(set_to_none=True)
    loss.backward()
    values.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)))
    opt.step()
    buffer.push(fake)
    return values


def _state(model, opt, buffer):
    return (
        copy.deepcopy(model.state_dict()),
        copy.deepcopy(opt.state_dict()["state"]),
        buffer.storage.clone(),
        int(buffer.ptr),
    )


def _assert_same_state(a, b):
    (ma, oa, sa, pa), (mb, ob, sb, pb) = a, b
    for k in ma:
        assert torch.equal(ma[k], mb[k]), k
    assert oa.keys() == ob.keys()
    for i in oa:
        for k in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][k]), torch.as_tensor(ob[i][k])), (i, k)
    assert torch.equal(sa, sb) and pa == pb


def test_cd_step_reproduces_the_old_trainer_iteration_bit_for_bit():
    old = _setup()
    new = _setup()
    step = CDStep(new[0], new[1], new[4], new[3], generator=new[2])
    for _ in range(3):
        want = _old_train_step(*old)
        got = step(new[5])
        assert got.shape == (len(CD_METRICS),) and got.dtype == torch.float32
        assert got[: len(want)].tolist() == want  # the same float32 values
        assert got[CD_METRICS.index("update_skipped")] == 0
        _assert_same_state(_state(old[0], old[1], old[3]), _state(new[0], new[1], new[3]))


@pytest.mark.parametrize("first", [True, False], ids=["first-step", "later-step"])
def test_non_finite_iteration_is_skipped_on_the_device(first):
    model, opt, gen, buffer, sampler, real = _setup()
    step = CDStep(model, opt, sampler, buffer, generator=gen)
    if not first:
        step(real)
    before = _state(model, opt, buffer)
    bad = real.clone()
    bad[0, 0, 0, 0] = float("nan")  # NaN survives the clamp: the loss is NaN
    metrics = step(bad)
    assert not math.isfinite(float(metrics[0]))
    assert metrics[CD_METRICS.index("update_skipped")] == 1
    after = _state(model, opt, buffer)
    if first:  # the optimizer state the skipped step created is back at its initial value (zeros, step 0)
        assert all(torch.count_nonzero(torch.as_tensor(v)) == 0 for s in after[1].values() for v in s.values())
        _assert_same_state(before[:1] + (after[1],) + before[2:], after)
    else:
        _assert_same_state(before, after)
    # and training goes on normally afterwards
    metrics = step(real)
    assert metrics[CD_METRICS.index("update_skipped")] == 0 and math.isfinite(float(metrics[0]))


def test_cd_step_accepts_models_returning_n_by_1():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 196, 1)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = LangevinSampler(model, steps=2, backend="eager", seed=0)
    step = CDStep(model, opt, sampler, ReplayBuffer((1, 28, 28), capacity=16))
    metrics = step(torch.rand(4, 1, 28, 28) * 2 - 1)
    assert torch.isfinite(metrics).all()


def test_cd_step_refuses_a_sampler_on_another_model():
    a, b = CNNModel(hidden_features=4), CNNModel(hidden_features=4)
    opt = torch.optim.Adam(a.parameters())
    with pytest.raises(ValueError, match="sampler.model is not model"):
        CDStep(a, opt, LangevinSampler(b, backend="eager"), ReplayBuffer((1, 28, 28), capacity=4))


# ---------------------------------------------------------------------------------- whole-iteration CUDA graph
def test_training_state_puts_everything_back_in_place():
    """What CDGraph relies on to hide its warm-up iterations: save, run iterations, restore -> the next iteration is
    bit-identical to the one an untouched run would do, and no tensor was replaced (a graph would see stale ones)."""
    from ebmfast.cd_graph import TrainingState

    a = _setup()
    b = _setup()
    step_a = CDStep(a[0], a[1], a[4], a[3], generator=a[2])
    step_b = CDStep(b[0], b[1], b[4], b[3], generator=b[2])
    for _ in range(2):  # both runs have optimizer state by now
        step_a(a[5])
        step_b(b[5])
    state = TrainingState(step_b)
    identities = [id(t) for t in list(b[0].parameters())] + [id(b[3].storage), id(b[3].ptr)]
    state.save()
    for _ in range(2):
        step_b(b[5])  # "warm-up" iterations that must not count
    state.restore()
    assert identities == [id(t) for t in list(b[0].parameters())] + [id(b[3].storage), id(b[3].ptr)]
    got, want = step_b(b[5]), step_a(a[5])
    assert torch.equal(got, want)
    _assert_same_state(_state(a[0], a[1], a[3]), _state(b[0], b[1], b[3]))


def test_training_state_before_the_first_step_resets_new_optimizer_state_to_zero():
    from ebmfast.cd_graph import TrainingState

    a, b = _setup(), _setup()
    step_a = CDStep(a[0], a[1], a[4], a[3], generator=a[2])
    step_b = CDStep(b[0], b[1], b[4], b[3], generator=b[2])
    state = TrainingState(step_b)
    state.save()
    step_b(b[5])  # creates Adam's state
    state.restore()
    assert torch.equal(step_b(b[5]), step_a(a[5]))
    _assert_same_state(_state(a[0], a[1], a[3]), _state(b[0], b[1], b[3]))


def test_cd_graph_refuses_an_optimizer_that_cannot_be_captured():
    from ebmfast.cd_graph import CDGraph, graph_ready_optimizer

    model, opt, gen, buffer, sampler, _ = _setup()
    assert "capturable=True" in graph_ready_optimizer(opt)
    with pytest.raises(ValueError, match="graph-ready optimizer"):
        CDGraph(CDStep(model, opt, sampler, buffer, generator=gen))
