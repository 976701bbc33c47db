"""The layer kernels (kernels/layers.py) and the layer program (ebmfast/layers.py) against torch.

On a CPU-only machine the kernels run under the Triton interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1;
the program's torch ops need EBMFAST_TRITON_ON_CPU=1, set by the ``device`` fixture); on CUDA the same tests
(``device``-marked) run the compiled kernels. The interpreter pays per Triton operation, so sizes stay small and the
interpreter uses its own (largest) tile settings; ``test_*_compiled_settings`` run the GPU's tile settings (BM down
to 16, taps x channel blocks, several programs per phase) under the interpreter too. ``test_hopper_compile``
compiles every specialisation the seed CNN and the test geometries use for sm_90, without a GPU.

Tolerances. References are computed in float64 from the same fp32 inputs. A kernel output is a sum of K fp32
products accumulated in fp32, plus an activation evaluated in fp32 (a few ulp, relative; the kernels' tanh is (1 -
e) / (1 + e) with e = exp(-2|z|), an absolute error ~1 ulp of 1). Its error is bounded by (few + K) * eps * S, where
S is the accumulated magnitude: the same sum over |terms| (for the activation's absolute error, |h| + 1 in place of
|h|); rounding errors of a sum of K terms of random sign grow like sqrt(K) in practice. The tests allow 8 * eps *
sqrt(K) * S elementwise (eps = 2**-23; K = taps x channels). Measured under the interpreter: at most 0.75 * eps *
sqrt(K) * S over every geometry and batch here, i.e. ~10x headroom. tf32 / bf16 operands (fp32 accumulation): each
product is off by at most two operand roundings, so the sum by at most eps * S with eps = 2**-10 (tf32, compiled
only; the interpreter has none) or 2**-8 (bf16); allowed 2 * eps * S, measured <= 0.33 of that bound for bf16. Whole
chains (energy gradient, 60-step trajectories): the sampler's tolerances, 1e-5 on CPU and 1e-4 on CUDA
(tests/test_sampler.py explains them). Measured: seed CNN gradients within 7e-11 (random init, |g| <= 1.3e-4) and
1.6e-9 (briefly trained, |g| <= 6.4e-3) of the float64 chain rule; 60-step trajectories within 1.2e-7 (random) and
3.0e-7 (trained) of the reference fed the same Philox draws; the whole program in bf16 deviates from fp32 by 0.3 %
of max |g|.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_verbose
from torch import nn

from ebmfast import CNNModel, LangevinSampler, Swish, langevin, langevin_reference, ops
from ebmfast.chain import LayerStepper, run_chain_
from ebmfast.energy_grad import program_energy_grad
from ebmfast.kernels.geometry import (
    ACT_ELU,
    ACT_GELU,
    ACT_GELU_TANH,
    ACT_LEAKY_RELU,
    ACT_NAMES,
    ACT_NONE,
    ACT_RELU,
    ACT_SIGMOID,
    ACT_SOFTPLUS,
    ACT_SWISH,
    ACT_TANH,
    LayerSpec,
    decode_geometry,
    encode_geometry,
    float_bits,
    fused_head,
    residual_reason,
)
from ebmfast.layers import LayerProgram, layer_program, plan_layers, unsupported_reason
from ebmfast.recognise import recognise
from ebmfast.reference import StepSettings, energy_grad_reference, sampling_mode

# The whole file is a kernel sweep under the Triton interpreter (minutes on 2 cores): marked slow, so that
# `pytest -m "not slow"` stays quick; tests/test_sampler_kernels.py covers the kernels end to end there.
pytestmark = [pytest.mark.skipif(ops.layer_kernels is None, reason="Triton is not installed"), pytest.mark.slow]

if ops.layer_kernels is not None:
    from ebmfast.kernels import layers as L

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA:
    assert os.environ.get("TRITON_INTERPRET") == "1", "conftest must set TRITON_INTERPRET=1 before the kernels load"

EPS32 = 2.0**-23
CHAIN_ATOL = {"cpu": 1e-5, "cuda": 1e-4}
S, C, SIGMA, LO, HI = 10.0, 0.03, 0.005, -1.0, 1.0
STEP = dict(step_size=S, grad_clip=C, noise_std=SIGMA, lo=LO, hi=HI)
SETTINGS = StepSettings(**STEP)


@pytest.fixture
def device(monkeypatch):
    """CUDA when present, else CPU tensors through the interpreter (the program's ops need EBMFAST_TRITON_ON_CPU)."""
    if not CUDA:
        monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
    return DEVICE


# ------------------------------------------------------------------------------------------------ torch references
NEW_ACTS = [ACT_RELU, ACT_LEAKY_RELU, ACT_ELU, ACT_SOFTPLUS, ACT_GELU, ACT_GELU_TANH, ACT_SIGMOID]
# The parameters the activation tests use; Softplus beta 8 puts torch's threshold (beta * z > 20) at z > 2.5, inside
# the tests' range of pre-activations
ACT_PARAMS = {ACT_LEAKY_RELU: 0.2, ACT_ELU: 0.7, ACT_SOFTPLUS: 8.0}
# Evaluated with an absolute error of about one ulp of 1 (an exp, log or erf of z, or a difference near 1)
ABSOLUTE_ERROR_ACTS = {ACT_TANH, ACT_ELU, ACT_SOFTPLUS, ACT_GELU, ACT_GELU_TANH, ACT_SIGMOID}


def torch_module(act, p=0.0) -> nn.Module:
    """The torch module of an activation code (parameter ``p`` where it has one)."""
    return {
        ACT_NONE: lambda: nn.Identity(),
        ACT_SWISH: lambda: nn.SiLU(),
        ACT_TANH: lambda: nn.Tanh(),
        ACT_RELU: lambda: nn.ReLU(),
        ACT_LEAKY_RELU: lambda: nn.LeakyReLU(p),
        ACT_ELU: lambda: nn.ELU(alpha=p),
        ACT_SOFTPLUS: lambda: nn.Softplus(beta=p),
        ACT_GELU: lambda: nn.GELU(),
        ACT_GELU_TANH: lambda: nn.GELU(approximate="tanh"),
        ACT_SIGMOID: lambda: nn.Sigmoid(),
    }[act]()


def torch_act(z, act, p=0.0):
    return torch_module(act, p)(z)


def torch_act_grad(z, act, p=0.0):
    """act'(z) by torch autograd (torch's values at the kinks)."""
    z = z.detach().requires_grad_(True)
    (d,) = torch.autograd.grad(torch_act(z, act, p).sum(), z)
    return d.detach()


def conv(
    c_in, h, w, c_out, k, s, p, in_act=ACT_NONE, out_act=ACT_NONE, first=False, bias=True, in_p=0.0, out_p=0.0
) -> LayerSpec:
    kh, kw = (k, k) if isinstance(k, int) else k
    sh, sw = (s, s) if isinstance(s, int) else s
    ph, pw = (p, p) if isinstance(p, int) else p
    oh, ow = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    return LayerSpec(
        0, c_in, h, w, c_out, oh, ow, kh, kw, sh, sw, ph, pw, in_act, out_act, int(bias), int(first),
        float_bits(in_p), float_bits(out_p),
    )  # fmt: skip


def dense(c_in, h, w, c_out, in_act=ACT_NONE, out_act=ACT_NONE, first=False, bias=True, in_p=0.0, out_p=0.0):
    return LayerSpec(
        1, c_in, h, w, c_out, 1, 1, h, w, 1, 1, 0, 0, in_act, out_act, int(bias), int(first), float_bits(in_p),
        float_bits(out_p),
    )  # fmt: skip


def to_nchw(t, spec: LayerSpec, batch):
    """A layer input in kernel storage (x: NCHW; else NHWC) as NCHW."""
    if spec.in_nchw:
        return t.view(batch, spec.c_in, spec.h, spec.w)
    return t.view(batch, spec.h, spec.w, spec.c_in).permute(0, 3, 1, 2)


def out_storage(t, spec: LayerSpec):
    """A layer output (N, C_OUT, OH, OW) in kernel storage (NHWC), flat per sample."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1) if t.dim() == 4 else t


def in_storage(t, spec: LayerSpec):
    """An input-sized NCHW tensor in the layer input's storage (NCHW for x, else NHWC)."""
    return t.reshape(t.shape[0], -1) if spec.in_nchw else t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def ref_forward(spec: LayerSpec, h, weight, bias):
    """z = A(h) in float64 (h NCHW, already activated)."""
    if spec.dense:
        return F.linear(h.flatten(1), weight, bias)
    return F.conv2d(h, weight, bias, (spec.sh, spec.sw), (spec.ph, spec.pw))


def ref_input_grad(spec: LayerSpec, dz, weight):
    """A^T dz in float64: dz (N, C_OUT, OH, OW) or (N, C_OUT) -> (N, C_IN, H, W)."""
    if spec.dense:
        return (dz @ weight).view(dz.shape[0], spec.c_in, spec.h, spec.w)
    full = ((spec.oh - 1) * spec.sh - 2 * spec.ph + spec.kh, (spec.ow - 1) * spec.sw - 2 * spec.pw + spec.kw)
    out_pad = (spec.h - full[0], spec.w - full[1])
    return F.conv_transpose2d(dz, weight, None, (spec.sh, spec.sw), (spec.ph, spec.pw), output_padding=out_pad)


def reduction_terms(spec: LayerSpec, kind: str) -> int:
    if spec.dense:
        return spec.d_in if kind == "fwd" else spec.c_out
    taps = spec.kh * spec.kw if kind == "fwd" else math.ceil(spec.kh / spec.sh) * math.ceil(spec.kw / spec.sw)
    return taps * (spec.c_in if kind == "fwd" else spec.c_out)


def assert_within(got, want, scale, k_terms, what, eps=EPS32, factor=8.0, sqrt_k=True):
    """|got - want| <= factor * eps * sqrt(K) * scale elementwise (see the module docstring); NaN never passes."""
    got, want, scale = got.double().cpu(), want.double().cpu(), scale.double().cpu()
    assert not torch.isnan(got).any(), f"{what}: {int(torch.isnan(got).sum())} NaN (unwritten) elements"
    bound = factor * eps * (math.sqrt(k_terms) if sqrt_k else 1.0) * scale + 1e-30
    err = (got - want).abs()
    ratio = (err / bound).max().item()
    if ratio > 1:
        bad = (err > bound).nonzero()[:5].tolist()
        raise AssertionError(
            f"{what}: {int((err > bound).sum())}/{err.numel()} elements beyond {factor} eps sqrt(K) S; worst at "
            f"{ratio:.2f}x the bound, max abs err {err.max().item():.3e}; first bad {bad}"
        )
    return ratio


def layer_tensors(spec: LayerSpec, batch, device, seed):
    gen = torch.Generator().manual_seed(seed)
    fan_in = spec.c_in * spec.kh * spec.kw
    wshape = (spec.c_out, spec.d_in) if spec.dense else (spec.c_out, spec.c_in, spec.kh, spec.kw)
    weight = (torch.rand(wshape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    bias = torch.rand(spec.c_out, generator=gen) * 0.2 - 0.1
    inp = torch.randn(batch, spec.d_in, generator=gen) * 1.5  # x (NCHW) or the previous z (NHWC), per sample
    dz = torch.randn(batch, spec.d_out, generator=gen) * 0.1  # NHWC
    wlast = torch.randn(spec.d_out, generator=gen) * 0.1
    return [t.to(device) for t in (weight, bias, inp, dz, wlast)]


def run_fwd(spec, batch, inp, weight, bias, wlast=None, emit=False, precision=0, interpreted=None):
    out = torch.full((batch, spec.d_out), float("nan"), device=inp.device)  # poisoned: every element must be written
    call = L.fwd_call(
        spec,
        batch,
        inp,
        weight,
        bias if spec.has_bias else None,
        out,
        wlast if wlast is not None else weight,
        emit,
        precision,
        interpreted,
    )
    L.run_calls([call])
    return out


def run_dgrad(spec, batch, dz, weight, zprev=None, precision=0, interpreted=None):
    """MODE_DZ over a copy of zprev (in place) when the layer has an input activation; else MODE_GRAD (poisoned)."""
    if spec.in_act != ACT_NONE:
        out = zprev.clone()
        mode = L.MODE_DZ
    else:
        out = torch.full((batch, spec.d_in), float("nan"), device=dz.device)
        mode = L.MODE_DZ if not spec.in_nchw else L.MODE_GRAD
    L.run_calls([L.dgrad_call(spec, batch, dz, weight, out, mode, precision, interpreted=interpreted)])
    return out


def check_forward(spec, batch, device, seed=0, precision=0, interpreted=None, eps=EPS32, factor=8.0, sqrt_k=True):
    weight, bias, inp, _, _ = layer_tensors(spec, batch, device, seed)
    got = run_fwd(spec, batch, inp, weight, bias, precision=precision, interpreted=interpreted)
    h = to_nchw(inp.double(), spec, batch)
    b = bias.double() if spec.has_bias else None
    act_h = torch_act(h, spec.in_act, spec.in_act_value)
    want = out_storage(ref_forward(spec, act_h, weight.double(), b), spec)
    h_scale = act_h.abs() + (1.0 if spec.in_act in ABSOLUTE_ERROR_ACTS else 0.0)
    scale = out_storage(ref_forward(spec, h_scale, weight.double().abs(), None if b is None else b.abs()), spec)
    return assert_within(
        got,
        want,
        scale,
        reduction_terms(spec, "fwd"),
        f"forward {spec.describe()} b{batch}",
        eps=eps,
        factor=factor,
        sqrt_k=sqrt_k,
    )


def check_input_grad(spec, batch, device, seed=0, precision=0, interpreted=None, eps=EPS32, factor=8.0, sqrt_k=True):
    weight, _, zprev, dz, _ = layer_tensors(spec, batch, device, seed)
    got = run_dgrad(spec, batch, dz, weight, zprev, precision=precision, interpreted=interpreted)
    dz_nchw = dz.double() if spec.dense else dz.double().view(batch, spec.oh, spec.ow, spec.c_out).permute(0, 3, 1, 2)
    acc = ref_input_grad(spec, dz_nchw, weight.double())
    scale = ref_input_grad(spec, dz_nchw.abs(), weight.double().abs())
    if spec.in_act != ACT_NONE:
        d = torch_act_grad(to_nchw(zprev.double(), spec, batch), spec.in_act, spec.in_act_value)
        acc, scale = acc * d, scale * (d.abs() + 1.0)
    return assert_within(
        got,
        in_storage(acc, spec),
        in_storage(scale, spec),
        reduction_terms(spec, "dgrad"),
        f"input gradient {spec.describe()} b{batch}",
        eps=eps,
        factor=factor,
        sqrt_k=sqrt_k,
    )


# ------------------------------------------------------------------------------------------------ geometries
SEED_CONVS = {
    "seed-conv1": conv(1, 28, 28, 16, 5, 2, 4, out_act=ACT_SWISH, first=True),
    "seed-conv2": conv(16, 16, 16, 32, 3, 2, 1, ACT_SWISH, ACT_SWISH),
    "seed-conv3": conv(32, 8, 8, 64, 3, 2, 1, ACT_SWISH, ACT_SWISH),
    "seed-conv4": conv(64, 4, 4, 64, 3, 2, 1, ACT_SWISH, ACT_SWISH),
}
OTHER_CONVS = {
    "k1-s1-p0": conv(5, 9, 9, 7, 1, 1, 0, ACT_TANH),
    "k1-s2-p0 (taps only in phase 0)": conv(6, 9, 10, 12, 1, 2, 0, ACT_SWISH),
    "k1-s3-p1 first": conv(2, 10, 11, 3, 1, 3, 1, first=True),
    "k2-s3-p1 (kernel < stride)": conv(7, 10, 8, 9, 2, 3, 1, ACT_SWISH, ACT_SWISH),
    "k3-s1-p0": conv(20, 7, 6, 24, 3, 1, 0, ACT_SWISH),
    "k3-s3-p2": conv(12, 9, 7, 18, 3, 3, 2, ACT_TANH, ACT_TANH),
    "k5-s2-p2 20x36 first": conv(3, 20, 36, 20, 5, 2, 2, out_act=ACT_TANH, first=True),
    "k5-s1-p4": conv(9, 6, 5, 5, 5, 1, 4, ACT_TANH),
    "k7-s3-p3 3x32x32 first": conv(3, 32, 32, 12, 7, 3, 3, first=True, bias=False),
    "k7-s2-p4": conv(17, 11, 13, 33, 7, 2, 4, ACT_SWISH, ACT_SWISH),
    "k4-s2-p3 c_in 33": conv(33, 6, 7, 18, 4, 2, 3, ACT_SWISH),
    "k3x5-s1x2-p2x0": conv(10, 8, 12, 21, (3, 5), (1, 2), (2, 0), ACT_TANH),
}
DENSES = {
    "seed-linear (after Flatten of 64x2x2)": dense(64, 2, 2, 64, ACT_SWISH, ACT_SWISH),
    "Flatten + Linear first (3x5x4)": dense(3, 5, 4, 10, first=True),
    "Linear on 2-D (37 -> 20)": dense(37, 1, 1, 20, ACT_TANH, bias=False),
    "Linear after 5x3x7 map (105 -> 70)": dense(5, 3, 7, 70, ACT_SWISH),
}
ALL = {**SEED_CONVS, **OTHER_CONVS, **DENSES}
BATCHES = [1, 3, 17]


@pytest.mark.device
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(ALL))
def test_layer_forward_matches_torch(device, name, batch):
    check_forward(ALL[name], batch, device, seed=batch)


@pytest.mark.device
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(ALL))
def test_layer_input_gradient_matches_torch(device, name, batch):
    check_input_grad(ALL[name], batch, device, seed=100 + batch)


# (geometry, batch): the GPU settings make many small programs, which the interpreter runs one by one
COMPILED_CASES = [
    ("seed-conv1", 1),
    ("seed-conv2", 2),
    ("seed-conv3", 3),
    ("seed-conv4", 3),
    ("k4-s2-p3 c_in 33", 2),
    ("k3x5-s1x2-p2x0", 2),
    ("k1-s2-p0 (taps only in phase 0)", 2),
] + [(name, 3) for name in DENSES]


@pytest.mark.device
@pytest.mark.parametrize("name, batch", COMPILED_CASES)
def test_layer_kernels_compiled_settings(device, name, batch):
    """The GPU's tile settings (BM down to 16, taps x channel blocks, several programs and column tiles) on the
    same geometries (under the interpreter on CPU)."""
    spec = ALL[name]
    for kind in ("fwd", "dgrad"):
        assert L.tile_settings(spec, batch, kind, interpreted=False).bm <= 64
    check_forward(spec, batch, device, seed=7, interpreted=False)
    check_input_grad(spec, batch, device, seed=8, interpreted=False)


SINGLE_CHANNEL = {
    "seed-conv1": SEED_CONVS["seed-conv1"],
    "c_out 8 (FLAT on the GPU)": conv(1, 11, 9, 8, 3, 2, 1, first=True),
    "c_out 20, into z": conv(1, 7, 8, 20, 4, 3, 2, ACT_SIGMOID),
}


@pytest.mark.device
@pytest.mark.parametrize("precision", [0, 2], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "name, interpreted",
    [
        ("seed-conv1", None),
        ("c_out 8 (FLAT on the GPU)", None),
        ("c_out 8 (FLAT on the GPU)", False),
        ("c_out 20, into z", None),
        ("c_out 20, into z", False),
    ],  # fmt: skip
)
def test_single_input_channel_input_gradient(device, name, interpreted, precision):
    """The input gradient of a conv with one input channel (one column: FMAs into per-row sums, ``fma_lanes`` /
    ``fma_scalar``) in fp32 and bf16, with the interpreter's tiles (FLAT) and the GPU's (taps x channels, or FLAT
    for fewer than 16 output channels; the seed CNN's first conv with the GPU's tiles is a COMPILED_CASES entry,
    slow under the interpreter in bf16); bounds as in test_layer_kernels_reduced_precision."""
    spec = SINGLE_CHANNEL[name]
    if interpreted is False:
        st = L.tile_settings(spec, 3, "dgrad", interpreted=False)
        assert st.bn == 1 and not st.use_dot and st.flat == (spec.c_out < L.FLAT_BELOW)
    bound = {0: dict(), 2: dict(eps=2.0**-8, factor=2.0, sqrt_k=False)}[precision]
    check_input_grad(spec, 3, device, seed=41, precision=precision, interpreted=interpreted, **bound)


@pytest.mark.device
@pytest.mark.parametrize(
    "spec",
    [
        SEED_CONVS["seed-conv4"],
        DENSES["seed-linear (after Flatten of 64x2x2)"],
        conv(5, 6, 6, 7, 3, 2, 1, ACT_TANH, ACT_TANH),
    ],
    ids=["conv", "dense", "conv-tanh"],
)
def test_forward_emits_dz_for_the_final_linear(device, spec):
    """The layer before Linear(k, 1) stores dz = -w_last[d] * act'(z), d the torch flatten index (c, oh, ow)."""
    batch = 3
    weight, bias, inp, _, wlast = layer_tensors(spec, batch, device, 3)
    got = run_fwd(spec, batch, inp, weight, bias, wlast=wlast, emit=True)
    h = torch_act(to_nchw(inp.double(), spec, batch), spec.in_act, spec.in_act_value)
    z = ref_forward(spec, h, weight.double(), bias.double())
    want = out_storage(
        -wlast.double().view(1, *z.shape[1:]) * torch_act_grad(z, spec.out_act, spec.out_act_value), spec
    )
    assert_close_verbose(got, want, atol=1e-6, what="emitted dz")


@pytest.mark.device
@pytest.mark.parametrize("interpreted", [None, False], ids=["interpreter-tiles", "gpu-tiles"])
@pytest.mark.parametrize("act", NEW_ACTS, ids=ACT_NAMES.get)
def test_activation_layers(device, act, interpreted):
    """Each activation applied on load (forward), its derivative in the dz epilogue (input gradient) and in the
    emitted dz, against torch: a padded conv whose padding must stay zero after the activation (sigmoid(0) and
    softplus(0) are not 0), 16 input channels (the GPU tiles' taps x channel-block path), and a Linear whose
    reduction block is wider than its input (masked columns)."""
    p = ACT_PARAMS.get(act, 0.0)
    batch = 3
    for spec in (
        conv(16, 7, 6, 9, 3, 2, 2, act, act, in_p=p, out_p=p),
        dense(5, 3, 2, 7, act, act, in_p=p, out_p=p),
    ):
        check_forward(spec, batch, device, seed=act, interpreted=interpreted)
        check_input_grad(spec, batch, device, seed=10 + act, interpreted=interpreted)
        weight, bias, inp, _, wlast = layer_tensors(spec, batch, device, 20 + act)
        got = run_fwd(spec, batch, inp, weight, bias, wlast=wlast, emit=True, interpreted=interpreted)
        h = torch_act(to_nchw(inp.double(), spec, batch), act, p)
        z = ref_forward(spec, h, weight.double(), bias.double())
        want = out_storage(-wlast.double().view(1, *z.shape[1:]) * torch_act_grad(z, act, p), spec)
        assert_close_verbose(got, want, atol=1e-6, what=f"emitted dz ({ACT_NAMES[act]}, {spec.describe()})")


@pytest.mark.device
@pytest.mark.parametrize("act", NEW_ACTS, ids=ACT_NAMES.get)
def test_activation_keeps_nan(device, act):
    """act(NaN) = NaN as in torch (no clamp inside an activation may drop it): a NaN input element makes NaN
    exactly the outputs torch makes NaN."""
    p = ACT_PARAMS.get(act, 0.0)
    spec = dense(5, 3, 2, 7, act, act, in_p=p, out_p=p)
    weight, bias, inp, _, _ = layer_tensors(spec, 3, device, 30 + act)
    inp[1, 4] = float("nan")
    got = run_fwd(spec, 3, inp, weight, bias)
    want = ref_forward(spec, torch_act(to_nchw(inp.double(), spec, 3), act, p), weight.double(), bias.double())
    assert want[1].isnan().all() and not want[[0, 2]].isnan().any()
    assert_close_verbose(got, want, atol=1e-5, what=f"{ACT_NAMES[act]} with a NaN input")


@pytest.mark.device
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("name", ["seed-conv2", "k7-s3-p3 3x32x32 first", "seed-linear (after Flatten of 64x2x2)"])
def test_layer_kernels_reduced_precision(device, name, precision):
    """tf32 / bf16 operands, fp32 accumulation: each product is off by at most 2 operand roundings (relative
    2**-8 for bf16, 2**-10 for tf32), so the sum by at most eps * S; allowed 2 * eps * S."""
    prec = {"tf32": 1, "bf16": 2}[precision]
    spec = ALL[name]
    if precision == "tf32" and not CUDA:  # the interpreter has no TF32: exact fp32 products, the fp32 bound
        bound = dict(eps=EPS32, factor=8.0, sqrt_k=True)
    else:
        bound = dict(eps=2.0**-10 if precision == "tf32" else 2.0**-8, factor=2.0, sqrt_k=False)
    fwd = check_forward(spec, 3, device, precision=prec, **bound)
    bwd = check_input_grad(spec, 3, device, precision=prec, **bound)
    print(f"PRECISION layer {name} {precision}: worst error {fwd:.2f} / {bwd:.2f} of the bound (fwd / dgrad)")


# ------------------------------------------------------------------------------------------------ whole programs
def second_chain():
    """3-channel input, 7x7 stride-3 conv, Tanh, channel counts not multiples of 16, SiLU, Identity, two linears."""
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 12, kernel_size=7, stride=3, padding=3),  # 32x32 -> 11x11
        nn.Tanh(),
        nn.Conv2d(12, 20, kernel_size=3, stride=2, padding=0),  # 5x5
        nn.SiLU(),
        nn.Identity(),
        nn.Conv2d(20, 24, kernel_size=2, stride=1, padding=1, bias=False),  # 6x6
        nn.Flatten(),
        nn.Linear(24 * 36, 33),
        Swish(),
        nn.Linear(33, 1),
    )


