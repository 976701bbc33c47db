"""ReplayBuffer: fresh-fraction statistics, capacity and eviction order, device residency, state round trip."""

import math

import pytest
import torch

from ebmfast import ReplayBuffer

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.device
@pytest.mark.parametrize("device", DEVICES)
def test_initial_contents_uniform_in_range(device):
    buf = ReplayBuffer((1, 4, 4), capacity=4096, device=device)
    s = buf.storage
    assert s.shape == (4096, 1, 4, 4) and s.device.type == device
    assert s.min() >= -1 and s.max() <= 1
    # U(-1, 1): mean 0, variance 1/3 (65,536 values: 5 sigma bounds)
    n = s.numel()
    assert abs(s.mean().item()) < 5 * math.sqrt(1 / 3 / n)
    assert abs(s.var().item() - 1 / 3) < 0.01


def test_fresh_fraction_is_binomial():
    """Mark the stored samples (all 5.0), so fresh ones (in [-1, 1]) are recognisable."""
    torch.manual_seed(0)
    batch, draws, p = 128, 400, 0.05
    buf = ReplayBuffer((3,), capacity=512, fresh_prob=p)
    buf.storage.fill_(5.0)
    counts = torch.tensor([(buf.draw(batch)[:, 0] < 2).sum().item() for _ in range(draws)], dtype=torch.float64)
    # Binomial(128, 0.05): mean 6.4, variance 6.08. Mean over 400 draws: sd 0.123 -> 5 sd bound 0.62.
    assert abs(counts.mean().item() - batch * p) < 5 * math.sqrt(batch * p * (1 - p) / draws)
    assert abs(counts.var().item() - batch * p * (1 - p)) < 2.0
    fresh = buf.draw(4096)
    fresh = fresh[fresh[:, 0] < 2]
    assert fresh.min() >= -1 and fresh.max() <= 1


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_fresh_prob_extremes(p):
    buf = ReplayBuffer((2,), capacity=16, fresh_prob=p)
    buf.storage.fill_(5.0)
    x = buf.draw(64)
    assert ((x == 5.0).all(1)).all() if p == 0.0 else (x.abs() <= 1).all()


def test_draw_is_uniform_over_slots():
    torch.manual_seed(1)
    buf = ReplayBuffer((1,), capacity=8, fresh_prob=0.0)
    buf.storage.copy_(torch.arange(8.0).view(8, 1))
    counts = torch.bincount(buf.draw(8000)[:, 0].long(), minlength=8).double()
    assert (counts - 1000).abs().max() < 5 * math.sqrt(1000 * 7 / 8)


def test_push_keeps_the_newest_and_evicts_oldest():
    buf = ReplayBuffer((1,), capacity=10, fresh_prob=0.0)
    buf.storage.fill_(-7.0)
    for i in range(4):  # 12 samples in batches of 3: values 0..11
        buf.push(torch.arange(3 * i, 3 * i + 3, dtype=torch.float32).view(3, 1) / 100)
    kept = sorted((buf.storage[:, 0] * 100).round().long().tolist())
    assert kept == list(range(2, 12))  # the last 10 pushed; the first two (oldest) evicted
    assert int(buf.ptr) == 12 % 10


