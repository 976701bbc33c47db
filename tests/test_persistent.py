"""The persistent chain kernel (kernels/persistent.py) and its program (ebmfast/persistent.py) against the reference.

On a CPU-only machine the kernel runs under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1;
the op needs EBMFAST_TRITON_ON_CPU=1, set by the ``device`` fixture); on CUDA the same tests (``device``-marked) run
the compiled kernel. The interpreter pays per Triton operation (~0.5 s per seed-CNN step of one block), so chains
stay short there: 60 steps only on one-launch-per-layer MLP chains, or marked slow. ``test_*gpu_tiles`` run the
GPU's tile settings (many small row tiles, column tiles, the 1-sample block) under the interpreter too.
``test_hopper_compile`` compiles the kernel for sm_90 without a GPU and reports registers, spills and shared memory.

Tolerances. The kernel runs the layer program's arithmetic (tests/test_layers.py) with other tile sizes, so its
trajectories differ from the reference fed the same draws only in gradient rounding, which the clamps and the clip
keep from growing: the sampler's tolerances apply, 1e-5 on CPU and 1e-4 on CUDA (tests/test_sampler.py; the CUDA
reference's cuDNN may pick other summation orders). Measured under the interpreter (2026-12-01): at most 1.3e-7
over 1-2 steps (every test here), and over 60 steps 1.2e-7 (seed CNN, b2), 3.0e-7 (second chain, b3), 2.2e-7 (MLP,
b5), 6.9e-7 (one-hidden-layer MLP, b3): the same order as the layer program's 1.2e-7..3.0e-7 (tests/test_layers.py).
Noise, clip, step and clamps are the same fp32 operations as the update kernel's, so with equal gradients the
trajectories are equal. bf16 operands: 9.2e-5 from fp32 after 2 steps (second chain; bound 1e-2).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_close_verbose
from test_layers import (
    BENCH_DIR,
    NEW_ACTS,
    act_chain,
    affine_params,
    autograd_energy_grad,
    frozen,
    mlp1_chain,
    mlp_chain,
    residual_chain,
    second_chain,
)
from torch import nn

from ebmfast import CNNModel, LangevinSampler, langevin, langevin_reference, ops
from ebmfast.kernels.geometry import ACT_NAMES, ACT_SIGMOID, encode_geometry
from ebmfast.layers import plan_layers
from ebmfast.persistent import PersistentProgram, persistent_program, unsupported_reason
from ebmfast.reference import StepSettings, sampling_mode
from ebmfast.sampler import precision_context

# The whole file is a kernel sweep under the Triton interpreter (minutes on 2 cores): marked slow, so that
# `pytest -m "not slow"` stays quick; tests/test_sampler_kernels.py covers the kernels end to end there.
pytestmark = [pytest.mark.skipif(ops.persistent_kernels is None, reason="Triton is not installed"), pytest.mark.slow]

if ops.persistent_kernels is not None:
    from ebmfast.kernels import persistent as P

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before the kernels load"

CHAIN_ATOL = {"cpu": 1e-5, "cuda": 1e-4}
S, C, SIGMA, LO, HI = 10.0, 0.03, 0.005, -1.0, 1.0
STEP = dict(step_size=S, grad_clip=C, noise_std=SIGMA, lo=LO, hi=HI)
SETTINGS = StepSettings(**STEP)


@pytest.fixture
def device(monkeypatch):
    """CUDA when present, else CPU tensors through the interpreter (the op needs EBMFAST_TRITON_ON_CPU)."""
    if not CUDA:
        monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    return DEVICE


def small_cnn():
    """A narrow seed CNN (same layers and geometry, 2/4/8/8 channels): the GPU tile settings stay few programs."""
    torch.manual_seed(6)
    return CNNModel(hidden_features=4)


ARCHS = {  # name: (model factory, sample shape)
    "seed": (lambda: (torch.manual_seed(0), CNNModel())[1], (1, 28, 28)),
    "second": (second_chain, (3, 32, 32)),
    "mlp": (mlp_chain, (23,)),
    "mlp1": (mlp1_chain, (3, 5, 7)),
    "small-cnn": (small_cnn, (1, 28, 28)),
}


def make(arch, device, batch, seed=0):
    factory, shape = ARCHS[arch]
    model = frozen(factory(), device)
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(device)
    return model, x


def reference(model, x, steps, z, return_trajectory=False):
    with precision_context("fp32", x.device.type):
        return langevin_reference(
            model, x, steps, S, SIGMA, C, (LO, HI), noise=z, return_trajectory=return_trajectory
        )  # fmt: skip


def run(model, x, steps, *, seed=11, noise=None, trajectory=False, settings=None, program=None):
    """The persistent chain from ``x`` (a copy) with the sampler's stream (or ``noise``), and the reference fed the
    same draws. Returns (got, want, got_traj, want_traj, rng)."""
    sampler = LangevinSampler(model, steps=steps, seed=seed)
    z = sampler.noise_stream(x) if noise is None else noise
    rng = sampler.rng_state(x.device)
    program = program or PersistentProgram(model)
    if settings is not None:
        program.prepare(x, settings)
    traj = torch.full((steps, *x.shape), float("nan"), device=x.device) if trajectory else None
    got = x.clone()
    with sampling_mode(model):
        program.chain_(got, rng, steps, SETTINGS, noise=noise, trajectory=traj)
    assert torch.equal(rng.cpu(), torch.tensor([seed, 0]))  # the kernel never advances the counter
    res = reference(model, x, steps, z, return_trajectory=trajectory)
    want, want_traj = res if trajectory else (res, None)
    return got, want, traj, want_traj, rng


def check(model, x, steps, what, **kw):
    got, want, traj, want_traj, _ = run(model, x, steps, **kw)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[x.device.type], what=what)
    if traj is not None:
        assert_close_verbose(traj, want_traj, atol=CHAIN_ATOL[x.device.type], what=f"{what} trajectory")
    err = (got - want).abs().max().item()
    print(f"PERSISTENT {what}: max |persistent - reference| {err:.2e}")
    return got, want


# ------------------------------------------------------------------------------------------------ trajectory parity
@pytest.mark.device
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_seed_cnn_parity(device, batch, steps):
    """The seed CNN, default settings (interpreter: one block of up to 8 samples; batch 17 = 3 blocks, the last
    with one sample)."""
    model, x = make("seed", device, batch, seed=batch)
    check(model, x, steps, f"seed CNN b{batch} k{steps}")


@pytest.mark.device
@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("batch", [1, 3, 17])
def test_second_chain_parity(device, batch, steps):
    """3-channel 32x32 input, 7x7 stride-3 conv, Tanh, SiLU, a bias-free conv, the fused head after a Flatten."""
    model, x = make("second", device, batch, seed=10 + batch)
    check(model, x, steps, f"second chain b{batch} k{steps}")


@pytest.mark.device
@pytest.mark.parametrize("batch", ["tile-1", "tile", "tile+1"])
@pytest.mark.parametrize("arch, block", [("seed", 2), ("second", 4), ("mlp", 8)])
def test_block_edges(device, arch, block, batch):
    """Batches one below, at and one above the block size (a ragged last block, a full one, a 1-sample block)."""
    n = {"tile-1": block - 1, "tile": block, "tile+1": block + 1}[batch]
    model, x = make(arch, device, n, seed=n)
    settings = P.chain_settings(plan_layers(model, x.shape[1:]), n, block=block, interpreted=not CUDA)
    assert settings.block == block
    check(model, x, 2, f"{arch} block {block} batch {n}", settings=settings)


@pytest.mark.device
@pytest.mark.parametrize("arch, batch", [("small-cnn", 3), ("second", 2), ("mlp1", 5)])
def test_gpu_tiles(device, arch, batch):
    """The GPU's settings (1-sample blocks at small batches, BM down to 16, several row and column tiles, taps x
    channel blocks), and a persistent grid smaller than the number of blocks (programs loop over blocks)."""
    model, x = make(arch, device, batch, seed=20 + batch)
    specs = plan_layers(model, x.shape[1:])
    settings = P.chain_settings(specs, batch, interpreted=False)
    assert settings.block == 1 and settings.gpu_tiles
    check(model, x, 2, f"{arch} GPU tiles b{batch}", settings=settings._replace(programs=2))


@pytest.mark.device
@pytest.mark.parametrize("arch, batch", [("mlp1", 3), ("mlp", 5)])
def test_60_step_parity(device, arch, batch):
    """60 steps in one launch on chains the interpreter runs quickly (one and two hidden layers)."""
    model, x = make(arch, device, batch, seed=30 + batch)
    got, _ = check(model, x, 60, f"{arch} 60 steps b{batch}")
    assert (got - x).abs().max() > 0.05  # the chain moved


@pytest.mark.slow
@pytest.mark.device
@pytest.mark.parametrize("arch, batch", [("seed", 2)])
def test_60_step_parity_conv_chains(device, arch, batch):
    model, x = make(arch, device, batch, seed=40 + batch)
    got, _ = check(model, x, 60, f"{arch} 60 steps b{batch}")
    assert (got - x).abs().max() > 0.05


@pytest.mark.device
@pytest.mark.parametrize("arch", ["second", "mlp1"])
def test_trajectory(device, arch):
    """return_trajectory: the state after each step, written by the kernel (update, copy, then the next draw)."""
    model, x = make(arch, device, 3, seed=50)
    check(model, x, 3, f"{arch} trajectory", trajectory=True)


@pytest.mark.device
def test_supplied_noise(device):
    """Draws from a tensor (parity mode), with and without the trajectory; the stream is not read."""
    model, x = make("second", device, 2, seed=51)
    steps = 3
    noise = (torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(52)) * 3).to(device)
    check(model, x, steps, "supplied noise", noise=noise)
    check(model, x, steps, "supplied noise trajectory", noise=noise, trajectory=True)


def unclipped_chain(model, shape, specs, device, seed_x, gpu_tiles, steps=2):
    """2 steps of the chain kernel on ``specs`` (the layers of ``model``) against the reference on ``model`` fed the
    same draws, without clipping (clip bound 1e3, a step that moves x by about 0.1 per step): the gradient's values,
    not only its signs, reach x. Returns the largest difference."""
    batch, seed = 3, 11
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(seed_x)) * 2 - 1).to(device)
    z = LangevinSampler(model, steps=steps, seed=seed).noise_stream(x)
    settings = P.chain_settings(specs, batch, interpreted=not gpu_tiles)
    if gpu_tiles and not CUDA:
        settings = settings._replace(programs=2)  # fewer programs than blocks: programs loop
    weights, biases = affine_params(model)
    scratch = torch.empty(settings.programs * P.scratch_layout(specs, settings.block)[1], device=device)
    rng = torch.tensor([seed, 0], dtype=torch.int64, device=device)
    step_size = 0.1 / autograd_energy_grad(model, x).abs().max().item()
    got = x.clone()
    P.launch_chain(got, None, None, rng, weights, biases, scratch, specs, 0, settings, steps, step_size, 1e3, SIGMA,
                   LO, HI)  # fmt: skip
    with precision_context("fp32", x.device.type):
        want = langevin_reference(model, x, steps, step_size, SIGMA, 1e3, (LO, HI), noise=z)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="chain")
    return (got - want).abs().max().item()


@pytest.mark.device
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
@pytest.mark.parametrize("act", NEW_ACTS, ids=ACT_NAMES.get)
def test_activation_chains(device, act, gpu_tiles):
    """A chain with each activation (padded convs, the fused head; tests/test_layers.py ``act_chain``), 2 unclipped
    steps in the chain kernel against the reference (``unclipped_chain``)."""
    model, shape, specs = act_chain(act)
    err = unclipped_chain(frozen(model, device), shape, specs, device, act, gpu_tiles)
    print(f"PERSISTENT {ACT_NAMES[act]} chain: max |persistent - reference| {err:.2e}")


@pytest.mark.device
@pytest.mark.parametrize("gpu_tiles", [False, True], ids=["interpreter-tiles", "gpu-tiles"])
def test_residual_chain(device, gpu_tiles):
    """Residual adds (tests/test_layers.py ``ResidualChain``: from an earlier layer's input across two convs, and
    the unfused layer before the final Linear adding its own input), 2 unclipped steps against the reference."""
    model, shape, specs = residual_chain(ACT_SIGMOID)
    err = unclipped_chain(frozen(model, device), shape, specs, device, 24, gpu_tiles)
    print(f"PERSISTENT residual chain: max |persistent - reference| {err:.2e}")


@pytest.mark.device
@pytest.mark.parametrize("arch", ["mlp1", "mlp"])
def test_nan_propagates(device, arch):
    """A NaN state element makes its sample NaN (gradient, update and noise clamps keep NaN, as torch.clamp does);
    the other samples of the block are unaffected."""
    model, x = make(arch, device, 3, seed=53)
    steps, seed = 2, 11
    z = LangevinSampler(model, steps=steps, seed=seed).noise_stream(x)  # the stream (x only gives its shape)
    x.view(3, -1)[1, 2] = float("nan")
    got = x.clone()
    with sampling_mode(model):
        PersistentProgram(model).chain_(got, torch.tensor([seed, 0], dtype=torch.int64, device=device), steps, SETTINGS)
    assert got.view(3, -1).isnan().all(dim=1).tolist() == [False, True, False]
    keep = [0, 2]  # the reference refuses non-finite input: the other samples' chains, fed the same draws
    want = reference(model, x[keep], steps, z[:, keep])
    assert_close_verbose(got[keep], want, atol=CHAIN_ATOL[x.device.type], what=f"{arch} beside a NaN sample")


# ------------------------------------------------------------------------------------------------ stream and weights
@pytest.mark.device
def test_new_noise_each_call_and_seeded_reproducibility(device):
    """The caller advances rng[1] by K: the next call draws new noise, equal to noise_stream after the advance;
    the same seed gives the same chains (bitwise)."""
    model, x = make("mlp", device, 3, seed=60)
    steps = 4
    sampler = LangevinSampler(model, steps=steps, seed=5)
    rng = sampler.rng_state(x.device)
    program = persistent_program(model)
    outs = []
    for _ in range(2):
        z = sampler.noise_stream(x)
        got = program.chain_(x.clone(), rng, steps, SETTINGS)
        assert_close_verbose(got, reference(model, x, steps, z), atol=CHAIN_ATOL[device], what="call")
        rng[1] += steps
        outs.append(got)
    assert (outs[0] - outs[1]).abs().max() > 1e-4  # new draws
    again = LangevinSampler(model, steps=steps, seed=5).rng_state(x.device)
    assert torch.equal(program.chain_(x.clone(), again, steps, SETTINGS), outs[0])


@pytest.mark.device
def test_in_place_weight_updates_are_seen(device):
    model, x = make("second", device, 2, seed=61)
    program = persistent_program(model)
    before, _, _, _, _ = run(model, x, 2, program=program)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)
    after, want, _, _, _ = run(model, x, 2, program=program)
    assert (after - before).abs().max() > 1e-4
    assert_close_verbose(after, want, atol=CHAIN_ATOL[device], what="after an in-place update")
    model[0].weight = nn.Parameter(model[0].weight.detach() * -1.0, requires_grad=False)  # replaced: read per call
    got, want, _, _, _ = run(model, x, 2, program=program)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="after replacing a parameter")


@pytest.mark.device
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_deviation(device, precision):
    """tf32 / bf16 operands (fp32 accumulation, fp32 state): the deviation from the fp32 chain, measured and
    bounded by 1e-2 after 2 steps (under the interpreter tf32 is exact fp32)."""
    model, x = make("second", device, 2, seed=62)
    rng = torch.tensor([3, 0], dtype=torch.int64, device=device)
    ref = PersistentProgram(model, "fp32").chain_(x.clone(), rng, 2, SETTINGS)
    got = PersistentProgram(model, precision).chain_(x.clone(), rng, 2, SETTINGS)
    dev = (got - ref).abs()
    print(f"PRECISION persistent {precision} vs fp32 (second chain, b2, 2 steps): max {dev.max().item():.2e}, "
          f"mean {dev.mean().item():.2e}")  # fmt: skip
    assert dev.max() < 1e-2
    if precision == "tf32" and not CUDA:
        assert dev.max() == 0


# ------------------------------------------------------------------------------------------------ API and checks
@pytest.mark.device
def test_one_launch_per_chain(device, monkeypatch):
    """The whole chain is one launch of the chain kernel: no update, noise or layer launches beside it."""
    model, x = make("mlp", device, 3, seed=70)
    launches = []
    real = P.launch_chain
    monkeypatch.setattr(P, "launch_chain", lambda *a, **k: (launches.append(1), real(*a, **k)))

    def forbidden(*a, **k):
        raise AssertionError("the persistent chain launched another kernel")

    monkeypatch.setattr(langevin.kernels, "launch_langevin_step", forbidden)
    monkeypatch.setattr(langevin.kernels, "launch_normal", forbidden)
    monkeypatch.setattr(ops.layer_kernels, "run_calls", forbidden)
    program = PersistentProgram(model)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    program.chain_(x, rng, 5, SETTINGS)
    assert launches == [1] and program.launches_per_chain == 1
    assert PersistentProgram(CNNModel()).launches_per_chain == 1


@pytest.mark.device
def test_scratch_is_allocated_once_per_shape(device):
    model, x = make("mlp", device, 3, seed=71)
    program = PersistentProgram(model)
    program.prepare(x)
    (scratch,) = program.scratch(x)
    specs, settings = program.specs(x), program.settings(x)
    assert scratch.numel() == settings.programs * P.scratch_layout(specs, settings.block)[1]
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    program.chain_(x, rng, 2, SETTINGS)
    assert program.scratch(x)[0].data_ptr() == scratch.data_ptr() and len(program._plans) == 1
    program.chain_(torch.rand(5, 23, device=device), rng, 1, SETTINGS)
    assert len(program._plans) == 2
    program.release()
    assert not program._plans


def test_settings_rules():
    """Compiled: blocks fit the per-program and L2 scratch budgets, shrink to keep every SM busy, the grid is at most
    SMs x PROGRAMS_PER_SM; the seed CNN's scratch layout is 7424 floats per sample."""
    specs = plan_layers(CNNModel(), (1, 28, 28))
    assert P.scratch_per_sample(specs) == 4096 + 2048 + 1024 + 256  # the fused head stores nothing
    big, small, one = (P.chain_settings(specs, b, interpreted=False, sm_count=132) for b in (16384, 128, 1))
    assert (big.block, big.programs, big.num_warps) == (4, 264, 4)
    assert (small.block, small.programs) == (1, 128) and (one.block, one.programs) == (1, 1)
    per = 4 * P.scratch_per_sample(specs)
    assert big.programs * big.block * per <= P.L2_SCRATCH_BYTES and big.block * per <= P.PROGRAM_SCRATCH_BYTES
    for arch in ARCHS:
        factory, shape = ARCHS[arch]
        specs = plan_layers(factory(), shape)
        for batch in (1, 3, 17, 128, 16384):
            for interpreted in (True, False):
                st = P.chain_settings(specs, batch, interpreted=interpreted)
                assert st.block * 4 * P.scratch_per_sample(specs) <= P.PROGRAM_SCRATCH_BYTES
                assert 1 <= st.programs <= -(-batch // st.block)
                for tiles in P.layer_tiles(specs, st).values():
                    for t in tiles.values():
                        assert t.bm >= 16 and (not t.use_dot or (t.bn >= 16 and t.bk >= 16))
    st = P.ChainSettings(4, 8, 264, True)
    assert P.ChainSettings.decode(st.encode()) == st


def test_generated_source_is_cached_by_content(tmp_path, monkeypatch):
    """The kernel source is written once per text (hash-named file) and imported from there."""
    monkeypatch.setenv("EBMFAST_KERNEL_CACHE", str(tmp_path))
    specs = plan_layers(mlp_chain(), (23,))
    st = P.chain_settings(specs, 3)
    src = P.chain_source(specs, 0, st)
    assert src == P.chain_source(specs, 0, st) and "def chain_kernel(" in src and "tl.debug_barrier()" in src
    P._KERNELS.clear()
    kernel = P.chain_kernel(specs, 0, st)
    files = list(tmp_path.glob("chain_*.py"))
    assert len(files) == 1 and files[0].read_text() == src
    assert P.chain_kernel(specs, 0, st) is kernel
    assert P.chain_source(specs, 1, st) != src  # precision is part of the text


REASONS = [
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softplus(threshold=10), nn.Flatten(), nn.Linear(4 * 26 * 26, 1)),
     (1, 28, 28), "softplus in 1 (Softplus) with threshold 10"),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Linear(5, 1)), (10,), "could not be captured"),
    (lambda: CNNModel(), (1, 32, 32), "CNNModel expects images"),
    (lambda: nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(64 * 40 * 40, 1)),
     (3, 40, 40), "KiB of scratch"),
]  # fmt: skip