def mlp_chain():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(23, 40), nn.Tanh(), nn.Linear(40, 19), nn.Linear(19, 1))


def mlp1_chain():
    """One hidden layer on a flattened image: the fused head is the first layer (one launch per step)."""
    torch.manual_seed(5)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 5 * 7, 70), nn.SiLU(), nn.Linear(70, 1))


def act_chain(act):
    """A chain with ``act`` after every hidden layer: a padded stride-2 conv on a 2x9x11 input (16 channels), a
    padded conv (its zero padding lies after the activation), a Linear after a Flatten (the fused head), Linear(k, 1).
    Returns (model, sample shape, specs): the specs are the planner's for the same chain with Tanh in the
    activations' places, given the activation's code and parameter (the planner's own table is its business)."""
    p = ACT_PARAMS.get(act, 0.0)

    def build(make_act):
        torch.manual_seed(21)
        return nn.Sequential(
            nn.Conv2d(2, 16, 5, stride=2, padding=2),  # 9x11 -> 5x6
            make_act(),
            nn.Conv2d(16, 6, 3, stride=1, padding=1),  # 5x6
            make_act(),
            nn.Flatten(),
            nn.Linear(180, 10),
            make_act(),
            nn.Linear(10, 1),
        )

    shape = (2, 9, 11)
    return build(lambda: torch_module(act, p)), shape, with_activation(plan_layers(build(nn.Tanh), shape), act, p)


