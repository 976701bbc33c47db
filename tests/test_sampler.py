"""LangevinSampler: every backend on this machine against the eager reference, noise semantics, flags, errors.

Tolerances (fp32, the parity target). The backends differ from the reference only in how the energy gradient is
rounded (compiled chain rule vs autograd: ~1e-10 absolute on gradients of ~1e-4..1e-2) and, on CUDA, in FMA
contraction of the update. Every operation after the gradient (clip, step, clamp, noise, clamp) is 1-Lipschitz,
so differences grow only through the model's curvature; measured over 60 steps at batch 16: <= 2.6e-7 on CPU for a
random-init and a briefly trained seed CNN. We allow 1e-5 on CPU (40x headroom, still 100x below a single
Langevin noise draw, sigma = 5e-3) and 1e-4 on CUDA, where cuDNN may pick different convolution algorithms for the
compiled graph than for eager autograd.
"""

import copy

import pytest
import torch
from conftest import assert_close_verbose
from energies import MLPEnergy, Quadratic

from ebmfast import CNNModel, LangevinSampler, ReplayBuffer, langevin, langevin_reference
from ebmfast.errors import NonFiniteError, StopRequested
from ebmfast.opdef import HAS_TRITON
from ebmfast.reference import StepSettings
from ebmfast.sampler import resolve_backend

CPU_BACKENDS = ["eager", "compiled", "fused"]
ATOL = {"cpu": 1e-5, "cuda": 1e-4}


def available_backends(device):
    out = []
    for b in ["eager", "compiled", "fused", "graph"]:
        try:
            resolve_backend(b, torch.device(device))
            out.append(b)
        except (RuntimeError, ValueError):
            pass
    return out


@pytest.fixture(scope="module")
def cnn():
    """The seed CNN (hidden 32). One object for the whole module so the compiled gradient is built once."""
    torch.manual_seed(0)
    return CNNModel()


@pytest.fixture(scope="module")
def trained_state(cnn):
    """Weights after 30 brief CD iterations on digits (eager sampler, 10 steps), as a state dict."""
    from ebmfast.data import load_mnist5k

    torch.manual_seed(1)
    model = copy.deepcopy(cnn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    buf = ReplayBuffer((1, 28, 28), capacity=256)
    sampler = LangevinSampler(model, steps=10, backend="eager", seed=0)
    images = load_mnist5k().train_images
    for _ in range(30):
        real = images[torch.randint(0, len(images), (16,))]
        fake = sampler.sample(buf.draw(16))
        buf.push(fake)
        real_out, fake_out = model(torch.cat([real, fake])).chunk(2)
        loss = 0.1 * (real_out**2 + fake_out**2).mean() + fake_out.mean() - real_out.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert real_out.mean() > fake_out.mean()  # it learned something: data scores above samples
    return copy.deepcopy(model.state_dict())


def check_parity(model, x, backend, steps=60, atol=None):
    sampler = LangevinSampler(model, steps=steps, backend=backend, seed=11)
    z = sampler.noise_stream(x)
    got, traj = sampler.sample(x, return_trajectory=True) if backend != "graph" else (sampler.sample(x), None)
    want, want_traj = langevin_reference(model, x, steps, noise=z, return_trajectory=True)
    atol = ATOL[x.device.type] if atol is None else atol
    assert_close_verbose(got, want, atol=atol, what=f"{backend} final state")
    if traj is not None:
        assert_close_verbose(traj, want_traj, atol=atol, what=f"{backend} trajectory")
    assert sampler.last_backend == backend
    return got


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["random", "trained"])
def test_cnn_chain_parity_all_backends(cnn, trained_state, weights):
    init = copy.deepcopy(cnn.state_dict())
    if weights == "trained":
        cnn.load_state_dict(trained_state)  # in place: same parameter tensors, same compiled program
    try:
        x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1
        for backend in available_backends("cpu"):
            check_parity(cnn, x, backend)
    finally:
        cnn.load_state_dict(init)