@pytest.mark.parametrize("make_model, shape, match", REASONS, ids=[r[2] for r in REASONS])
def test_unsupported_reasons(device, make_model, shape, match):
    reason = unsupported_reason(make_model().to(device), torch.zeros(2, *shape, device=device))
    assert reason is not None and match in reason, reason


def test_supported_and_device_reasons(device, monkeypatch):
    x = torch.zeros(2, 1, 28, 28, device=device)
    model = CNNModel().to(device)
    assert unsupported_reason(model, x) is None
    assert "float32" in unsupported_reason(model, x.double())
    assert "precision" in unsupported_reason(model, x, precision="fp16")
    with pytest.raises(ValueError, match="KiB of scratch"):
        PersistentProgram(REASONS[-1][0]().to(device)).prepare(torch.zeros(2, 3, 40, 40, device=device))
    with pytest.raises(ValueError, match="one score per sample"):
        PersistentProgram(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU()).to(device)).prepare(
            torch.zeros(2, 1, 5, 5, device=device)
        )
    if not CUDA:  # CPU tensors run only under the interpreter with EBMFAST_TRITON_ON_CPU=1
        monkeypatch.delenv("EBMFAST_TRITON_ON_CPU")
        assert "TRITON_INTERPRET" in unsupported_reason(model, x)
        with pytest.raises(RuntimeError, match="CUDA"):
            PersistentProgram(model).prepare(x)