def with_activation(specs, act, p=0.0, **changes):
    """Planned specs with ``act`` (parameter ``p``) in every place of a Tanh, and ``changes`` {layer: {field:
    value}} applied."""
    bits = float_bits(p)
    out = []
    for i, s in enumerate(specs):
        s = dataclasses.replace(
            s,
            in_act=act if s.in_act == ACT_TANH else s.in_act,
            in_act_param=bits if s.in_act == ACT_TANH else 0,
            out_act=act if s.out_act == ACT_TANH else s.out_act,
            out_act_param=bits if s.out_act == ACT_TANH else 0,
        )
        out.append(dataclasses.replace(s, **changes.get(f"layer{i}", {})))
    return out


def affine_params(model):
    """(weights, biases) of a chain's Conv2d / Linear layers, in order (the final Linear last)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [m.weight.detach() for m in layers], [m.bias.detach() if m.bias is not None else m.weight for m in layers]


def autograd_energy_grad(model, x):
    """g = grad_x sum(-f(x)) by torch autograd, in float64."""
    model64 = copy.deepcopy(model).double()
    x64 = x.detach().double().requires_grad_(True)
    (g,) = torch.autograd.grad(-model64(x64).sum(), x64)
    return g


class ResidualChain(nn.Module):
    """Two residual adds: z_2 = conv_2(h_2) + h_1 (conv maps, from an earlier layer's input) and z_4 = lin_4(h_4) +
    h_4 (flat, the layer before the final Linear adding its own input); ``act`` after every hidden layer."""

    def __init__(self, make_act):
        super().__init__()
        torch.manual_seed(22)
        self.c0 = nn.Conv2d(2, 8, 3, stride=2, padding=1)  # 9x11 -> 5x6
        self.c1 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=1, padding=1)
        self.l3 = nn.Linear(8 * 5 * 6, 10)
        self.l4 = nn.Linear(10, 10)
        self.l5 = nn.Linear(10, 1)
        self.act = make_act()

    def plain(self) -> nn.Sequential:
        """The same layers without the adds (what the planner reads)."""
        return nn.Sequential(self.c0, nn.Tanh(), self.c1, nn.Tanh(), self.c2, nn.Tanh(), nn.Flatten(), self.l3,
                             nn.Tanh(), self.l4, nn.Tanh(), self.l5)  # fmt: skip

    def forward(self, x):
        h1 = self.act(self.c0(x))
        h2 = self.act(self.c1(h1))
        h3 = self.act(self.c2(h2) + h1)
        h4 = self.act(self.l3(h3.flatten(1)))
        return self.l5(self.act(self.l4(h4) + h4)).squeeze(1)


def residual_chain(act):
    """(model, sample shape, specs) of ``ResidualChain`` with ``act``."""
    p = ACT_PARAMS.get(act, 0.0)
    model = ResidualChain(lambda: torch_module(act, p))
    shape = (2, 9, 11)
    specs = with_activation(plan_layers(model.plain(), shape), act, p, layer2={"res_src": 1}, layer4={"res_src": 4})
    return model, shape, specs


@pytest.fixture(scope="module")
def seed_cnns():
    """The seed CNN at random init and after 12 brief CD iterations on digits (eager sampler, 5 steps)."""
    from ebmfast.data import load_mnist5k

    torch.manual_seed(0)
    random = CNNModel()
    trained = copy.deepcopy(random)
    opt = torch.optim.Adam(trained.parameters(), lr=2e-3, betas=(0.0, 0.999))
    images = load_mnist5k().train_images
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        real = images[torch.randint(0, len(images), (16,), generator=gen)]
        fake = langevin_reference(trained, torch.rand(16, 1, 28, 28, generator=gen) * 2 - 1, 5, generator=gen)
        real_out, fake_out = trained(torch.cat([real, fake])).chunk(2)
        loss = 0.1 * (real_out**2 + fake_out**2).mean() + fake_out.mean() - real_out.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = max((a - b).abs().max().item() for a, b in zip(random.parameters(), trained.parameters()))
    assert moved > 1e-3
    return {"random": random, "trained": trained}


def chain_rule(model, x):
    """The chain program's gradient (ebmfast.energy_grad, uncompiled) of the recognised model."""
    program = recognise(model, x)
    return program_energy_grad(program, program.read(model), x)


def frozen(model, device):
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def check_energy_grad(model, x, what, precision="fp32", atol=None):
    program = LayerProgram(model, precision)
    got = program.energy_grad(x)
    want = chain_rule(model, x)
    with sampling_mode(model):
        ref = energy_grad_reference(model, x)
        exact = chain_rule(copy.deepcopy(model).double(), x.double())
    atol = CHAIN_ATOL[x.device.type] * 1e-2 if atol is None else atol  # gradients are ~1e-4: relative ~1e-3 max
    assert_close_verbose(got, want, atol=atol, what=f"{what} vs the chain program")
    assert_close_verbose(got, ref, atol=atol, what=f"{what} vs energy_grad_reference")
    return (got.double() - exact).abs().max().item(), exact.abs().max().item()


@pytest.mark.device
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("weights", ["random", "trained"])
def test_seed_cnn_energy_grad(device, seed_cnns, weights, batch):
    model = frozen(copy.deepcopy(seed_cnns[weights]), device)
    x = (torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch)) * 2 - 1).to(device)
    err, mag = check_energy_grad(model, x, f"seed CNN ({weights}) b{batch}")
    print(f"seed CNN {weights} b{batch}: |g - g_float64| max {err:.2e} (|g| max {mag:.2e})")