@pytest.mark.slow
def test_fused_chain_through_triton_interpreter(cnn, monkeypatch):
    """The fused backend with the real Triton kernel (interpreted on CPU) for both the update and the stream.

    20 steps, not 60: the numpy interpreter runs the Philox rounds program by program (~1 s per step here); the
    60-step parity of the same chain code is covered by test_cnn_chain_parity_all_backends."""
    if not HAS_TRITON:
        pytest.skip("Triton is not installed")
    if torch.cuda.is_available():
        pytest.skip("on CUDA the compiled kernel is tested by tests/test_graph_cuda.py")
    monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1
    got = check_parity(cnn, x, "fused", steps=20)
    monkeypatch.delenv("EBMFAST_TRITON_ON_CPU")
    # the kernel's Philox stream differs from the CPU generator's, so the chains differ
    other = LangevinSampler(cnn, steps=20, backend="fused", seed=11).sample(x)
    assert (other - got).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_gradient_layout_choice_keeps_parity(channels_last):
    """channels_last picks the layout the compiled gradient runs in (None = CPU only); the chain is the same."""
    torch.manual_seed(5)
    model = CNNModel(hidden_features=8)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(5)) * 2 - 1
    s = LangevinSampler(model, steps=10, backend="compiled", seed=2, channels_last=channels_last)
    z = s.noise_stream(x)
    got = s.sample(x)
    assert got.is_contiguous()
    assert_close_verbose(got, langevin_reference(model, x, 10, noise=z), atol=ATOL["cpu"], what=f"cl={channels_last}")


@pytest.mark.slow
@pytest.mark.parametrize("batch", [1, 257])
def test_second_architecture_flat_vectors_odd_batches(batch):
    torch.manual_seed(batch)
    model = MLPEnergy(dim=10)
    model.train()
    x = torch.rand(batch, 10) * 2 - 1
    for backend in available_backends("cpu"):
        check_parity(model, x, backend, steps=20)
    assert model.training  # restored (BatchNorm/Dropout made eval mode matter during the chain)


@pytest.mark.parametrize(
    "backend", [pytest.param(b, marks=pytest.mark.slow) if b == "compiled" else b for b in CPU_BACKENDS]
)
def test_seeded_reproducible_and_calls_draw_new_noise(backend):
    model = Quadratic(torch.zeros(6), 0.5)
    x = torch.rand(4, 6) * 2 - 1
    a, b = (LangevinSampler(model, steps=5, backend=backend, seed=5) for _ in range(2))
    first = a.sample(x)
    assert torch.equal(first, b.sample(x))  # same seed, same chains
    second = a.sample(x)
    assert not torch.equal(first, second)  # the stream advanced
    assert a.state_dict()["counters"] == {"cpu": 10}
    a.manual_seed(5)
    assert torch.equal(a.sample(x), first)


def test_state_dict_round_trip_resumes_stream():
    model = Quadratic(torch.zeros(6), 0.5)
    x = torch.rand(4, 6) * 2 - 1
    a = LangevinSampler(model, steps=3, backend="eager", seed=9)
    a.sample(x)
    state = a.state_dict()
    expected = a.sample(x)
    b = LangevinSampler(model, steps=3, backend="eager", seed=1)
    b.load_state_dict(state)
    assert torch.equal(b.sample(x), expected)


def test_unseeded_sampler_follows_torch_manual_seed():
    model = Quadratic(torch.zeros(6), 0.5)
    x = torch.rand(4, 6) * 2 - 1
    torch.manual_seed(3)
    a = LangevinSampler(model, steps=3, backend="eager").sample(x)
    torch.manual_seed(3)
    b = LangevinSampler(model, steps=3, backend="eager").sample(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_explicit_noise_matches_reference_and_keeps_stream(backend):
    model = Quadratic(torch.full((5,), 0.3), 4.0)
    x = torch.rand(3, 5) * 2 - 1
    z = torch.randn(4, 3, 5)
    s = LangevinSampler(model, steps=4, backend=backend, seed=0)
    got = s.sample(x, noise=z)
    assert_close_verbose(got, langevin_reference(model, x, 4, noise=z), atol=1e-6, what=backend)
    assert s.state_dict()["counters"] == {"cpu": 0}


def test_outputs_detached_and_input_untouched_and_flags_restored():
    model = CNNModel(hidden_features=8).train()
    model.cnn_layers[2].bias.requires_grad_(False)
    x = torch.rand(3, 1, 28, 28, requires_grad=True)
    before = x.detach().clone()
    out, traj = LangevinSampler(model, steps=3, backend="eager").sample(x, return_trajectory=True)
    assert not out.requires_grad and out.grad_fn is None and not traj.requires_grad
    assert torch.equal(x.detach(), before) and x.grad is None
    assert model.training
    assert model.cnn_layers[2].bias.requires_grad is False
    assert sum(p.requires_grad for p in model.parameters()) == len(list(model.parameters())) - 1
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize(
    "make_x, match",
    [
        (lambda: torch.zeros(2, 1, 28, 27), r"\(N, 1, 28, 28\)"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.float64), "dtype"),
        (lambda: torch.full((2, 1, 28, 28), float("inf")), "non-finite"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.int32), "floating-point"),
        (lambda: torch.zeros(0, 1, 28, 28), "empty batch"),
        (lambda: [[0.0]], "torch.Tensor"),
        (lambda: torch.zeros(2, 1, 28, 28, device="meta"), "meta device"),  # issue 22: Tensor.item() on meta
        (lambda: torch.zeros(2, 1, 28, 28).to_sparse(), "dense tensor"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.complex64), "floating-point"),
        (lambda: torch.zeros(2, 1, 28, 28, dtype=torch.bool), "floating-point"),
    ],
)
def test_bad_samples_rejected(make_x, match):
    sampler = LangevinSampler(CNNModel(hidden_features=8), steps=2, backend="eager")
    with pytest.raises((ValueError, TypeError), match=match):
        sampler.sample(make_x())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(steps=2.5), "steps must be a positive integer"),
        (dict(step_size=-1.0), "step_size must be > 0"),
        (dict(noise_std=float("inf")), "noise_std must be finite"),
        (dict(grad_clip=0), "grad_clip must be > 0"),
        (dict(clamp=(0.0,)), "clamp must be a pair"),
        (dict(backend="cuda-graph"), "backend must be one of"),
        (dict(precision="fp8"), "precision must be one of"),
        (dict(seed=-1), "seed must be a non-negative integer"),
        (dict(channels_last="yes"), "channels_last must be None"),
    ],
)
def test_bad_settings_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LangevinSampler(CNNModel(hidden_features=8), **kwargs)


