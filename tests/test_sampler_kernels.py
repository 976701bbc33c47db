"""LangevinSampler(backend="triton" / "persistent"): our kernels behind the sampler API (the layer kernels step by
step; the whole chain in one persistent kernel).

On CPU the kernels run under the Triton interpreter (``EBMFAST_TRITON_ON_CPU=1``); on CUDA (``device`` marker) the
chain is captured in a CUDA graph. Tolerance: the layer kernels differ from the reference only in the gradient's
summation order (fp32 products, measured 1.2e-7 .. 3.0e-7 over 60 steps of the seed CNN in tests/test_layers.py);
1e-5 on CPU and 1e-4 on CUDA as for every backend (tests/test_sampler.py)."""

import pytest
import torch
from conftest import assert_close_verbose
from torch import nn

from ebmfast import CNNModel, LangevinSampler, langevin_reference
from ebmfast.sampler import resolve_backend

ATOL = {"cpu": 1e-5, "cuda": 1e-4}
KERNEL_BACKENDS = ["triton", "persistent"]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request, monkeypatch):
    if request.param == "cpu":
        monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    return torch.device(request.param)


def _mlp():
    torch.manual_seed(5)
    return nn.Sequential(nn.Flatten(), nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 12), nn.SiLU(), nn.Linear(12, 1))


def _parity(model, x, steps, backend):
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=3)
    z = sampler.noise_stream(x)
    got = sampler.sample(x)
    want = langevin_reference(model, x, steps, noise=z)
    assert_close_verbose(got, want, atol=ATOL[x.device.type], what="triton vs reference")
    assert sampler.last_backend == backend
    return sampler


@pytest.mark.device
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backend_matches_the_reference_on_a_small_chain(device, backend):
    model = _mlp().to(device)
    x = (torch.rand(5, 1, 4, 5) * 2 - 1).to(device)
    sampler = _parity(model, x, 20, backend)  # 60-step parity: tests/test_layers.py, tests/test_persistent.py
    # the counter advanced: the next call draws new noise, and that is the stream's next block
    z = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert_close_verbose(got, langevin_reference(model, x, 20, noise=z), atol=ATOL[device.type], what="second call")


@pytest.mark.device
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backend_on_the_seed_cnn_with_trajectory_and_supplied_noise(device, backend):
    torch.manual_seed(0)
    model = CNNModel(hidden_features=8).to(device)
    x = (torch.rand(3, 1, 28, 28) * 2 - 1).to(device)
    sampler = LangevinSampler(model, steps=3, backend=backend, seed=1)
    z = sampler.noise_stream(x)
    out, traj = sampler.sample(x, return_trajectory=True)
    want, want_traj = langevin_reference(model, x, 3, noise=z, return_trajectory=True)
    assert_close_verbose(traj, want_traj, atol=ATOL[device.type], what="trajectory")
    noise = torch.randn(3, *x.shape, device=device)
    got = sampler.sample(x, noise=noise)
    assert_close_verbose(got, langevin_reference(model, x, 3, noise=noise), atol=ATOL[device.type], what="noise=")


@pytest.mark.device
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_in_place_weight_updates_are_seen(device, backend):
    model = _mlp().to(device)
    x = (torch.rand(4, 1, 4, 5) * 2 - 1).to(device)
    sampler = LangevinSampler(model, steps=4, backend=backend, seed=0)
    sampler.sample(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    z = sampler.noise_stream(x)
    got = sampler.sample(x)
    assert_close_verbose(got, langevin_reference(model, x, 4, noise=z), atol=ATOL[device.type], what="after update")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_models_the_kernels_cannot_run_are_refused_with_the_reason(monkeypatch, backend):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1) * 2

    sampler = LangevinSampler(Wrapped(), steps=2, backend=backend)
    with pytest.raises(ValueError, match=f"backend='{backend}' cannot run this model.*backend='auto'"):
        sampler.sample(torch.zeros(2, 4))


def test_explain_names_the_backend_and_why(monkeypatch):
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    model = _mlp()
    x = torch.zeros(2, 1, 4, 5)
    assert "'triton'" in LangevinSampler(model, backend="triton").explain(x)
    assert "'persistent'" in LangevinSampler(model, backend="persistent").explain(x)
    assert "'compiled'" in LangevinSampler(model, backend="auto").explain(x)
    assert "asked for" in LangevinSampler(model, backend="eager").explain(x)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_kernel_backends_on_cpu_without_the_interpreter_are_a_clear_error(monkeypatch, backend):
    monkeypatch.delenv("EBMFAST_TRITON_ON_CPU", raising=False)
    with pytest.raises(ValueError, match=f"backend='{backend}'.*CUDA"):
        resolve_backend(backend, torch.device("cpu"))