@pytest.mark.device
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("arch", ["second", "mlp", "mlp1"])
def test_other_chains_energy_grad(device, arch, batch):
    model = frozen({"second": second_chain, "mlp": mlp_chain, "mlp1": mlp1_chain}[arch](), device)
    shape = {"second": (3, 32, 32), "mlp": (23,), "mlp1": (3, 5, 7)}[arch]
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(batch)) * 2 - 1).to(device)
    check_energy_grad(model, x, f"{arch} chain b{batch}")


@pytest.mark.device
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_reduced_precision_energy_grad_deviation(device, seed_cnns, precision):
    """The whole program in tf32 / bf16 against fp32 (trained seed CNN, batch 3): deviation measured and reported;
    bounded by 5 % of the largest gradient entry (bf16 measured 0.3 % under the interpreter)."""
    model = frozen(copy.deepcopy(seed_cnns["trained"]), device)
    x = (torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(12)) * 2 - 1).to(device)
    ref = LayerProgram(model, "fp32").energy_grad(x)
    got = LayerProgram(model, precision).energy_grad(x)
    dev = (got - ref).abs()
    rel_max, rel_mean = (dev.max() / ref.abs().max()).item(), (dev.mean() / ref.abs().mean()).item()
    print(f"PRECISION layer program {precision} vs fp32 (seed CNN trained, b3): max {rel_max:.2e}, mean {rel_mean:.2e}"
          " relative to |g|")  # fmt: skip
    assert rel_max < 0.05
    if precision == "tf32" and not CUDA:
        assert rel_max < 1e-5  # no TF32 in the interpreter


