"""Property-based input validation (hypothesis) over the public API and the CLI.

Every bad input must give a ValueError/TypeError whose message names the parameter; every good input must work and
give a result of the right shape, dtype and range. Never a crash, a hang or a silently wrong result.

Regression tests for bugs this file found (now fixed) are at the bottom; the strategies above them avoid those inputs.
"""

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from ebmfast import LangevinSampler, ReplayBuffer, langevin_reference
from ebmfast.cli import main
from ebmfast.sampler import BACKENDS, PRECISION_MODES
from ebmfast.training.config import TrainConfig

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
FEW = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Quad(nn.Module):
    """f(x) = -scale * |x|^2 per sample: any shape (N, ...) -> (N,); one float32 parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return -self.scale * (x**2).flatten(1).sum(1)


ANY = st.one_of(
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.booleans(),
    st.none(),
    st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
    st.lists(st.integers(-3, 3), max_size=3),
)


# ----------------------------------------------------------------------------------------------- oracles
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _valid_clamp(v):
    try:
        lo, hi = v
    except (TypeError, ValueError):
        return False
    return _is_real(lo) and _is_real(hi) and lo < hi


SAMPLER_ORACLE = {
    "steps": lambda v: _is_int(v) and v >= 1,
    "step_size": lambda v: _is_real(v) and v > 0,
    "noise_std": lambda v: _is_real(v) and v >= 0,
    "grad_clip": lambda v: _is_real(v) and v > 0,
    "clamp": _valid_clamp,
    "backend": lambda v: v in BACKENDS,
    "precision": lambda v: v in PRECISION_MODES,
    "seed": lambda v: v is None or (_is_int(v) and 0 <= v < 2**62),
}


def _expect_named_error(fn, name):
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    assert name in str(info.value), f"error does not name {name!r}: {info.value}"


# ------------------------------------------------------------------------------------------- LangevinSampler
@SETTINGS
@given(name=st.sampled_from(sorted(SAMPLER_ORACLE)), value=ANY)
def test_sampler_constructor(name, value):
    if name == "seed" and _is_int(value) and value >= 2**62:
        value = value % 2**62  # huge seeds: see test_sampler_huge_seed_is_rejected_up_front
    make = lambda: LangevinSampler(Quad(), **{name: value})
    if SAMPLER_ORACLE[name](value):
        s = make()
        if name in ("steps", "step_size", "noise_std", "grad_clip"):
            assert getattr(s, name) == value
    else:
        _expect_named_error(make, name)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool, torch.uint8]


@SETTINGS
@given(
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    poison=st.sampled_from([None, math.nan, math.inf, -math.inf]),
    steps=st.integers(1, 3),
)
def test_sampler_sample_inputs(shape, dtype, poison, steps):
    s = LangevinSampler(Quad(), steps=steps, backend="eager", seed=1)
    x = (torch.rand(shape) * 2 - 1).to(dtype)
    if poison is not None and x.numel() and dtype.is_floating_point:
        x.view(-1)[0] = poison
    run = lambda: s.sample(x)
    if len(shape) < 2 or shape[0] == 0:
        _expect_named_error(run, "x")
    elif not dtype.is_floating_point:
        _expect_named_error(run, "x")
    elif poison is not None and x.numel():
        _expect_named_error(run, "finite")
    elif dtype != torch.float32:
        _expect_named_error(run, "dtype")  # parameters are float32
    else:
        out = run()
        assert out.shape == x.shape and out.dtype == x.dtype and not out.requires_grad
        assert bool(torch.isfinite(out).all())
        if out.numel():
            assert float(out.min()) >= -1 and float(out.max()) <= 1


@FEW
@given(steps=ANY)
def test_sampler_sample_steps(steps):
    s = LangevinSampler(Quad(), steps=2, backend="eager", seed=0)
    x = torch.rand(2, 3)
    if steps is None:  # the sampler's own step count
        assert s.sample(x, return_trajectory=True)[1].shape == (2, 2, 3)
    elif SAMPLER_ORACLE["steps"](steps):
        steps = min(steps, 5)
        out, traj = s.sample(x, steps=steps, return_trajectory=True)
        assert traj.shape == (steps, 2, 3) and torch.equal(traj[-1], out)
    else:
        _expect_named_error(lambda: s.sample(x, steps=steps), "steps")


def test_sampler_rejects_a_model_without_one_score_per_sample():
    s = LangevinSampler(nn.Identity(), steps=1, backend="eager")
    _expect_named_error(lambda: s.sample(torch.rand(3, 4)), "one score per sample")
    with pytest.raises(TypeError, match="nn.Module"):
        LangevinSampler(lambda x: x.sum(1))


# ---------------------------------------------------------------------------------------- langevin_reference
@SETTINGS
@given(name=st.sampled_from(["steps", "step_size", "noise_std", "grad_clip", "clamp"]), value=ANY)
def test_reference_arguments(name, value):
    assume(not (_is_real(value) and abs(value) > 3e38))  # beyond float32: see the regression tests at the bottom
    x = torch.rand(2, 3) * 2 - 1
    kw = {"steps": 2, name: value}
    if name == "steps" and _is_int(value):
        kw["steps"] = value if value < 1 else min(value, 4)
    run = lambda: langevin_reference(Quad(), x, **kw)
    if SAMPLER_ORACLE[name](value):
        out = run()
        # bounds as the float32 tensor holds them (e.g. a subnormal double like 1e-308 is 0.0 in float32)
        lo, hi = (torch.tensor(float(b), dtype=x.dtype).item() for b in kw.get("clamp", (-1.0, 1.0)))
        assert out.shape == x.shape and bool(torch.isfinite(out).all())
        assert float(out.min()) >= lo and float(out.max()) <= hi
    else:
        _expect_named_error(run, name)


@FEW
@given(noise_shape=st.lists(st.integers(1, 4), min_size=1, max_size=4))
def test_reference_noise_shape(noise_shape):
    x = torch.rand(2, 3)
    noise = torch.randn(noise_shape)
    run = lambda: langevin_reference(Quad(), x, steps=2, noise=noise)
    if noise_shape == [2, 2, 3]:
        assert run().shape == x.shape
    else:
        _expect_named_error(run, "noise")


# -------------------------------------------------------------------------------------------- ReplayBuffer
@SETTINGS
@given(
    shape=st.lists(st.integers(-2, 4), min_size=0, max_size=3),
    capacity=st.one_of(st.integers(-3, 40), st.booleans(), st.floats(-2, 40), st.none()),
    fresh=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 2)),
)
def test_buffer_constructor(shape, capacity, fresh):
    make = lambda: ReplayBuffer(tuple(shape), capacity=capacity, fresh_prob=fresh)
    if not shape or any(s <= 0 for s in shape):
        _expect_named_error(make, "sample_shape")
    elif not (_is_int(capacity) and capacity >= 1):
        _expect_named_error(make, "capacity")
    elif not (_is_real(fresh) and 0 <= fresh <= 1):
        _expect_named_error(make, "fresh_prob")
    else:
        b = make()
        assert b.storage.shape == (capacity, *shape)
        assert float(b.storage.min()) >= -1 and float(b.storage.max()) <= 1


@SETTINGS
@given(
    batch=st.one_of(st.integers(-3, 50), st.booleans(), st.floats(-1, 10)),
    push_shape=st.lists(st.integers(0, 5), min_size=1, max_size=3),
    push_dtype=st.sampled_from(DTYPES),
    poison=st.booleans(),
)
def test_buffer_draw_and_push(batch, push_shape, push_dtype, poison):
    b = ReplayBuffer((2, 3), capacity=16, fresh_prob=0.5, generator=torch.Generator().manual_seed(0))
    if _is_int(batch) and batch >= 1:
        out = b.draw(batch)
        assert out.shape == (batch, 2, 3) and out.dtype == torch.float32
        assert float(out.min()) >= -1 and float(out.max()) <= 1
    else:
        _expect_named_error(lambda: b.draw(batch), "batch_size")
    samples = (torch.rand(push_shape) * 2 - 1).to(push_dtype)
    poison = poison and samples.numel() > 0 and push_dtype.is_floating_point
    if poison:
        samples.view(-1)[-1] = math.nan
    before = b.storage.clone()
    push = lambda: b.push(samples)
    if len(push_shape) < 2 or push_shape[0] == 0 or not push_dtype.is_floating_point:
        _expect_named_error(push, "samples")
    elif poison:
        _expect_named_error(push, "finite")
    elif tuple(push_shape[1:]) != (2, 3):
        _expect_named_error(push, "samples must have shape")
    elif push_shape[0] > 16:
        _expect_named_error(push, "capacity")
    else:
        push()
        n = push_shape[0]
        assert torch.equal(b.storage[:n], samples.float()) and int(b.ptr) == n % 16
        return
    assert torch.equal(b.storage, before), "a rejected push changed the buffer"


# ---------------------------------------------------------------------------------------------- TrainConfig
@SETTINGS
@given(name=st.sampled_from(TrainConfig.field_names()), value=ANY)
def test_train_config_fields(name, value):
    try:
        cfg = TrainConfig(**{name: value})
    except (ValueError, TypeError) as exc:
        assert name in str(exc), f"error for {name}={value!r} does not name the field: {exc}"
        return
    assert getattr(cfg, name) == value
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@SETTINGS
@given(name=st.sampled_from(TrainConfig.field_names()), text=st.text(max_size=6))
def test_train_config_parse_value(name, text):
    try:
        value = TrainConfig.parse_value(name, text)
    except ValueError as exc:
        assert name in str(exc)
        return
    try:
        TrainConfig(**{name: value})
    except (ValueError, TypeError) as exc:
        assert name in str(exc)


def test_train_config_rejects_unknown_fields_and_non_dicts():
    _expect_named_error(lambda: TrainConfig.from_dict({"learning_rate": 1e-3}), "learning_rate")
    _expect_named_error(lambda: TrainConfig().replace(epoch=3), "epoch")
    _expect_named_error(lambda: TrainConfig.from_dict([("lr", 1)]), "dict")


# ---------------------------------------------------------------------------------------------------- CLI
BAD_TRAIN = {
    "--epochs": st.integers(-(10**6), 0),
    "--max-iterations": st.integers(-(10**6), 0),
    "--seed": st.integers(-(10**6), -1),
    "--batch-size": st.integers(-(10**6), 0),
    "--hidden": st.one_of(st.integers(-100, 1), st.integers(1, 500).map(lambda v: 2 * v + 1)),
    "--sampler-steps": st.integers(-(10**6), 0),
    "--buffer-size": st.integers(-(10**6), 0),
    "--sample-every": st.integers(-(10**6), -1),
    "--gen-steps": st.integers(-(10**6), 0),
    "--max-recoveries": st.integers(-(10**6), -1),
    "--lr": st.one_of(st.floats(max_value=0.0), st.sampled_from([math.nan, math.inf])),
    "--alpha": st.one_of(st.floats(max_value=-1e-9), st.sampled_from([math.nan, math.inf])),
    "--threads": st.one_of(st.integers(-100, 0), st.integers(1025, 10**6)),
}
FIELD_OF = {
    "--hidden": "hidden_features",
    "--sampler-steps": "sampler_steps",
    "--buffer-size": "buffer_size",
    "--sample-every": "sample_every",
    "--gen-steps": "gen_steps",
    "--max-recoveries": "max_recoveries",
    "--batch-size": "batch_size",
    "--max-iterations": "max_iterations",
}


@st.composite
def bad_train_flag(draw):
    flag = draw(st.sampled_from(sorted(BAD_TRAIN)))
    return flag, draw(BAD_TRAIN[flag])


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


@SETTINGS
@given(flag_value=bad_train_flag())
def test_cli_train_bad_values(flag_value, tmp_path_factory, capsys):
    flag, value = flag_value
    out = tmp_path_factory.mktemp("cli") / "out"
    rc = _exit_code(["train", "--out", str(out), flag, repr(value) if isinstance(value, float) else str(value)])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert FIELD_OF.get(flag, flag.lstrip("-")) in err, err
    assert "Traceback" not in err and not out.exists()


@FEW
@given(
    text=st.text(alphabet="abcxyz.,-e", min_size=1, max_size=5).filter(lambda t: not t.startswith("-")),
    flag=st.sampled_from(["--epochs", "--seed", "--lr", "--batch-size"]),
)
def test_cli_train_non_numbers(text, flag, tmp_path_factory, capsys):
    try:
        float(text)
        return  # a number after all
    except ValueError:
        pass
    out = tmp_path_factory.mktemp("cli") / "out"
    assert _exit_code(["train", "--out", str(out), flag, text]) == 2
    assert "invalid" in capsys.readouterr().err and not out.exists()


@FEW
@given(flag=st.sampled_from(["--n", "--steps", "--seed"]), value=st.integers(-(10**6), 0))
def test_cli_sample_bad_values(flag, value, tmp_path_factory, capsys):
    if flag == "--seed" and value == 0:
        value = -1
    out = tmp_path_factory.mktemp("s") / "g.png"
    rc = _exit_code(["sample", "--checkpoint", "/nonexistent.pt", "--out", str(out), flag, str(value)])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err, err
    assert not out.exists()


# ------------------------------------------------------------------- regressions: bugs found by this file, fixed
def test_sampler_huge_seed_is_rejected_up_front():
    _expect_named_error(lambda: LangevinSampler(Quad(), seed=2**63), "seed")


def test_buffer_float_shape_is_rejected():
    _expect_named_error(lambda: ReplayBuffer((3.5,), capacity=4), "sample_shape")


def test_buffer_text_shape_error_names_the_parameter():
    _expect_named_error(lambda: ReplayBuffer("ab", capacity=4), "sample_shape")


def test_buffer_bool_fresh_prob_is_rejected():
    _expect_named_error(lambda: ReplayBuffer((2,), capacity=4, fresh_prob=True), "fresh_prob")


def test_reference_grad_clip_beyond_float32_is_rejected():
    _expect_named_error(lambda: langevin_reference(Quad(), torch.rand(2, 3), steps=1, grad_clip=1e39), "grad_clip")


def test_reference_step_size_beyond_float32_is_rejected():
    x = torch.rand(2, 3)
    x[0, 0] = 0.0  # Quad's gradient is exactly 0 there
    _expect_named_error(lambda: langevin_reference(Quad(), x, steps=1, step_size=1e39, noise_std=0.0), "step_size")