def test_push_rejects_bad_batches():
    buf = ReplayBuffer((1, 2, 2), capacity=4)
    with pytest.raises(ValueError, match="capacity 4"):
        buf.push(torch.zeros(5, 1, 2, 2))
    with pytest.raises(ValueError, match=r"shape \(N, 1, 2, 2\)"):
        buf.push(torch.zeros(2, 1, 2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        buf.push(torch.full((2, 1, 2, 2), float("nan")))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        buf.draw(0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_shape=()), "sample_shape"),
        (dict(sample_shape=(1, 0)), "sample_shape"),
        (dict(sample_shape=(3,), capacity=0), "capacity must be a positive integer"),
        (dict(sample_shape=(3,), fresh_prob=1.5), "fresh_prob must be a probability"),
        (dict(sample_shape=(3,), clamp=(1, 1)), "low < high"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ReplayBuffer(**kwargs)


def test_state_dict_round_trip():
    a = ReplayBuffer((1, 3, 3), capacity=6)
    a.push(torch.zeros(4, 1, 3, 3))
    b = ReplayBuffer((1, 3, 3), capacity=6)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.storage, b.storage) and int(a.ptr) == int(b.ptr) == 4
    with pytest.raises(ValueError, match="capacity 6"):
        ReplayBuffer((1, 3, 3), capacity=7).load_state_dict(a.state_dict())
    with pytest.raises(KeyError, match="missing 'ptr'"):
        b.load_state_dict({"storage": a.storage, "capacity": 6, "sample_shape": (1, 3, 3)})


def test_seeded_generator_reproduces_draws():
    a = ReplayBuffer((2,), capacity=32, generator=torch.Generator().manual_seed(3))
    b = ReplayBuffer((2,), capacity=32, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.draw(16), b.draw(16))


# ------------------------------------------------------------------------------ fused (Triton) draw and push
from ebmfast.buffer import fused_replay_available  # noqa: E402


@pytest.fixture
def fused_device(monkeypatch):
    """CUDA when present; else CPU tensors through the Triton interpreter (conftest sets TRITON_INTERPRET=1)."""
    if torch.cuda.is_available():
        return "cuda"
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    if not fused_replay_available("cpu"):
        pytest.skip("Triton is not installed")
    return "cpu"


@pytest.mark.device
@pytest.mark.parametrize("shape", [(1, 28, 28), (5, 7), (1,)])
def test_fused_draw_rows_are_stored_rows_or_fresh(fused_device, shape):
    torch.manual_seed(7)
    cap, batch = 50, 67
    buf = ReplayBuffer(shape, capacity=cap, fresh_prob=0.2, device=fused_device, fused=True)
    buf.storage.copy_((torch.arange(cap, dtype=torch.float32) + 10).view(cap, *[1] * len(shape)).expand(cap, *shape))
    out, slots = torch.ops.ebmfast.replay_draw(buf.storage, buf.rng, batch, buf.fresh_prob, buf.lo, buf.hi)
    out, slots = out.cpu(), slots.cpu()
    assert out.shape == (batch, *shape) and torch.isfinite(out).all()
    kept = slots >= 0
    assert torch.equal(out[kept], buf.storage.cpu()[slots[kept]])  # copies, exactly
    fresh = out[~kept]
    assert fresh.numel() == 0 or (fresh.abs() <= 1).all()
    assert 0 < (~kept).sum() < batch  # p = 0.2 of 67 rows: P(none) and P(all) are negligible
    assert slots[kept].max() < cap


@pytest.mark.slow
@pytest.mark.device
def test_fused_draw_statistics_stream_and_state(fused_device):
    torch.manual_seed(8)
    buf = ReplayBuffer((3,), capacity=16, fresh_prob=0.05, device=fused_device, fused=True)
    buf.storage.fill_(5.0)
    draws = [buf.draw(128).cpu() for _ in range(10)]  # few: the interpreter runs one program per row
    counts = torch.tensor([(d[:, 0] < 2).sum().item() for d in draws], dtype=torch.float64)
    # Binomial(128, 0.05): mean 6.4, sd of the mean of 10 draws 0.78 -> 5 sd bound 3.9
    assert abs(counts.mean().item() - 6.4) < 3.9
    assert not torch.equal(draws[0], draws[1])  # the buffer's counter advanced
    fresh = torch.cat([d[d[:, 0] < 2] for d in draws]).flatten()
    # U(-1, 1) over ~190 values: 5 sd bounds for the mean (0.21) and the variance (0.11)
    assert abs(fresh.mean().item()) < 0.21 and abs(fresh.var().item() - 1 / 3) < 0.11
    state = buf.state_dict()
    again = ReplayBuffer((3,), capacity=16, device=fused_device, fused=True)
    again.load_state_dict(state)
    assert torch.equal(again.draw(32).cpu(), buf.draw(32).cpu())  # the stream position is part of the state


@pytest.mark.device
def test_fused_push_matches_torch_push_with_wraparound(fused_device):
    a = ReplayBuffer((2, 3), capacity=10, device=fused_device, fused=True)
    b = ReplayBuffer((2, 3), capacity=10, device=fused_device)
    b.storage.copy_(a.storage)
    for i in range(4):  # 3 x 4 = 12 rows into 10 slots: wraps
        x = torch.full((3, 2, 3), float(i), device=fused_device) + torch.arange(3.0, device=fused_device).view(3, 1, 1)
        a.push(x)
        b.push(x)
    assert torch.equal(a.storage, b.storage) and int(a.ptr) == int(b.ptr) == 2


def test_fused_needs_a_device_that_has_it(monkeypatch):
    monkeypatch.delenv("EBMFAST_TRITON_ON_CPU", raising=False)
    with pytest.raises(RuntimeError, match="fused replay-buffer kernels run on CUDA"):
        ReplayBuffer((3,), capacity=4, device="cpu", fused=True)