def program_calls(model, x, mode, **kw):
    """Run one gradient (MODE_GRAD, returns g) or step (MODE_STEP on x) with explicit launch options."""
    program = LayerProgram(model)
    plan = program._plan(x)
    w, b = program._params(plan.chain)
    g = torch.full_like(x, float("nan")) if mode == L.MODE_GRAD else None
    L.run_calls(L.step_calls(plan.specs, x, w, b, plan.scratch, 0, mode, g=g, **kw))
    return g


@pytest.mark.device
@pytest.mark.parametrize("act", NEW_ACTS, ids=ACT_NAMES.get)
def test_activation_chain_energy_grad(device, act):
    """The whole energy gradient of a chain with each activation (fused head, separate launches, the GPU's tiles)
    against torch autograd in float64. Bound: 1e-5 of the largest |g| (fp32 sums of at most a few hundred terms
    through four layers; measured at most 4.2e-7 relative under the interpreter)."""
    model, shape, specs = act_chain(act)
    model = frozen(model, device)
    batch = 3
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(act)) * 2 - 1).to(device)
    want = autograd_energy_grad(model, x)
    weights, biases = affine_params(model)
    scratch = [torch.empty(batch * s.d_out, device=device) for s in specs[:-1]]
    for fuse, interpreted in ((None, None), (False, None), (None, False)):
        g = torch.full_like(x, float("nan"))
        L.run_calls(
            L.step_calls(specs, x, weights, biases, scratch, 0, L.MODE_GRAD, g=g, fuse_head=fuse,
                         interpreted=interpreted)
        )  # fmt: skip
        what = f"{ACT_NAMES[act]} chain (fuse_head={fuse}, interpreted={interpreted})"
        assert_close_verbose(g, want, atol=1e-5 * want.abs().max().item(), what=what)
        print(f"ACTIVATION {what}: max |g - autograd| / max |g| {((g - want).abs().max() / want.abs().max()):.2e}")


@pytest.mark.device
@pytest.mark.parametrize("act", [ACT_SWISH, ACT_SIGMOID], ids=ACT_NAMES.get)
def test_residual_chain_energy_grad(device, act):
    """Residual adds (``res_src``): the energy gradient of ``ResidualChain`` against torch autograd in float64,
    interpreter and GPU tiles; bound as in test_activation_chain_energy_grad. The residual layer before the final
    Linear is not fused (its dz must be stored)."""
    model, shape, specs = residual_chain(act)
    assert not fused_head(specs)
    model = frozen(model, device)
    batch = 3
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(23)) * 2 - 1).to(device)
    want = autograd_energy_grad(model, x)
    weights, biases = affine_params(model)
    scratch = [torch.empty(batch * s.d_out, device=device) for s in specs[:-1]]
    for interpreted in (None, False):
        g = torch.full_like(x, float("nan"))
        L.run_calls(L.step_calls(specs, x, weights, biases, scratch, 0, L.MODE_GRAD, g=g, interpreted=interpreted))
        what = f"residual chain ({ACT_NAMES[act]}, interpreted={interpreted})"
        assert_close_verbose(g, want, atol=1e-5 * want.abs().max().item(), what=what)
        print(f"RESIDUAL {what}: max |g - autograd| / max |g| {((g - want).abs().max() / want.abs().max()):.2e}")
    plain = autograd_energy_grad(frozen(model.plain(), device), x)
    assert (plain - want).abs().max() > 0.1 * want.abs().max()  # the adds matter


def test_residual_reasons():
    """What the kernels refuse, with the reason."""
    _, _, specs = residual_chain(ACT_TANH)
    assert residual_reason(specs) is None

    def reason(**changes):
        return residual_reason(with_activation(specs, ACT_TANH, **changes))

    assert "chain state x" in reason(layer1={"res_src": 0})
    assert "final Linear" in reason(layer5={"res_src": 5})
    assert "1 <= j <= 1" in reason(layer1={"res_src": 2})
    assert "two residual adds" in reason(layer1={"res_src": 1})
    assert "must have the output's shape" in reason(layer3={"res_src": 3})
    with pytest.raises(ValueError, match="chain state x"):
        L.check_chain(with_activation(specs, ACT_TANH, layer1={"res_src": 0}))


@pytest.mark.device
@pytest.mark.parametrize("arch", ["seed", "mlp1"])
def test_fused_head_equals_separate_launches(device, seed_cnns, arch):
    """The fused head (forward, dz, input gradient in one launch) against the separate forward (emitting dz) and
    input-gradient launches; and as the first layer, with the Langevin update as its epilogue."""
    if arch == "seed":
        model, shape = frozen(copy.deepcopy(seed_cnns["trained"]), device), (1, 28, 28)
    else:
        model, shape = frozen(mlp1_chain(), device), (3, 5, 7)
    x = (torch.rand(3, *shape, generator=torch.Generator().manual_seed(13)) * 2 - 1).to(device)
    fused = program_calls(model, x, L.MODE_GRAD, fuse_head=True)
    separate = program_calls(model, x, L.MODE_GRAD, fuse_head=False)
    assert_close_verbose(fused, separate, atol=1e-9, what="fused head vs separate launches")
    rng = torch.tensor([77, 5], dtype=torch.int64, device=device)
    a, b = x.clone(), x.clone()
    step = dict(rng=rng, add_noise=True, noise_index=3, **STEP)
    program_calls(model, a, L.MODE_STEP, fuse_head=True, **step)
    program_calls(model, b, L.MODE_STEP, fuse_head=False, **step)
    assert_close_verbose(a, b, atol=1e-7, what="step with fused head vs separate")