def test_model_must_return_one_score_per_sample():
    model = torch.nn.Linear(4, 2)  # (N, 2): not an energy
    with pytest.raises(ValueError, match="one score per sample"):
        LangevinSampler(model, steps=1, backend="eager").sample(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="nn.Module"):
        LangevinSampler(lambda x: x.sum(1))


def test_bad_sample_call_arguments():
    s = LangevinSampler(Quadratic(torch.zeros(4), 1.0), steps=2, backend="eager")
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        s.sample(torch.zeros(2, 4), steps=0)
    with pytest.raises(ValueError, match="noise must have shape"):
        s.sample(torch.zeros(2, 4), noise=torch.zeros(3, 2, 4))


def test_graph_backend_needs_cuda_on_cpu():
    s = LangevinSampler(Quadratic(torch.zeros(4), 1.0), steps=2, backend="graph")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        s.sample(torch.zeros(2, 4))


def test_auto_resolves_per_device():
    assert resolve_backend("auto", torch.device("cpu")) == "compiled"
    if HAS_TRITON:
        assert resolve_backend("auto", torch.device("cuda")) == "graph"


# ------------------------------------------------------------------------------------------ models users write
def _linear_head_cnn():
    """An energy network written the common way: an nn.Sequential ending in Linear(k, 1), returning (N, 1)."""
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 6, 3, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(6 * 14 * 14, 1),
    )


class _WrappedHead(torch.nn.Module):
    """Not a plain layer chain (goes through torch.func), also returning (N, 1)."""

    def __init__(self):
        super().__init__()
        self.body = _linear_head_cnn()

    def forward(self, x):
        return self.body(x) * 1.0