def test_argument_checks(device):
    model, x = make("mlp", device, 2)
    program = PersistentProgram(model)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="steps must be a positive"):
        program.chain_(x, rng, 0, SETTINGS)
    with pytest.raises(ValueError, match="rng must be an int64"):
        program.chain_(x, rng.float(), 1, SETTINGS)
    with pytest.raises(ValueError, match=r"noise must be a contiguous float32 tensor of shape \(steps, \*x.shape\)"):
        program.chain_(x, rng, 2, SETTINGS, noise=torch.zeros(1, *x.shape, device=device))
    with pytest.raises(ValueError, match="trajectory must be"):
        program.chain_(x, rng, 2, SETTINGS, trajectory=torch.zeros(2, *x.shape, device=device, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must be contiguous"):
        program.chain_(torch.zeros(23, 2, device=device).t(), rng, 1, SETTINGS)
    with pytest.raises(ValueError, match="cannot run this model on x"):
        program.chain_(torch.zeros(2, 24, device=device), rng, 1, SETTINGS)


def test_opcheck(device):
    model, x = make("mlp", device, 3)
    program = PersistentProgram(model)
    program.prepare(x)
    plan = program._plan(x)
    w, b = program._params(plan.chain)
    rng = torch.tensor([3, 5], dtype=torch.int64, device=device)
    traj = torch.zeros(2, *x.shape, device=device)
    torch.library.opcheck(
        torch.ops.ebmfast.persistent_chain_.default,
        (x, None, traj, rng, w, b, plan.scratch, plan.geometry, 0, plan.settings_list, 2, S, C, SIGMA, LO, HI),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------------------------------------ CUDA graph
@pytest.mark.cuda
def test_graph_capture_and_replay():
    """Captured in a CUDA graph with the counter advance: each replay draws new noise (equal to noise_stream at that
    point); no allocation or host sync inside the captured call."""
    model, x = make("seed", "cuda", 128, seed=80)
    steps = 60
    sampler = LangevinSampler(model, steps=steps, seed=9)
    rng = sampler.rng_state(x.device)
    program = persistent_program(model)
    state = x.clone()
    program.prepare(state)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), sampling_mode(model):
        program.chain_(state, rng, steps, SETTINGS)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    rng[1] = 0
    graph = torch.cuda.CUDAGraph()
    with sampling_mode(model), torch.cuda.graph(graph):
        program.chain_(state, rng, steps, SETTINGS)
        rng[1] += steps
    for _ in range(2):
        z = sampler.noise_stream(x)
        state.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_verbose(state, reference(model, x, steps, z), atol=CHAIN_ATOL["cuda"], what="graph replay")


# ------------------------------------------------------------------------------------------------ sm_90 compile
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, os, re, sys, time
    assert "TRITON_INTERPRET" not in os.environ
    import torch
    from ebmfast.kernels import persistent as P
    from ebmfast.kernels.geometry import decode_geometry

    sys.path.insert(0, sys.argv[2])  # bench/: the compile tooling
    import kernel_compile as KC

    meta = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)
    rows = []
    for geometry, shape, batch, prec, mode in json.loads(sys.argv[1]):
        specs = decode_geometry(geometry)
        st = P.chain_settings(specs, batch, interpreted=False, sm_count=132)
        x, w = meta(batch, *shape), [meta(1)] * len(specs)
        extra = {"noise": dict(noise=meta(2, batch, *shape)), "trajectory": dict(trajectory=meta(2, batch, *shape))}
        call = P.chain_call(specs, x, meta(2, dtype=torch.int64), w, w, meta(1), prec, st, 60, **extra.get(mode, {}))
        t0 = time.time()
        k = KC.compile_call(call, capability=90)
        seconds = time.time() - t0
        assert k.asm.get("cubin")
        ptx = k.asm["ptx"]
        tc = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
        assert prec != 0 or tc == "fma", "fp32 must not use tensor cores"
        # Loads that bypass L1 coherence (ld.global.nc) may only read libdevice's constant table (cos argument
        # reduction): scratch and state are written and read back by other threads of the program.
        table = set(re.findall(r"mov\\.b64\\s+(%rd\\d+), __cudart_i2opi_f;", ptx))
        lines = ptx.splitlines()
        for n, line in enumerate(lines):
            if "ld.global.nc" in line:
                reg = re.search(r"\\[(%rd\\d+)[^\\]]*\\]", line).group(1)
                src = [l for l in lines[max(0, n - 4):n] if re.search(rf"add\\.s64\\s+{re.escape(reg)},", l)]
                ok = reg in table or (src and any(re.search(rf"{re.escape(t)}\\b", src[-1]) for t in table))
                assert ok, f"non-coherent load: {line.strip()}"
        rep = KC.ptxas_report(ptx)
        rows.append(dict(layers=len(specs), batch=batch, block=st.block, warps=st.num_warps, prec=prec, mode=mode,
                         seconds=round(seconds, 1), registers=rep["registers"], spills=rep["spill_stores"],
                         shared=k.metadata.shared, tc=tc, barriers=ptx.count("bar.sync")))
    print(json.dumps(rows))
    """
)


@pytest.mark.slow
def test_hopper_compile(tmp_path):
    """The chain kernel compiles for sm_90 (PTX and cubin) without a GPU, in a subprocess with TRITON_INTERPRET unset
    and an empty Triton cache (compile times are real): the seed CNN at batch 1 / 128 (1-sample blocks) and 16384
    (4-sample blocks) in fp32 (FMA only) and tf32 (tensor cores), with supplied noise and with the trajectory; the
    second and MLP chains. Reports registers, spill bytes, shared memory and compile seconds per kernel. By default
    (CI) only the seed CNN's first three kernels; ``EBMFAST_COMPILE_SWEEP=1`` compiles the whole list."""
    seed = encode_geometry(plan_layers(CNNModel(), (1, 28, 28)))
    jobs = [[seed, (1, 28, 28), 128, 0, "stream"], [seed, (1, 28, 28), 16384, 0, "stream"],
            [seed, (1, 28, 28), 16384, 1, "stream"], [seed, (1, 28, 28), 16384, 0, "noise"],
            [seed, (1, 28, 28), 16384, 0, "trajectory"]]  # fmt: skip
    if os.environ.get("EBMFAST_COMPILE_SWEEP") == "1":  # the whole list (about 3 minutes on 2 cores)
        for factory, shape in (ARCHS["second"], ARCHS["mlp"], ARCHS["mlp1"]):
            jobs.append([encode_geometry(plan_layers(factory(), shape)), shape, 128, 0, "stream"])
        _, shape, specs = residual_chain(ACT_SIGMOID)  # residual adds, a new activation
        jobs.append([encode_geometry(specs), shape, 128, 0, "stream"])
    else:  # CI: the seed CNN in fp32 (1-sample and 4-sample blocks) and tf32
        jobs = jobs[:3]
    rows = compile_rows(jobs, tmp_path)
    assert rows[2]["tc"] in ("wgmma", "mma")


def compile_rows(jobs: list, tmp_path) -> list[dict]:
    """Run ``_COMPILE_SCRIPT`` on ``jobs`` in a subprocess without the interpreter and an empty Triton cache; checks
    and prints its rows (fp32 on FMAs, a barrier between every two phases)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EBMFAST_TRITON_ON_CPU")}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "triton"), EBMFAST_KERNEL_CACHE=str(tmp_path / "gen"))
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(jobs), BENCH_DIR],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = json.loads(res.stdout.strip().splitlines()[-1])
    for row in rows:
        print(f"HOPPER COMPILE persistent {json.dumps(row)}")
    assert len(rows) == len(jobs)
    assert all(r["tc"] == "fma" for r in rows if r["prec"] == 0)
    assert all(r["barriers"] >= r["layers"] for r in rows)  # a barrier between every two phases (and more)
    return rows


def test_hopper_compile_dropin_models(tmp_path):
    """The persistent kernels of tests/test_recognise.py's drop-in models (tutorial, short-run, pooled residual;
    batch 3, fp32) compile for sm_90 without a GPU."""
    from test_recognise import DROPIN

    jobs = []
    for make, size, _ in DROPIN.values():
        shape = (1, size, size)
        jobs.append([encode_geometry(plan_layers(make(), shape)), shape, 3, 0, "stream"])
    compile_rows(jobs, tmp_path)


def test_programs_are_cached_per_model_and_precision():
    """persistent_program caches per (model, precision): a deep copy gets its own program and scratch."""
    model = CNNModel()
    assert persistent_program(model) is persistent_program(model)
    assert persistent_program(copy.deepcopy(model)) is not persistent_program(model)
    assert persistent_program(model, "bf16") is not persistent_program(model)