@pytest.mark.device
@pytest.mark.parametrize("arch", ["seed", "second", "mlp1"])
def test_whole_program_with_compiled_settings(device, arch):
    """Every launch of a step with the GPU's tile settings (under the interpreter on CPU), against the chain rule."""
    model, shape, batch = {  # a narrower seed CNN: the GPU settings make many small programs for the interpreter
        "seed": (lambda: CNNModel(hidden_features=16), (1, 28, 28), 2),
        "second": (second_chain, (3, 32, 32), 1),
        "mlp1": (mlp1_chain, (3, 5, 7), 3),
    }[arch]
    model = frozen(model(), device)
    x = (torch.rand(batch, *shape, generator=torch.Generator().manual_seed(14)) * 2 - 1).to(device)
    g = program_calls(model, x, L.MODE_GRAD, interpreted=False)
    assert_close_verbose(g, chain_rule(model, x), atol=1e-7, what=f"{arch} compiled settings")


def run_chain(model, x, steps, device, seed=11, noise=None):
    """The layer program's chain (first noise with the existing op, then fused steps) vs the reference fed the same
    draws (the sampler's noise_stream unless ``noise`` is given)."""
    sampler = LangevinSampler(model, steps=steps, seed=seed)
    z = sampler.noise_stream(x) if noise is None else noise
    rng = sampler.rng_state(x.device)
    program = layer_program(model)
    with sampling_mode(model):
        got = run_chain_(x.clone(), steps, rng, LayerStepper(program, SETTINGS), noise)[0]
    want = langevin_reference(
        model, x, steps, noise=z, **{k: STEP[k] for k in ("step_size", "grad_clip")}, noise_std=SIGMA, clamp=(LO, HI)
    )
    assert torch.equal(rng.cpu(), torch.tensor([seed, 0]))  # the program never advances the counter
    return got, want


@pytest.mark.device
def test_seed_cnn_60_step_trajectory_parity(device, seed_cnns):
    """60 fused steps, noise generated in the kernel from the same Philox stream as noise_stream."""
    model = frozen(copy.deepcopy(seed_cnns["random"]), device)
    x = (torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(3)) * 2 - 1).to(device)
    got, want = run_chain(model, x, 60, device)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="60-step chain (random weights)")
    assert (got - x).abs().max() > 0.05  # the chain moved
    print(f"trajectory: 60 steps, max |layer program - reference| {(got - want).abs().max().item():.2e}")


@pytest.mark.slow
@pytest.mark.device
def test_trained_seed_cnn_60_step_trajectory_parity(device, seed_cnns):
    model = frozen(copy.deepcopy(seed_cnns["trained"]), device)
    x = (torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(4)) * 2 - 1).to(device)
    got, want = run_chain(model, x, 60, device)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="60-step chain (trained weights)")
    print(f"trajectory (trained): 60 steps, max |layer program - reference| {(got - want).abs().max().item():.2e}")


@pytest.mark.device
def test_supplied_noise_and_second_chain(device):
    """Noise from a tensor (parity mode) on the second architecture; its trajectory step by step (the sampler's
    trajectory path: the update without noise, then the noise with the existing op)."""
    model = frozen(second_chain(), device)
    steps = 6
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1).to(device)
    noise = torch.randn(steps, *x.shape, generator=torch.Generator().manual_seed(6)).to(device) * 3
    got, want = run_chain(model, x, steps, device, noise=noise)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="supplied-noise chain")

    program = layer_program(model)
    rng = torch.tensor([5, 0], dtype=torch.int64, device=device)
    y = x.clone()
    _, want_traj = langevin_reference(model, x, steps, noise=noise, return_trajectory=True, clamp=(LO, HI))
    langevin.step_(y, None, rng, SETTINGS, noise_index=0, add_noise=True, z=noise[0])
    for k in range(steps):
        program.step_(y, None, rng, SETTINGS, noise_index=k + 1, add_noise=False)
        assert_close_verbose(y, want_traj[k], atol=CHAIN_ATOL[device], what=f"trajectory step {k}")
        if k < steps - 1:
            langevin.step_(y, None, rng, SETTINGS, noise_index=k + 1, add_noise=True, z=noise[k + 1])


@pytest.mark.device
def test_one_launch_chain_trajectory_parity(device):
    """A one-hidden-layer chain: every step is one launch (the head with the update as its epilogue); 60 steps."""
    model = frozen(mlp1_chain(), device)
    x = (torch.rand(3, 3, 5, 7, generator=torch.Generator().manual_seed(15)) * 2 - 1).to(device)
    got, want = run_chain(model, x, 60, device)
    assert_close_verbose(got, want, atol=CHAIN_ATOL[device], what="60-step one-launch chain")


@pytest.mark.device
def test_step_equals_langevin_step_of_the_gradient(device, seed_cnns):
    """step_ == langevin.step_(x, grad(x), ...) for generated noise, with values at the clamp bounds."""
    model = frozen(copy.deepcopy(seed_cnns["trained"]), device)
    gen = torch.Generator().manual_seed(8)
    x = ((torch.rand(3, 1, 28, 28, generator=gen) * 2.4 - 1.2).clamp(-1, 1)).to(device)
    rng = torch.tensor([987654321, 1 << 33], dtype=torch.int64, device=device)
    got = x.clone()
    layer_program(model).step_(got, None, rng, SETTINGS, noise_index=5, add_noise=True)
    want = x.clone()
    langevin.step_(want, energy_grad_reference(model, x), rng, SETTINGS, noise_index=5, add_noise=True)
    assert_close_verbose(got, want, atol=1e-6, what="step_ vs langevin.step_")


@pytest.mark.device
@pytest.mark.parametrize("poison", ["x", "weight"])
def test_nan_propagates_through_the_update(device, poison):
    """A NaN state element (its sample's gradient is NaN) or a NaN weight (every gradient is NaN) gives NaN out of
    the update epilogue, as the torch reference's clamps do; NaN must not become a clip or clamp bound."""
    model = frozen(mlp_chain(), device)
    x = (torch.rand(3, 23, generator=torch.Generator().manual_seed(15)) * 2 - 1).to(device)
    if poison == "x":
        x[1, 4] = float("nan")
    else:
        with torch.no_grad():
            model[2].weight[3, 5] = float("nan")
    rng = torch.tensor([11, 2], dtype=torch.int64, device=device)
    got = x.clone()
    layer_program(model).step_(got, None, rng, SETTINGS, noise_index=1, add_noise=True)
    want = x.clone()
    with sampling_mode(model):
        langevin.step_(want, energy_grad_reference(model, x), rng, SETTINGS, noise_index=1, add_noise=True)
    assert want.isnan().any(dim=1).tolist() == ([False, True, False] if poison == "x" else [True] * 3)
    assert_close_verbose(got, want, atol=1e-6, what=f"NaN {poison}")


@pytest.mark.device
def test_in_place_weight_updates_are_seen(device):
    model = frozen(second_chain(), device)
    program = layer_program(model)
    x = (torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9)) * 2 - 1).to(device)
    before = program.energy_grad(x)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5).add_(0.01)
    after = program.energy_grad(x)
    assert (after - before).abs().max() > 1e-4
    assert_close_verbose(after, chain_rule(model, x), atol=1e-7, what="after in-place update")
    model[0].weight = nn.Parameter(model[0].weight.detach() * -1.0, requires_grad=False)  # replaced: read per call
    assert_close_verbose(program.energy_grad(x), chain_rule(model, x), atol=1e-7, what="replaced")