@pytest.mark.slow
@pytest.mark.parametrize("make", [_linear_head_cnn, _WrappedHead], ids=["sequential", "wrapped"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_models_returning_n_by_1_scores_run_on_every_backend(make, backend):
    model = make()
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert model(x).shape == (3, 1)
    check_parity(model, x, backend, steps=5, atol=ATOL["cpu"])


def test_models_returning_other_shapes_are_refused_with_the_shape():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, 1\).*\(2, 3\)"):
        LangevinSampler(model, steps=1, backend="eager").sample(torch.zeros(2, 4))


def test_compiled_gradients_do_not_keep_dropped_models_alive():
    """The per-model compile cache is keyed weakly; its values must not hold their key (models that are not a plain
    chain go through torch.func, whose closure used to capture the model)."""
    import gc
    import weakref

    from ebmfast.energy_grad import _COMPILED

    class Foreign(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 1)

        def forward(self, x):
            return self.lin(x).squeeze(-1) * 2.0

    gc.collect()
    before = len(_COMPILED)  # other tests' models (module fixtures) may still be cached
    refs = []
    for _ in range(6):
        model = Foreign()
        sampler = LangevinSampler(model, steps=2, backend="compiled", compile_kwargs={"backend": "eager"}, seed=0)
        sampler.sample(torch.zeros(2, 4))
        refs.append(weakref.ref(model))
        del model, sampler
    gc.collect()
    assert sum(r() is not None for r in refs) == 0
    assert len(_COMPILED) == before


@pytest.mark.parametrize("backend", ["eager", "fused"])
def test_long_chains_run_in_chunks_that_look_at_the_stop_flag(backend):
    """A chain longer than chunk_steps runs as chunks with the same steps and noise as one chain (bitwise on CPU), asks
    stop_check between chunks, and a stop puts the noise counter back where the call started (issue 22)."""
    torch.manual_seed(0)
    model = MLPEnergy(12)
    x = torch.rand(5, 12) * 2 - 1
    whole = LangevinSampler(model, steps=25, step_size=0.5, backend=backend, seed=3).sample(x)
    chunked = LangevinSampler(model, steps=25, step_size=0.5, backend=backend, seed=3)
    chunked.chunk_steps = 10
    asked = []
    chunked.stop_check = lambda: asked.append(1) and False
    assert torch.equal(chunked.sample(x), whole)
    assert len(asked) == 3  # before each of the chunks of 10, 10 and 5 steps
    assert chunked.state_dict() == {"seed": 3, "counters": {"cpu": 25}}

    calls = iter([False, False, True])
    chunked.stop_check = lambda: next(calls)
    with pytest.raises(StopRequested, match="after 20 of 25"):
        chunked.sample(x)
    assert chunked.state_dict()["counters"] == {"cpu": 25}, "a stopped chain must leave the noise counter alone"
    short = LangevinSampler(model, steps=25, step_size=0.5, backend=backend, seed=3)
    short.stop_check = lambda: pytest.fail("a chain of chunk_steps or fewer steps runs whole")
    short.sample(x, steps=short.chunk_steps)


class _NaNBeyond(torch.nn.Module):
    """f(x) = -||x||^2 / 2, NaN for samples whose first coordinate is above 0.5 (rows 1 and 3 below)."""

    def forward(self, x):
        scale = torch.where(x.flatten(1)[:, 0] > 0.5, float("nan"), 1.0)
        return -0.5 * (x**2).flatten(1).sum(1) * scale


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_energy_is_reported_with_samples_and_step(backend):
    """Issue 22: a model returning NaN gave all-NaN samples and no error although check_finite=True."""
    x = torch.zeros(4, 6)
    x[1, 0] = x[3, 0] = 0.9
    sampler = LangevinSampler(_NaNBeyond(), steps=3, noise_std=0.0, backend=backend, seed=0)
    # the eager backend watches the energy it computes (the step is known); the others check the returned state
    when = "first at step 1 of 3" if backend == "eager" else "after the chain of 3 steps"
    with pytest.raises(NonFiniteError, match=rf"2 of 4 samples \(rows 1, 3\), {when}"):
        sampler.sample(x)
    with pytest.raises(NonFiniteError, match=r"rows 1, 3\), first at step 1 of 3"):
        sampler.sample(x, return_trajectory=True)
    out = LangevinSampler(_NaNBeyond(), steps=3, noise_std=0.0, backend=backend, check_finite=False).sample(x)
    bad = ~torch.isfinite(out).all(1)
    assert bad.tolist() == [False, True, False, True], "a NaN gradient must stay NaN through the clip and clamp"


class _NaNEnergyOnly(torch.nn.Module):
    """f(x) = -||x||^2 / 2, plus a constant NaN for samples whose first coordinate is above 0.5 from the second call
    on: the energy is NaN there but its input gradient stays finite, so the samples do too."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        bad = (x.flatten(1)[:, 0] > 0.5) & (self.calls > 2)  # call 1: the output check; call 2: step 1
        return -0.5 * (x**2).flatten(1).sum(1) + torch.where(bad, float("nan"), 0.0)


def test_a_non_finite_energy_with_a_finite_gradient_is_seen_by_the_eager_backend():
    x = torch.zeros(4, 6)
    x[2, 0] = 0.9
    sampler = LangevinSampler(_NaNEnergyOnly(), steps=3, noise_std=0.0, backend="eager", seed=0)
    with pytest.raises(NonFiniteError, match=r"1 of 4 samples \(rows 2\), first at step 2 of 3"):
        sampler.sample(x)
    assert not sampler.model._forward_hooks, "the energy watch is removed after the chain"
    fine = LangevinSampler(_NaNEnergyOnly(), steps=3, noise_std=0.0, backend="eager", check_finite=False).sample(x)
    assert bool(torch.isfinite(fine).all())


def test_a_nan_gradient_is_not_clipped_to_a_number():
    """The clip and clamp of the update propagate NaN (the fused op's torch code, as the reference)."""
    x = torch.zeros(2, 3)
    g = torch.tensor([[float("nan"), 1.0, -1.0], [0.0, 0.0, 0.0]])
    rng = torch.tensor([0, 0], dtype=torch.int64)
    settings = StepSettings(step_size=1.0, grad_clip=0.03, noise_std=0.0, lo=-1.0, hi=1.0)
    langevin.step_(x, g, rng, settings, noise_index=0, add_noise=False)
    assert torch.isnan(x[0, 0]) and x[0, 1] == -0.03 and x[0, 2] == 0.03 and bool((x[1] == 0).all())