# ------------------------------------------------------------------------------------------------ API and checks
def test_launches_per_step_on_the_seed_cnn():
    program = LayerProgram(CNNModel())
    assert program.launches_per_step == 9  # 4 convs x (forward + input gradient) + the fused linear head
    specs = plan_layers(CNNModel(), (1, 28, 28))
    meta = torch.empty((128, 1, 28, 28), device="meta")
    w = [torch.empty(1, device="meta")] * len(specs)
    for fuse, launches in ((None, 9), (False, 10)):
        calls = L.step_calls(specs, meta, w, w, w[:-1], 0, L.MODE_STEP, rng=w[0], add_noise=True, fuse_head=fuse)
        assert len(calls) == launches
    assert [c.kernel.__name__ for c in calls[-6:]] == ["layer_fwd_kernel"] + ["layer_dgrad_kernel"] * 5
    program = LayerProgram(mlp1_chain())
    with pytest.raises(ValueError, match="prepare"):
        program.launches_per_step  # noqa: B018 - no input shape known yet
    program._chain(torch.zeros(2, 3, 5, 7))  # recognised for that shape (no scratch: no kernels needed)
    assert program.launches_per_step == 1  # one hidden layer: the whole step is the head


def test_geometry_round_trip():
    specs = [
        SEED_CONVS["seed-conv1"],
        conv(3, 8, 8, 4, 3, 1, 1, ACT_LEAKY_RELU, ACT_SOFTPLUS, in_p=0.2, out_p=-1.5),
        DENSES["Linear on 2-D (37 -> 20)"],
    ]
    assert list(decode_geometry(encode_geometry(specs))) == specs
    assert specs[1].in_act_value == float(torch.tensor(0.2, dtype=torch.float32)) and specs[1].out_act_value == -1.5
    assert specs[0].in_act_param == specs[0].out_act_param == 0 and specs[0].out_act_value == 0.0
    with pytest.raises(ValueError, match="version"):
        decode_geometry([99, 0])


def test_tile_settings_respect_the_gpu_rules():
    """Compiled tl.dot needs every dimension >= 16; the multiply-and-sum tiles stay register-sized."""
    for spec in ALL.values():
        for batch in (1, 3, 128, 16384):
            for kind in ("fwd", "dgrad"):
                st = L.tile_settings(spec, batch, kind, interpreted=False)
                assert st.bm >= 16 and all(v & (v - 1) == 0 for v in (st.bm, st.bn, st.bk))
                if st.use_dot:
                    assert st.bn >= 16 and st.bk >= 16
                else:
                    assert st.bm * st.bk * st.bn <= max(L.SUM_TILE_ELEMENTS, 16 * st.bk * st.bn)
                assert st.num_warps in (4, 8)


def test_small_batches_split_the_columns_to_fill_the_gpu():
    """At batch 128 the seed CNN's last conv has 32 row tiles of 16: its columns split while the doubled grid stays
    within one program per SM (forward 32 -> 128 programs); its input gradient (128 programs) already fills the SMs
    and keeps its tiles, as do large batches."""
    specs = plan_layers(CNNModel(), (1, 28, 28))
    fwd = L.tile_settings(specs[3], 128, "fwd", interpreted=False)
    assert (fwd.bm, fwd.bn) == (16, 16)
    dgrad = L.tile_settings(specs[3], 128, "dgrad", interpreted=False)
    assert (dgrad.bm, dgrad.bn) == (16, 64)
    assert L.tile_settings(specs[3], 16384, "fwd", interpreted=False).bn == 64
    assert L.tile_settings(specs[3], 128, "fwd", interpreted=False, min_programs=1).bn == 64  # persistent tiles


REASONS = [
    (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Softplus(threshold=10), nn.Flatten(), nn.Linear(4 * 26 * 26, 1)),
        (1, 28, 28),
        "softplus in 1 (Softplus) with threshold 10",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Tanh(), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 1)),
        (1, 28, 28),
        "two activations in a row",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), Swish(), nn.Identity(), Swish(), nn.Flatten(), nn.Linear(2704, 1)),
        (1, 28, 28),
        "two activations in a row",
    ),
    (lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Linear(26, 1)), (1, 28, 28), "linear in 1 (Linear) on a 4-D tensor"),
    (lambda: nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(784, 1)), (1, 28, 28), "before the first"),
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 1)), (1, 28, 28), "at least one Conv2d/Linear"),
    (
        lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.Conv2d(8, 1, 1), nn.Flatten(), nn.Linear(1, 1)),
        (1, 28, 28),
        "Expected 3D (unbatched) or 4D (batched) input to conv2d",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 1)),
        (1, 28, 28),
        "to have 3 channels, but got 1",
    ),
    (
        lambda: nn.Sequential(nn.Conv2d(1, 4, 9), nn.Flatten(), nn.Linear(4, 1)),
        (1, 5, 5),
        "Kernel size can't be greater than actual input size",
    ),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1)), (1, 3, 3), "could not be captured"),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Linear(4, 1)), (3, 10), "linear in 0 (Linear) on a 3-D tensor"),
    (lambda: nn.Sequential(nn.Linear(10, 4), nn.Linear(5, 1)), (10,), "could not be captured"),
    (lambda: CNNModel(), (1, 32, 32), "CNNModel expects images of shape (N, 1, 28, 28)"),
    (
        lambda: nn.Sequential(nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.Flatten(), nn.Linear(2 * 24 * 24, 1)),
        (1, 28, 28),
        "dilation [2, 2]",
    ),
]


@pytest.mark.parametrize("make, shape, match", REASONS, ids=[r[2] for r in REASONS])
def test_unsupported_reasons(make, shape, match):
    reason = unsupported_reason(make(), torch.zeros(2, *shape))
    assert reason is not None and match in reason, reason


def test_unsupported_dtype_device_and_precision(monkeypatch):
    model = CNNModel()
    assert "float32" in unsupported_reason(model, torch.zeros(2, 1, 28, 28, dtype=torch.float64))
    assert "float32" in unsupported_reason(model.double(), torch.zeros(2, 1, 28, 28))
    assert "precision" in unsupported_reason(CNNModel(), torch.zeros(2, 1, 28, 28), precision="fp16")
    if not CUDA:
        monkeypatch.delenv("EBMFAST_TRITON_ON_CPU", raising=False)
        reason = unsupported_reason(CNNModel(), torch.zeros(2, 1, 28, 28))
        assert "CUDA" in reason and "TRITON_INTERPRET" in reason
        with pytest.raises(RuntimeError, match="CUDA"):
            LayerProgram(CNNModel()).energy_grad(torch.zeros(2, 1, 28, 28))
        monkeypatch.setenv("EBMFAST_TRITON_ON_CPU", "1")
        assert unsupported_reason(CNNModel(), torch.zeros(2, 1, 28, 28)) is None
    with pytest.raises(ValueError, match="one score per sample"):
        LayerProgram(nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU())).prepare(torch.zeros(2, 1, 5, 5))


def test_step_argument_checks(device):
    model = frozen(mlp_chain(), device)
    program = layer_program(model)
    x = torch.zeros(2, 23, device=device)
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="g=None"):
        program.step_(x, x, rng, SETTINGS, noise_index=0, add_noise=False)
    with pytest.raises(ValueError, match="rng must be an int64"):
        program.step_(x, None, rng.float(), SETTINGS, noise_index=0, add_noise=False)
    with pytest.raises(ValueError, match="z must be a contiguous tensor shaped like x"):
        program.step_(x, None, rng, SETTINGS, noise_index=0, add_noise=True, z=torch.zeros(3, 23, device=device))
    with pytest.raises(ValueError, match="cannot run this model on x"):
        program.step_(torch.zeros(2, 24, device=device), None, rng, SETTINGS, noise_index=0, add_noise=False)


def test_scratch_is_allocated_once_per_shape(device):
    model = frozen(mlp_chain(), device)
    program = LayerProgram(model)
    x = torch.rand(3, 23, device=device)
    program.prepare(x)
    before = [t.data_ptr() for t in program._plan(x).scratch]
    rng = torch.zeros(2, dtype=torch.int64, device=device)
    program.step_(x, None, rng, SETTINGS, noise_index=1, add_noise=True)
    assert [t.data_ptr() for t in program._plan(x).scratch] == before
    assert len(program._plans) == 1
    program.energy_grad(torch.rand(5, 23, device=device))
    assert len(program._plans) == 2
    held = program.scratch(x)
    assert [t.data_ptr() for t in held] == before
    program.release()
    assert not program._plans


def test_opcheck_layer_ops(device):
    model = frozen(mlp_chain(), device)
    program = LayerProgram(model)
    x = torch.rand(3, 23, device=device)
    plan = program._plan(x)
    w, b = program._params(plan.chain)
    rng = torch.tensor([3, 5], dtype=torch.int64, device=device)
    torch.library.opcheck(
        torch.ops.ebmfast.layers_step_.default,
        (x, None, rng, w, b, plan.scratch, plan.geometry, 0, S, C, SIGMA, LO, HI, 1, True),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.ebmfast.layers_energy_grad.default,
        (x, w, b, plan.scratch, plan.geometry, 0),
        test_utils=("test_schema", "test_faketensor"),
    )


# ------------------------------------------------------------------------------------------------ sm_90 compile
BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    assert "TRITON_INTERPRET" not in os.environ
    import torch
    from ebmfast.kernels import layers as L
    from ebmfast.kernels.geometry import decode_geometry

    sys.path.insert(0, sys.argv[2])  # bench/: the compile tooling
    import kernel_compile as KC

    job = json.loads(sys.argv[1])
    meta = lambda *s, dtype=torch.float32: torch.empty(*s, device="meta", dtype=dtype)
    rng, one = meta(2, dtype=torch.int64), meta(1)
    calls = {}

    def add(call):
        sig, cx = KC.call_signature(call)
        key = (call.kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(cx.items())), call.num_warps)
        calls.setdefault(key, call)

    for geometry, shape, batches in job["chains"]:
        specs = decode_geometry(geometry)
        w = [one] * len(specs)
        for batch in batches:
            x = meta(batch, *shape)
            for prec in job["precisions"]:
                common = dict(rng=rng, interpreted=False)
                for call in L.step_calls(specs, x, w, w, w[:-1], prec, L.MODE_STEP, add_noise=True, **common):
                    add(call)
                add(L.step_calls(specs, x, w, w, w[:-1], prec, L.MODE_STEP, z=x, add_noise=True, **common)[-1])
                add(L.step_calls(specs, x, w, w, w[:-1], prec, L.MODE_STEP, add_noise=False, **common)[-1])
                add(L.step_calls(specs, x, w, w, w[:-1], prec, L.MODE_GRAD, g=x, interpreted=False)[-1])
                for call in L.step_calls(specs, x, w, w, w[:-1], prec, L.MODE_STEP, add_noise=True, fuse_head=False,
                                         **common):
                    add(call)
    for spec in decode_geometry(job["layers"]):  # more test geometries, forward and input gradient, batch 17
        for prec in job["precisions"]:
            add(L.fwd_call(spec, 17, one, one, one, one, one, False, prec, False))
            mode = L.MODE_GRAD if spec.in_nchw else L.MODE_DZ
            add(L.dgrad_call(spec, 17, one, one, one, mode, prec, interpreted=False))
    t0, counts = time.time(), {"fma": 0, "mma": 0, "wgmma": 0}
    for key, call in calls.items():
        k = KC.compile_call(call, capability=90)
        assert k.asm.get("cubin"), key
        ptx = k.asm["ptx"]
        tc = "wgmma" if "wgmma" in ptx else ("mma" if "mma.sync" in ptx else "fma")
        assert dict(key[2])["PREC"] != 0 or tc == "fma", f"fp32 must not use tensor cores: {key}"
        counts[tc] += 1
    print(json.dumps({"compiled": len(calls), "seconds": round(time.time() - t0, 1), **counts}))
    """
)


# A few test geometries beyond the chains' layers: no taps in some phases, kernel < stride, a wide padded kernel,
# a non-square kernel and stride, a first layer on a non-square input, a Linear on 2-D input, a wide Linear.
COMPILE_GEOMETRIES = [
    "k1-s2-p0 (taps only in phase 0)",
    "k2-s3-p1 (kernel < stride)",
    "k7-s2-p4",
    "k3x5-s1x2-p2x0",
    "k5-s2-p2 20x36 first",
    "Linear on 2-D (37 -> 20)",
    "Linear after 5x3x7 map (105 -> 70)",
]


@pytest.mark.slow
def test_hopper_compile():
    """Every kernel specialisation of the seed CNN (batch 1 / 128 / 16384; fused head and separate launches), the
    second and MLP chains and a few more test geometries compiles for sm_90 (PTX and cubin), fp32 and tf32, without
    a GPU: a subprocess with TRITON_INTERPRET unset. fp32 must compile to FMAs (exact products), not tensor-core
    instructions. By default (CI) the seed CNN's specialisations; ``EBMFAST_COMPILE_SWEEP=1`` adds the rest."""
    chains = [
        (CNNModel(), (1, 28, 28), [1, 128, 16384]),
        (second_chain(), (3, 32, 32), [3]),
        (mlp_chain(), (23,), [2]),
        (mlp1_chain(), (3, 5, 7), [3]),
    ]

    sweep = os.environ.get("EBMFAST_COMPILE_SWEEP") == "1"  # every chain and test geometry (minutes when cold)
    if not sweep:  # CI: the seed CNN's specialisations only
        chains = chains[:1]
    job = {
        "chains": [[encode_geometry(plan_layers(m, shape)), shape, batches] for m, shape, batches in chains],
        "layers": encode_geometry([ALL[name] for name in COMPILE_GEOMETRIES] if sweep else []),
        "precisions": [0, 1],
    }
    print(f"HOPPER COMPILE {compile_job(job)}")


def compile_job(job: dict) -> str:
    """Run ``_COMPILE_SCRIPT`` on ``job`` in a subprocess without the interpreter; returns its summary line."""
    import json

    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "EBMFAST_TRITON_ON_CPU")}
    res = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT, json.dumps(job), BENCH_DIR],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stdout.strip()


@pytest.mark.slow
def test_hopper_compile_activations():
    """Every new activation compiles for sm_90 (fp32, the GPU's tiles): on load with its padding zeroed (forward)
    and its derivative (input gradient into the layer below), in a padded conv (taps x channel blocks) and a
    Linear; erf included. And every launch of the residual chain (``ResidualChain``, batch 3)."""
    layers = []
    for act in NEW_ACTS:
        p = ACT_PARAMS.get(act, 0.0)
        layers += [conv(16, 7, 6, 9, 3, 2, 2, act, act, in_p=p, out_p=p), dense(5, 3, 2, 7, act, act, in_p=p, out_p=p)]
    _, shape, specs = residual_chain(ACT_SIGMOID)
    job = {"chains": [[encode_geometry(specs), shape, [3]]], "layers": encode_geometry(layers), "precisions": [0]}
    print(f"HOPPER COMPILE activations {compile_job(job)}")


@pytest.mark.parametrize(
    "module, program",
    [
        ("ebmfast.layers", "LayerProgram(CNNModel()).energy_grad(x)"),
        ("ebmfast.persistent", "PersistentProgram(CNNModel()).prepare(x)"),
    ],
    ids=["layers", "persistent"],
)
def test_without_triton_the_reason_is_given(module, program):
    """No Triton: the planners still import and say why; running a program raises a clear RuntimeError."""
    name = program.split("(")[0]
    code = textwrap.dedent(
        f"""
        import builtins
        real = builtins.__import__
        def block(name, *args, **kwargs):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton missing (simulated)")
            return real(name, *args, **kwargs)
        builtins.__import__ = block
        import torch
        from ebmfast import CNNModel
        from {module} import {name}, unsupported_reason
        x = torch.zeros(2, 1, 28, 28)
        print(unsupported_reason(CNNModel(), x))
        try:
            {program}
        except RuntimeError as exc:
            print("RuntimeError", exc)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "EBMFAST_TRITON_ON_CPU"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert "need Triton" in lines[0] and lines[1].startswith("RuntimeError") and "need Triton" in lines[1], lines
