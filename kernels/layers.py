"""The energy gradient of a layer chain in Triton: per-layer forward and input-gradient kernels, with the Langevin
update as the epilogue of the first layer's input gradient.

Chain: affine layers A_0 .. A_{m-1} (Conv2d / Linear, geometry in ``kernels/geometry.py``), activation act_i after
A_i, A_{m-1} = Linear(k, 1). With h_0 = x, z_i = A_i(h_i), h_{i+1} = act_i(z_i), f = z_{m-1}:

    forward, i = 0 .. m-2        z_i = A_i(act_{i-1}(z_{i-1}))     (activation applied on load, padding zero after it)
                                 the last one (i = m-2) stores dz_{m-2} = -w_last * act'_{m-2}(z_{m-2}) instead:
                                 d sum(-f) / d h_{m-1} = -w_last, so A_{m-1} never runs
    input gradient, i = m-2 .. 1 dz_{i-1} = (A_i^T dz_i) * act'_{i-1}(z_{i-1})   (in place over z_{i-1})
    input gradient, i = 0        g = A_0^T dz_0, then the Langevin update of x (or g written out)

A residual add (``LayerSpec.res_src = j``, see ``kernels/geometry.py``) adds h_j = act_{j-1}(z_{j-1}) to z_k in layer
k's forward epilogue (from z_{j-1}, still in its scratch), and dz_k (still in layer k's scratch) to layer j's input
gradient in its dz epilogue, before act'_{j-1}.

So a step is 2 (m - 1) launches and one scratch buffer per layer (z_i, later overwritten by dz_i). When A_{m-2} is
a Linear with at most HEAD_MAX_OUT outputs (the seed CNN's 256 -> 64), ``layer_head_kernel`` fuses its forward, dz
and input gradient into one launch (its dz never leaves registers): 2 (m - 1) - 1 launches, 9 for the seed CNN, and
a single launch per step for a one-hidden-layer MLP (the head is then also the first layer). Layouts:
activations are NHWC (N, OH, OW, C) from the first layer to the last; x stays in the user's layout (contiguous NCHW,
or (N, D)): the first layer's gather reads it through NCHW strides and its input-gradient epilogue writes x at NCHW
positions. A Linear after a Flatten reads the NHWC activation in storage order and indexes the weight column in
torch's NCHW flatten order (d = c * H * W + p), so weights are used as they are (in-place updates seen).

Convolution forward: implicit GEMM, rows = output pixels (n, oh, ow), columns = output channels, reduction = taps
(kh, kw) x input-channel blocks, gathered with masks (zero padding); with fewer than 16 channels per tap (``FLAT``,
e.g. the seed CNN's first conv: 1 channel, 25 taps) one loop over (tap, channel) pairs instead. Input gradient: the
transposed convolution as a gather, split by stride phase: input row ih only receives taps kh = ph + SH * j with
ph = (ih + PH) mod SH, from output row oh = (ih + PH - kh) / SH, so each program takes one phase (ph, pw), its rows,
and loops over exactly that phase's taps (a runtime count: phases of a 5-tap kernel at stride 2 have 3 and 2 taps);
no product with an inserted zero is formed. Dense layers are plain GEMMs (reduction over D or C_OUT).

Products: ``tl.dot`` when both the column and reduction blocks are >= 16 (compiled ``tl.dot`` needs every dimension
>= 16), else a broadcast multiply + ``tl.sum``. A conv input gradient with one input channel (a single column, e.g.
the seed CNN's first conv) reduces each input pixel's taps x channels in FMAs into per-row sums with no reduction
across threads in its loop (``fma_scalar``: a 1-D tile of pixels, each pixel's channels unrolled; ``fma_lanes``
under FLAT: per-lane sums, one ``tl.sum`` per tile). ``PREC``: 0 fp32 with exact
fp32 products (``input_precision="ieee"``), 1 TF32 tensor cores, 2 bf16 operands with fp32 accumulation (the chain
state and scratch stay fp32). Under the interpreter, bf16 operands are rounded to nearest-even in fp32 and multiplied
in fp32 (the interpreter neither rounds nor multiplies bf16 correctly); the products are the same numbers.

The tile computations are ``@triton.jit`` device functions (``conv_fwd_tile``, ``dense_fwd_tile``,
``conv_dgrad_tile``, ``dense_dgrad_tile``, ``head_dz_tile``, ``head_dgrad_tile``, ``fwd_epilogue``,
``dgrad_dz_epilogue``, ``langevin_epilogue``, ``activation``, ``activation_masked``, ``activation_grad``, ``mma``,
``fma_lanes``, ``fma_scalar``)
taking tile coordinates and compile-time geometry (activation codes and their float parameters included);
``layer_fwd_kernel``, ``layer_dgrad_kernel`` and ``layer_head_kernel`` only map program ids to tiles, so a
persistent kernel can call the same functions. All addressing is relative to the base pointers and the batch size
passed in (rows n = 0 .. NB-1), so a program that owns a block of samples can run a layer on its block by passing
pointers advanced to the block's first sample, NB / M of the block, and the block's first element index of x as
``langevin_epilogue``'s ``noise_offset`` (keeps the Philox stream). Tile counts per layer:
cdiv(M, BM) x cdiv(columns, BN) (x SH * SW phases for a conv input gradient), M and columns from ``gemm_shape``.
Tile coordinates may be a caller's loop counters (``kernels/persistent.py``): the tiles widen them with ``tl.cast``,
which also takes the plain Python ints such counters are under the interpreter.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import triton
import triton.language as tl

from .geometry import ACT_NONE, LayerSpec, cdiv, decode_geometry, fused_head, residual_reason, residual_sources
from .langevin import grad_step, noise_step

__all__ = [
    "layer_fwd_kernel",
    "layer_dgrad_kernel",
    "layer_head_kernel",
    "TileSettings",
    "tile_settings",
    "fwd_call",
    "dgrad_call",
    "head_call",
    "step_calls",
    "launch_energy_grad",
    "launch_step",
    "MODE_DZ",
    "MODE_GRAD",
    "MODE_STEP",
]

# Read when this module is imported, like @triton.jit reads TRITON_INTERPRET.
_INTERPRETED: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")

MODE_DZ, MODE_GRAD, MODE_STEP = 0, 1, 2  # input-gradient epilogues: dz of the layer below / write g / Langevin step


# ----------------------------------------------------------------------------------------------- elementwise parts
@triton.jit
def _tanh(z):
    """tanh from one exp (``tl`` has no tanh the interpreter also runs); odd-symmetric, |error| ~ 1 ulp of 1."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0.0, -t, t)


@triton.jit
def activation(z, ACT: tl.constexpr, P: tl.constexpr):
    """act(z) for the ``geometry.ACT_*`` codes: 0 identity, 1 Swish/SiLU z * sigmoid(z), 2 tanh, 3 ReLU,
    4 LeakyReLU (slope P), 5 ELU (alpha P), 6 Softplus (beta P, z where beta * z > 20, as torch), 7 GELU
    z * Phi(z) (erf), 8 GELU's tanh approximation, 9 sigmoid. P: the activation's parameter (a float constexpr).
    act(0) = 0 except for Softplus and sigmoid (``activation_masked`` zeroes their padding); NaN stays NaN."""
    if ACT == 1:
        out = z * tl.sigmoid(z)
    elif ACT == 2:
        out = _tanh(z)
    elif ACT == 3:
        out = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)
    elif ACT == 4:
        out = tl.where(z > 0.0, z, z * P)
    elif ACT == 5:
        out = tl.where(z > 0.0, z, P * (tl.exp(tl.minimum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)) - 1.0))
    elif ACT == 6:
        bz = z * P
        out = tl.where(bz > 20.0, z, tl.log(1.0 + tl.exp(tl.minimum(bz, 20.0, propagate_nan=tl.PropagateNan.ALL))) / P)
    elif ACT == 7:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 8:
        out = 0.5 * z * (1.0 + _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z)))
    elif ACT == 9:
        out = tl.sigmoid(z)
    else:
        out = z
    return out


@triton.jit
def activation_masked(z, mask, ACT: tl.constexpr, P: tl.constexpr):
    """act(z) on a masked load (masked elements loaded as 0): zero padding lives in activation space, so where
    act(0) != 0 (Softplus, sigmoid) the masked elements are set back to 0."""
    out = activation(z, ACT, P)
    if ACT == 6 or ACT == 9:
        out = tl.where(mask, out, 0.0)
    return out


@triton.jit
def activation_grad(z, ACT: tl.constexpr, P: tl.constexpr):
    """act'(z), torch's at the kinks: Swish s * (1 + z * (1 - s)) with s = sigmoid(z); tanh 1 - tanh(z)^2; ReLU
    1 for z > 0 else 0; LeakyReLU 1 / P; ELU 1 / P * exp(z) (z <= 0); Softplus sigmoid(P * z) (1 beyond the
    threshold); GELU Phi(z) + z * phi(z); GELU-tanh torch's formula; sigmoid s * (1 - s); identity 1."""
    if ACT == 1:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    elif ACT == 2:
        t = _tanh(z)
        out = 1.0 - t * t
    elif ACT == 3:
        out = tl.where(z <= 0.0, 0.0, 1.0)  # torch: 0 where the output is <= 0, NaN included in "else"
    elif ACT == 4:
        out = tl.where(z > 0.0, 1.0, P)
    elif ACT == 5:
        out = tl.where(z > 0.0, 1.0, P * tl.exp(tl.minimum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)))
    elif ACT == 6:
        bz = z * P
        out = tl.where(bz > 20.0, 1.0, tl.sigmoid(bz))
    elif ACT == 7:
        out = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    elif ACT == 8:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 9:
        s = tl.sigmoid(z)
        out = s * (1.0 - s)
    else:
        out = z * 0.0 + 1.0
    return out


@triton.jit
def _round_bf16(v):
    """fp32 -> nearest-even bf16, kept in fp32 (exact products of two such values fit fp32's mantissa)."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def mma(acc, a, b, USE_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc[BM, BN] += a[BM, BK] @ b[BK, BN] in fp32 accumulation; PREC 0 ieee fp32, 1 tf32, 2 bf16 operands."""
    if USE_DOT:
        if PREC == 0:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        elif PREC == 1:
            acc = tl.dot(a, b, acc, input_precision="tf32")
        else:
            if _INTERPRETED:
                acc = tl.dot(_round_bf16(a), _round_bf16(b), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    else:  # a dimension below 16: broadcast multiply and reduce (fp32 FMAs)
        if PREC == 2:
            a = _round_bf16(a)
            b = _round_bf16(b)
        acc += tl.sum(a[:, :, None] * b[None, :, :], axis=1)
    return acc


@triton.jit
def fma_lanes(acc2, a, b, PREC: tl.constexpr):
    """acc2[BM, BK] += a[BM, BK] * b[BK] elementwise, fp32 FMAs (bf16-rounded operands for PREC 2): a product with
    a single column whose reduction over BK is left to the caller, once per tile (``tl.sum(acc2, axis=1)``), so the
    loop body has loads and FMAs only, no reduction across threads."""
    if PREC == 2:
        a = _round_bf16(a)
        b = _round_bf16(b)
    return acc2 + a * b[None, :]


@triton.jit
def fma_scalar(acc1, a, w, PREC: tl.constexpr):
    """acc1[BM] += a[BM] * w (w a scalar), fp32 FMAs (bf16-rounded operands for PREC 2)."""
    if PREC == 2:
        a = _round_bf16(a)
        w = _round_bf16(w)
    return acc1 + a * w


# ----------------------------------------------------------------------------------------------- forward tiles
@triton.jit
def conv_fwd_tile(
    IN,  # pointer to the layer input: x (NCHW) if IN_NCHW, else the previous layer's z (NHWC)
    WT,  # pointer to the weight, torch layout (C_OUT, C_IN, KH, KW), contiguous
    BIAS,  # pointer to the bias (C_OUT,), read if HAS_BIAS
    pid_m,  # row tile: output pixels pid_m * BM .. + BM of (n, oh, ow)
    pid_n,  # column tile: output channels pid_n * BN .. + BN
    M,  # number of rows: batch * OH * OW
    C_IN: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    C_OUT: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    IN_NCHW: tl.constexpr,
    IN_ACT: tl.constexpr,
    IN_ACT_P: tl.constexpr,  # IN_ACT's parameter (float)
    HAS_BIAS: tl.constexpr,
    FLAT: tl.constexpr,  # reduce over (tap, channel) pairs in one loop (few input channels)
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """z tile [BM, BN] = bias + sum over taps and input channels of act(input) * weight. Returns
    (acc, offs_m, offs_n, mask_m, mask_n)."""
    offs_m = tl.cast(pid_m, tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT:  # few input channels: one reduction over r = (kh * KW + kw) * C_IN + ci, gathered per element
        KTOT: tl.constexpr = KH * KW * C_IN
        for k0 in range(0, KTOT, BK):
            r = k0 + tl.arange(0, BK)
            mk = r < KTOT
            ci = r % C_IN
            rt = r // C_IN  # tap index kh * KW + kw
            kw = rt % KW
            kh = rt // KW
            ih = oh[:, None] * SH - PH + kh[None, :]
            iw = ow[:, None] * SW - PW + kw[None, :]
            ok = (mask_m[:, None] & mk[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            if IN_NCHW:
                addr = n[:, None] * (C_IN * H * W) + ci[None, :] * (H * W) + ih * W + iw
            else:
                addr = ((n[:, None] * H + ih) * W + iw) * C_IN + ci[None, :]
            a = tl.load(IN + addr, mask=ok, other=0.0)
            a = activation_masked(a, ok, IN_ACT, IN_ACT_P)  # padding stays zero
            b = tl.load(
                WT + (offs_n[None, :] * KTOT + (ci * (KH * KW) + kh * KW + kw)[:, None]),
                mask=mk[:, None] & mask_n[None, :],
                other=0.0,
            )
            acc = mma(acc, a, b, USE_DOT, PREC)
    else:  # taps outside, input-channel blocks inside: row validity and addresses are per row
        for kh in range(KH):
            ih = oh * SH - PH + kh
            ok_h = mask_m & (ih >= 0) & (ih < H)
            for kw in range(KW):
                iw = ow * SW - PW + kw
                ok = ok_h & (iw >= 0) & (iw < W)
                if IN_NCHW:
                    row = n * (C_IN * H * W) + ih * W + iw
                    cstride = H * W
                else:
                    row = ((n * H + ih) * W + iw) * C_IN
                    cstride = 1
                for c0 in range(0, C_IN, BK):
                    ci = c0 + tl.arange(0, BK)
                    mk = ci < C_IN
                    ok_a = ok[:, None] & mk[None, :]
                    a = tl.load(IN + (row[:, None] + ci[None, :] * cstride), mask=ok_a, other=0.0)
                    a = activation_masked(a, ok_a, IN_ACT, IN_ACT_P)
                    b = tl.load(
                        WT + (offs_n[None, :] * (C_IN * KH * KW) + ci[:, None] * (KH * KW) + (kh * KW + kw)),
                        mask=mk[:, None] & mask_n[None, :],
                        other=0.0,
                    )
                    acc = mma(acc, a, b, USE_DOT, PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0)[None, :]
    return acc, offs_m, offs_n, mask_m, mask_n


@triton.jit
def dense_fwd_tile(
    IN,  # pointer to the layer input, (N, C_IN * H * W) in storage order (NCHW if IN_NCHW, else NHWC)
    WT,  # pointer to the weight (C_OUT, D), columns in torch's NCHW flatten order
    BIAS,  # pointer to the bias (C_OUT,), read if HAS_BIAS
    pid_m,  # row tile: samples pid_m * BM .. + BM
    pid_n,  # column tile: outputs pid_n * BN .. + BN
    M,  # number of rows: batch
    C_IN: tl.constexpr,
    HW: tl.constexpr,  # H * W of the flattened map (1 for a 2-D input)
    C_OUT: tl.constexpr,
    IN_NCHW: tl.constexpr,
    IN_ACT: tl.constexpr,
    IN_ACT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Linear tile [BM, BN]: reads the input contiguously (storage order j) and the weight at column
    d(j) = (j % C_IN) * HW + j // C_IN for an NHWC input (torch's flatten order). Returns like conv_fwd_tile."""
    D: tl.constexpr = C_IN * HW
    offs_m = tl.cast(pid_m, tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_m = offs_m < M
    mask_n = offs_n < C_OUT
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, D, BK):
        j = k0 + tl.arange(0, BK)
        mk = j < D
        ok_a = mask_m[:, None] & mk[None, :]
        a = tl.load(IN + (offs_m[:, None] * D + j[None, :]), mask=ok_a, other=0.0)
        a = activation_masked(a, ok_a, IN_ACT, IN_ACT_P)
        if IN_NCHW:
            col = j
        else:
            col = (j % C_IN) * HW + j // C_IN
        b = tl.load(WT + (offs_n[None, :] * D + col[:, None]), mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = mma(acc, a, b, USE_DOT, PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=mask_n, other=0.0)[None, :]
    return acc, offs_m, offs_n, mask_m, mask_n


@triton.jit
def fwd_epilogue(
    OUT,  # pointer to the layer output (N, OH, OW, C_OUT): z, or dz if EMIT_DZ
    WLAST,  # pointer to the final Linear(k, 1)'s weight (k,), k = C_OUT * OHW, read if EMIT_DZ
    RES,  # pointer to z_{j-1} of the residual's source (same storage as OUT), read if HAS_RES
    acc,  # z tile [BM, BN]
    offs_m,  # rows (n, oh, ow) of the tile, int64
    offs_n,  # output channels of the tile
    mask_m,  # rows in range
    mask_n,  # channels in range
    C_OUT: tl.constexpr,
    OHW: tl.constexpr,  # OH * OW
    OUT_ACT: tl.constexpr,  # activation after this layer
    OUT_ACT_P: tl.constexpr,  # its parameter (float)
    EMIT_DZ: tl.constexpr,  # this layer feeds the final Linear(k, 1): store dz = -w_last[d] * act'(z)
    HAS_RES: tl.constexpr,  # residual add: z += h_j = RES_ACT(z_{j-1}) before the activation
    RES_ACT: tl.constexpr,  # the activation that made h_j (layer j's input activation)
    RES_ACT_P: tl.constexpr,  # its parameter (float)
):
    """Stores z (NHWC), or for the layer before the final linear dz = d sum(-f) / dz directly; with a residual
    add, z includes h_j."""
    addr = offs_m[:, None] * C_OUT + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RES:
        acc += activation_masked(tl.load(RES + addr, mask=mask, other=0.0), mask, RES_ACT, RES_ACT_P)
    if EMIT_DZ:
        p = offs_m % OHW  # flatten index of (c, p) in torch's NCHW order: c * OHW + p
        wl = tl.load(WLAST + (offs_n[None, :] * OHW + p[:, None]), mask=mask, other=0.0)
        val = -wl
        if OUT_ACT != 0:
            val = val * activation_grad(acc, OUT_ACT, OUT_ACT_P)
    else:
        val = acc
    tl.store(OUT + addr, val, mask=mask)


# ----------------------------------------------------------------------------------------------- input-gradient tiles
@triton.jit
def conv_dgrad_tile(
    DZ,  # pointer to dz of this layer's output, NHWC (N, OH, OW, C_OUT)
    WT,  # pointer to the weight (C_OUT, C_IN, KH, KW), contiguous
    pid_m,  # row tile within the phase: input pixels (n, ah, aw) with ih = ih0 + SH * ah, iw = iw0 + SW * aw
    pid_n,  # column tile: input channels pid_n * BN .. + BN
    phase,  # stride phase ph * SW + pw, ph = (ih + PH) mod SH
    NB,  # batch size
    C_IN: tl.constexpr,
    H: tl.constexpr,
    W: tl.constexpr,
    C_OUT: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    OUT_NCHW: tl.constexpr,  # address the result in NCHW (the chain state x) instead of NHWC
    FLAT: tl.constexpr,  # reduce over (tap, channel) pairs in one loop
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Input-gradient tile [BM, BN] = sum over this phase's taps and output channels of dz * weight (the
    transposed convolution). Returns (acc, addr, mask): element addresses (int64) in the output layout."""
    CH: tl.constexpr = (H + SH - 1) // SH  # rows per phase (the largest phase; others mask the last one)
    CW: tl.constexpr = (W + SW - 1) // SW
    ph = phase // SW
    pw = phase % SW
    ih0 = (ph + SH - PH % SH) % SH  # first input row of the phase: (ih0 + PH) mod SH == ph
    iw0 = (pw + SW - PW % SW) % SW
    th = (KH - ph + SH - 1) // SH  # taps of this phase: kh = ph + SH * j, j < th (0 if ph >= KH)
    tw = (KW - pw + SW - 1) // SW
    offs_m = tl.cast(pid_m, tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    aw = offs_m % CW
    t = offs_m // CW
    ah = t % CH
    n = t // CH
    ih = ih0 + SH * ah
    iw = iw0 + SW * aw
    mask_m = (n < NB) & (ih < H) & (iw < W)
    ohb = (ih + PH - ph) // SH  # exact, non-negative: output row of tap j = 0
    owb = (iw + PW - pw) // SW
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < C_IN
    # One input channel (BN = 1, e.g. the first conv on grey images): FMAs into per-row sums, no reduction across
    # threads per step. FLAT: per (row, reduction lane) partial sums over every step, summed over the lanes once at
    # the end (``fma_lanes``); taps x channels: a 1-D row accumulator, each row's channels unrolled (``fma_scalar``).
    COLUMN: tl.constexpr = BN == 1 and not USE_DOT
    if COLUMN:
        if FLAT:
            acc2 = tl.zeros((BM, BK), dtype=tl.float32)
        else:
            acc1 = tl.zeros((BM,), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    if FLAT:  # one reduction over r = (jh * tw + jw) * C_OUT + co, this phase's taps only
        ktot = th * tw * C_OUT
        for k0 in range(0, ktot, BK):
            r = k0 + tl.arange(0, BK)
            mk = r < ktot
            co = r % C_OUT
            rt = r // C_OUT  # tap index jh * tw + jw within the phase
            jw = rt % tw  # tw >= 1 whenever the loop runs
            jh = rt // tw
            oh = ohb[:, None] - jh[None, :]
            ow = owb[:, None] - jw[None, :]
            ok = (mask_m[:, None] & mk[None, :]) & ((oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))
            a = tl.load(DZ + (((n[:, None] * OH + oh) * OW + ow) * C_OUT + co[None, :]), mask=ok, other=0.0)
            tap = (ph + SH * jh) * KW + (pw + SW * jw)
            w_off = co * (C_IN * KH * KW) + tap
            if COLUMN:
                b1 = tl.load(WT + (w_off + offs_n * (KH * KW)), mask=mk & mask_n, other=0.0)
                acc2 = fma_lanes(acc2, a, b1, PREC)
            else:
                b = tl.load(
                    WT + (w_off[:, None] + offs_n[None, :] * (KH * KW)), mask=mk[:, None] & mask_n[None, :], other=0.0
                )
                acc = mma(acc, a, b, USE_DOT, PREC)
    else:  # taps outside, output-channel blocks inside: row validity and addresses are per row
        for jh in range(0, th):
            oh = ohb - jh
            ok_h = mask_m & (oh >= 0) & (oh < OH)
            kh = ph + SH * jh
            for jw in range(0, tw):
                ow = owb - jw
                ok = ok_h & (ow >= 0) & (ow < OW)
                kw = pw + SW * jw
                row = ((n * OH + oh) * OW + ow) * C_OUT
                if COLUMN:  # each row's C_OUT channels one by one: 1-D loads and FMAs, all in the rows' layout
                    w_tap = WT + (pid_n * (KH * KW) + kh * KW + kw)
                    for co in tl.static_range(C_OUT):
                        a1 = tl.load(DZ + (row + co), mask=ok, other=0.0)
                        acc1 = fma_scalar(acc1, a1, tl.load(w_tap + co * (C_IN * KH * KW)), PREC)
                else:
                    for c0 in range(0, C_OUT, BK):
                        co = c0 + tl.arange(0, BK)
                        mk = co < C_OUT
                        a = tl.load(DZ + (row[:, None] + co[None, :]), mask=ok[:, None] & mk[None, :], other=0.0)
                        b = tl.load(
                            WT + (co[:, None] * (C_IN * KH * KW) + offs_n[None, :] * (KH * KW) + (kh * KW + kw)),
                            mask=mk[:, None] & mask_n[None, :],
                            other=0.0,
                        )
                        acc = mma(acc, a, b, USE_DOT, PREC)
    if COLUMN:
        if FLAT:
            acc = tl.sum(acc2, axis=1)[:, None]
        else:
            acc = acc1[:, None]
    if OUT_NCHW:
        addr = n[:, None] * (C_IN * H * W) + offs_n[None, :] * (H * W) + (ih * W + iw)[:, None]
    else:
        addr = ((n * H + ih) * W + iw)[:, None] * C_IN + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    return acc, addr, mask


@triton.jit
def dense_dgrad_tile(
    DZ,  # pointer to dz of this layer's output, (N, C_OUT)
    WT,  # pointer to the weight (C_OUT, D), columns in torch's NCHW flatten order
    pid_m,  # row tile: samples pid_m * BM .. + BM
    pid_n,  # column tile: input elements j (storage order) pid_n * BN .. + BN
    NB,  # batch size
    C_IN: tl.constexpr,
    HW: tl.constexpr,
    C_OUT: tl.constexpr,
    IN_NCHW: tl.constexpr,  # the input is stored in torch's flatten order (x, or a 1x1 map)
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """Input-gradient tile of a Linear: dz @ W at storage positions j (weight column d(j)). Returns (acc, addr,
    mask) with addr = n * D + j, the element's position in the input tensor (x's contiguous order if IN_NCHW)."""
    D: tl.constexpr = C_IN * HW
    offs_m = tl.cast(pid_m, tl.int64) * BM + tl.arange(0, BM).to(tl.int64)
    mask_m = offs_m < NB
    j = pid_n * BN + tl.arange(0, BN)
    mask_n = j < D
    if IN_NCHW:
        col = j
    else:
        col = (j % C_IN) * HW + j // C_IN
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for c0 in range(0, C_OUT, BK):
        co = c0 + tl.arange(0, BK)
        mk = co < C_OUT
        a = tl.load(DZ + (offs_m[:, None] * C_OUT + co[None, :]), mask=mask_m[:, None] & mk[None, :], other=0.0)
        b = tl.load(WT + (co[:, None] * D + col[None, :]), mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = mma(acc, a, b, USE_DOT, PREC)
    addr = offs_m[:, None] * D + j[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    return acc, addr, mask


@triton.jit
def head_dz_tile(
    IN,  # pointer to the layer input, (N, C_IN * HW) in storage order
    WT,  # pointer to the weight (C_OUT, D), columns in torch's NCHW flatten order
    BIAS,  # pointer to the bias (C_OUT,), read if HAS_BIAS
    WLAST,  # pointer to the final Linear(C_OUT, 1)'s weight (C_OUT,)
    pid_m,  # row tile: samples pid_m * BM .. + BM
    M,  # batch size
    C_IN: tl.constexpr,
    HW: tl.constexpr,
    C_OUT: tl.constexpr,  # <= BN: one tile holds every output
    IN_NCHW: tl.constexpr,
    IN_ACT: tl.constexpr,
    IN_ACT_P: tl.constexpr,
    OUT_ACT: tl.constexpr,  # activation between this layer and the final Linear
    OUT_ACT_P: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """The linear head's dz tile [BM, BN], kept in registers: z = this layer's forward (all outputs), then
    dz = -w_last * act'(z); zero outside the batch and beyond C_OUT. Returns (dz, offs_m, mask_m)."""
    acc, offs_m, offs_n, mask_m, mask_n = dense_fwd_tile(
        IN, WT, BIAS, pid_m, 0, M, C_IN, HW, C_OUT, IN_NCHW, IN_ACT, IN_ACT_P, HAS_BIAS, PREC, USE_DOT, BM, BN, BK
    )
    wl = tl.load(WLAST + offs_n, mask=mask_n, other=0.0)
    dz = acc * 0.0 - wl[None, :]
    if OUT_ACT != 0:
        dz = dz * activation_grad(acc, OUT_ACT, OUT_ACT_P)
    dz = tl.where(mask_m[:, None] & mask_n[None, :], dz, 0.0)
    return dz, offs_m, mask_m


@triton.jit
def head_dgrad_tile(
    dz,  # the head's dz tile [BM, BN] (head_dz_tile)
    WT,  # pointer to the head's weight (C_OUT, D)
    offs_m,  # the tile's samples (int64)
    mask_m,  # samples in range
    pid_j,  # column tile: input elements j (storage order) pid_j * BJ .. + BJ
    C_IN: tl.constexpr,
    HW: tl.constexpr,
    C_OUT: tl.constexpr,
    IN_NCHW: tl.constexpr,
    PREC: tl.constexpr,
    USE_DOT: tl.constexpr,  # tl.dot for dz @ W (BN, BJ >= 16)
    BM: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
):
    """Input-gradient tile [BM, BJ] of the linear head from its dz in registers: dz @ W[:, d(j)]. Returns
    (acc, addr, mask) like dense_dgrad_tile."""
    D: tl.constexpr = C_IN * HW
    co = tl.arange(0, BN)
    j = pid_j * BJ + tl.arange(0, BJ)
    mask_j = j < D
    if IN_NCHW:
        col = j
    else:
        col = (j % C_IN) * HW + j // C_IN
    b = tl.load(WT + (co[:, None] * D + col[None, :]), mask=(co < C_OUT)[:, None] & mask_j[None, :], other=0.0)
    acc = mma(tl.zeros((BM, BJ), dtype=tl.float32), dz, b, USE_DOT, PREC)
    addr = offs_m[:, None] * D + j[None, :]
    mask = mask_m[:, None] & mask_j[None, :]
    return acc, addr, mask


@triton.jit
def dgrad_dz_epilogue(
    OUT,  # pointer to the layer below's scratch: holds z there, receives dz (same positions, in place)
    RES,  # pointer to dz_k of the layer k that adds this layer's input (same storage as OUT), read if HAS_RES
    acc,  # input-gradient tile d sum(-f) / d act(z)
    addr,  # element addresses of the tile (int64)
    mask,  # elements in range
    IN_ACT: tl.constexpr,  # the activation between the layer below and this one
    IN_ACT_P: tl.constexpr,  # its parameter (float)
    HAS_RES: tl.constexpr,  # this layer's input feeds a residual add: its gradient gains dz_k
):
    """dz = (acc [+ dz_k]) * act'(z), over z in place (each element is read and written by this program only)."""
    if HAS_RES:
        acc += tl.load(RES + addr, mask=mask, other=0.0)
    if IN_ACT != 0:
        z = tl.load(OUT + addr, mask=mask, other=0.0)
        acc = acc * activation_grad(z, IN_ACT, IN_ACT_P)
    tl.store(OUT + addr, acc, mask=mask)


@triton.jit
def langevin_epilogue(
    X,  # pointer to the chain state x (contiguous; addr is the element index), updated in place
    Z,  # pointer to supplied standard-normal noise shaped like x (read if NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] on the device: (philox seed, stream counter)
    g,  # energy-gradient tile g = d sum(-f) / dx, fp32
    addr,  # element indices of the tile relative to X (int64)
    mask,  # elements in range
    noise_offset,  # index of X[0] in the whole chain state: the Philox element index is noise_offset + addr
    step_size,  # gradient step size (fp32)
    grad_clip,  # gradient clip bound (fp32)
    noise_std,  # standard deviation of the added noise (fp32)
    lo,  # lower clamp bound (fp32)
    hi,  # upper clamp bound (fp32)
    noise_index,  # the stream counter used is RNG[1] + noise_index
    ADD_NOISE: tl.constexpr,  # then add the next step's noise and clamp
    NOISE_FROM_INPUT: tl.constexpr,  # take z from Z instead of generating it
):
    """``langevin_step_kernel``'s arithmetic on one tile: clip, step, clamp, then noise and clamp. A caller that
    runs a block of samples with X advanced to the block passes the block's first element index as noise_offset
    (the per-layer kernels pass 0), so the noise stays the published stream."""
    x = tl.load(X + addr, mask=mask, other=0.0).to(tl.float32)
    x = grad_step(x, g, step_size, grad_clip, lo, hi)
    if ADD_NOISE:
        x = noise_step(x, Z, RNG, addr, addr + noise_offset, mask, noise_index, noise_std, lo, hi, NOISE_FROM_INPUT)
    tl.store(X + addr, x.to(X.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def layer_fwd_kernel(
    IN,  # pointer to the layer input: x (user layout) for the first layer, else the previous layer's z (NHWC)
    WT,  # pointer to the weight, torch layout, contiguous
    BIAS,  # pointer to the bias (read if HAS_BIAS)
    OUT,  # pointer to this layer's scratch (N, OH, OW, C_OUT): receives z, or dz if EMIT_DZ
    WLAST,  # pointer to the final Linear(k, 1)'s weight (read if EMIT_DZ)
    RES,  # pointer to the residual source's z_{j-1} (read if HAS_RES)
    M,  # GEMM rows: batch * OH * OW (batch for a dense layer)
    C_IN: tl.constexpr,  # input channels (dense: channels of the flattened map, or D for a 2-D input)
    H: tl.constexpr,  # input height
    W: tl.constexpr,  # input width
    C_OUT: tl.constexpr,  # output channels / features
    OH: tl.constexpr,  # output height (1 for dense)
    OW: tl.constexpr,  # output width (1 for dense)
    KH: tl.constexpr,  # kernel height
    KW: tl.constexpr,  # kernel width
    SH: tl.constexpr,  # stride (rows)
    SW: tl.constexpr,  # stride (columns)
    PH: tl.constexpr,  # zero padding (rows)
    PW: tl.constexpr,  # zero padding (columns)
    DENSE: tl.constexpr,  # Linear (kernel = whole input map) instead of Conv2d
    IN_NCHW: tl.constexpr,  # the input is in torch's NCHW order (the chain state)
    IN_ACT: tl.constexpr,  # activation applied to the input on load
    IN_ACT_P: tl.constexpr,  # its parameter (float)
    OUT_ACT: tl.constexpr,  # activation after this layer (its derivative is used if EMIT_DZ)
    OUT_ACT_P: tl.constexpr,  # its parameter (float)
    HAS_BIAS: tl.constexpr,  # add the bias
    EMIT_DZ: tl.constexpr,  # the next layer is the final Linear(k, 1)
    HAS_RES: tl.constexpr,  # residual add of h_j = RES_ACT(RES) before the activation
    RES_ACT: tl.constexpr,  # the activation that made h_j
    RES_ACT_P: tl.constexpr,  # its parameter (float)
    FLAT: tl.constexpr,  # conv: one reduction loop over (tap, channel) pairs (few input channels)
    PREC: tl.constexpr,  # 0 fp32 (ieee), 1 tf32, 2 bf16 operands
    USE_DOT: tl.constexpr,  # tl.dot (BN, BK >= 16) or multiply-and-sum
    BM: tl.constexpr,  # rows per program
    BN: tl.constexpr,  # output channels per program
    BK: tl.constexpr,  # reduction block
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DENSE:
        acc, offs_m, offs_n, mask_m, mask_n = dense_fwd_tile(
            IN, WT, BIAS, pid_m, pid_n, M, C_IN, H * W, C_OUT, IN_NCHW, IN_ACT, IN_ACT_P, HAS_BIAS, PREC, USE_DOT,
            BM, BN, BK,
        )  # fmt: skip
    else:
        acc, offs_m, offs_n, mask_m, mask_n = conv_fwd_tile(
            IN, WT, BIAS, pid_m, pid_n, M, C_IN, H, W, C_OUT, OH, OW, KH, KW, SH, SW, PH, PW,
            IN_NCHW, IN_ACT, IN_ACT_P, HAS_BIAS, FLAT, PREC, USE_DOT, BM, BN, BK,
        )  # fmt: skip
    fwd_epilogue(
        OUT, WLAST, RES, acc, offs_m, offs_n, mask_m, mask_n, C_OUT, OH * OW, OUT_ACT, OUT_ACT_P, EMIT_DZ, HAS_RES,
        RES_ACT, RES_ACT_P,
    )  # fmt: skip


@triton.jit
def layer_dgrad_kernel(
    DZ,  # pointer to dz of this layer's output (its scratch), NHWC
    WT,  # pointer to the weight, torch layout, contiguous
    OUT,  # pointer to the result: the layer below's scratch (MODE_DZ, in place over its z) or g (MODE_GRAD)
    RES,  # pointer to dz_k of the layer k that adds this layer's input (MODE_DZ with HAS_RES)
    X,  # pointer to the chain state x, updated in place (MODE_STEP)
    Z,  # pointer to supplied noise shaped like x (MODE_STEP with NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] (seed, counter) on the device (MODE_STEP with generated noise)
    NB,  # batch size
    step_size,  # gradient step size (fp32, MODE_STEP)
    grad_clip,  # gradient clip bound (fp32, MODE_STEP)
    noise_std,  # noise standard deviation (fp32, MODE_STEP)
    lo,  # lower clamp bound (fp32, MODE_STEP)
    hi,  # upper clamp bound (fp32, MODE_STEP)
    noise_index,  # stream counter offset: RNG[1] + noise_index (MODE_STEP)
    C_IN: tl.constexpr,  # input channels (dense: channels of the flattened map)
    H: tl.constexpr,  # input height
    W: tl.constexpr,  # input width
    C_OUT: tl.constexpr,  # output channels / features
    OH: tl.constexpr,  # output height
    OW: tl.constexpr,  # output width
    KH: tl.constexpr,  # kernel height
    KW: tl.constexpr,  # kernel width
    SH: tl.constexpr,  # stride (rows)
    SW: tl.constexpr,  # stride (columns)
    PH: tl.constexpr,  # zero padding (rows)
    PW: tl.constexpr,  # zero padding (columns)
    DENSE: tl.constexpr,  # Linear instead of Conv2d
    IN_NCHW: tl.constexpr,  # the input (= the result) is the chain state in torch's NCHW order
    IN_ACT: tl.constexpr,  # activation on this layer's input: its derivative multiplies the result (MODE_DZ)
    IN_ACT_P: tl.constexpr,  # its parameter (float)
    MODE: tl.constexpr,  # 0 dz of the layer below, 1 write g, 2 Langevin update of X
    HAS_RES: tl.constexpr,  # MODE_DZ: this layer's input feeds a residual add (its gradient gains RES)
    ADD_NOISE: tl.constexpr,  # MODE_STEP: add the next step's noise and clamp
    NOISE_FROM_INPUT: tl.constexpr,  # MODE_STEP: noise from Z instead of the Philox stream
    FLAT: tl.constexpr,  # conv: one reduction loop over (tap, channel) pairs of the phase
    PREC: tl.constexpr,  # 0 fp32 (ieee), 1 tf32, 2 bf16 operands
    USE_DOT: tl.constexpr,  # tl.dot (BN, BK >= 16) or multiply-and-sum
    BM: tl.constexpr,  # rows per program
    BN: tl.constexpr,  # input channels / elements per program
    BK: tl.constexpr,  # reduction block (output channels)
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if DENSE:
        acc, addr, mask = dense_dgrad_tile(
            DZ, WT, pid_m, pid_n, NB, C_IN, H * W, C_OUT, IN_NCHW, PREC, USE_DOT, BM, BN, BK
        )
    else:
        acc, addr, mask = conv_dgrad_tile(
            DZ, WT, pid_m, pid_n, tl.program_id(2), NB, C_IN, H, W, C_OUT, OH, OW, KH, KW, SH, SW, PH, PW,
            IN_NCHW, FLAT, PREC, USE_DOT, BM, BN, BK,
        )  # fmt: skip
    if MODE == 0:
        dgrad_dz_epilogue(OUT, RES, acc, addr, mask, IN_ACT, IN_ACT_P, HAS_RES)
    elif MODE == 1:
        tl.store(OUT + addr, acc, mask=mask)
    else:
        langevin_epilogue(
            X, Z, RNG, acc, addr, mask, 0, step_size, grad_clip, noise_std, lo, hi, noise_index, ADD_NOISE,
            NOISE_FROM_INPUT,
        )  # fmt: skip


@triton.jit
def layer_head_kernel(
    IN,  # pointer to the head's input: the previous layer's z (NHWC), or x for a one-layer chain
    WT,  # pointer to the head's weight (C_OUT, D), torch layout
    BIAS,  # pointer to the head's bias (read if HAS_BIAS)
    WLAST,  # pointer to the final Linear(C_OUT, 1)'s weight
    OUT,  # pointer to the result: the layer below's scratch (MODE_DZ, in place over its z) or g (MODE_GRAD)
    X,  # pointer to the chain state x, updated in place (MODE_STEP)
    Z,  # pointer to supplied noise shaped like x (MODE_STEP with NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] (seed, counter) on the device (MODE_STEP with generated noise)
    NB,  # batch size
    step_size,  # gradient step size (fp32, MODE_STEP)
    grad_clip,  # gradient clip bound (fp32, MODE_STEP)
    noise_std,  # noise standard deviation (fp32, MODE_STEP)
    lo,  # lower clamp bound (fp32, MODE_STEP)
    hi,  # upper clamp bound (fp32, MODE_STEP)
    noise_index,  # stream counter offset: RNG[1] + noise_index (MODE_STEP)
    C_IN: tl.constexpr,  # channels of the flattened input map (D for a 2-D input)
    H: tl.constexpr,  # height of the flattened map (1 for 2-D)
    W: tl.constexpr,  # width of the flattened map (1 for 2-D)
    C_OUT: tl.constexpr,  # the head's outputs (<= BN)
    IN_NCHW: tl.constexpr,  # the input is in torch's flatten order (x, or a 1x1 map)
    IN_ACT: tl.constexpr,  # activation on the head's input: applied on load, its derivative on the result
    IN_ACT_P: tl.constexpr,  # its parameter (float)
    OUT_ACT: tl.constexpr,  # activation between the head and the final Linear
    OUT_ACT_P: tl.constexpr,  # its parameter (float)
    HAS_BIAS: tl.constexpr,  # add the bias
    MODE: tl.constexpr,  # 0 dz of the layer below, 1 write g, 2 Langevin update of X
    ADD_NOISE: tl.constexpr,  # MODE_STEP: add the next step's noise and clamp
    NOISE_FROM_INPUT: tl.constexpr,  # MODE_STEP: noise from Z instead of the Philox stream
    PREC: tl.constexpr,  # 0 fp32 (ieee), 1 tf32, 2 bf16 operands
    USE_DOT: tl.constexpr,  # forward product with tl.dot (BN, BK >= 16)
    USE_DOT_B: tl.constexpr,  # backward product with tl.dot (BN, BJ >= 16)
    BM: tl.constexpr,  # samples per program
    BN: tl.constexpr,  # the head's outputs, padded to a power of two
    BK: tl.constexpr,  # forward reduction block
    BJ: tl.constexpr,  # backward column block
):
    """The layer before the final Linear(k, 1), when it is a Linear: its forward, dz, and its input gradient in one
    launch (each program owns BM samples and loops over the input's column tiles)."""
    pid_m = tl.program_id(0)
    dz, offs_m, mask_m = head_dz_tile(
        IN, WT, BIAS, WLAST, pid_m, NB, C_IN, H * W, C_OUT, IN_NCHW, IN_ACT, IN_ACT_P, OUT_ACT, OUT_ACT_P,
        HAS_BIAS, PREC, USE_DOT, BM, BN, BK,
    )  # fmt: skip
    for pid_j in range(0, (C_IN * H * W + BJ - 1) // BJ):
        acc, addr, mask = head_dgrad_tile(
            dz, WT, offs_m, mask_m, pid_j, C_IN, H * W, C_OUT, IN_NCHW, PREC, USE_DOT_B, BM, BN, BJ
        )
        if MODE == 0:
            dgrad_dz_epilogue(OUT, OUT, acc, addr, mask, IN_ACT, IN_ACT_P, False)
        elif MODE == 1:
            tl.store(OUT + addr, acc, mask=mask)
        else:
            langevin_epilogue(
                X, Z, RNG, acc, addr, mask, 0, step_size, grad_clip, noise_std, lo, hi, noise_index, ADD_NOISE,
                NOISE_FROM_INPUT,
            )  # fmt: skip


# ----------------------------------------------------------------------------------------------- launch settings
class TileSettings(NamedTuple):
    bm: int  # GEMM rows per program
    bn: int  # GEMM columns per program
    bk: int  # reduction block
    num_warps: int
    use_dot: bool  # tl.dot (every dimension >= 16) or multiply-and-sum
    flat: bool  # conv: one (tap, channel) reduction loop instead of taps x channel blocks
    bj: int = 0  # head: input-gradient column block
    use_dot_b: bool = False  # head: tl.dot for the input-gradient product


TARGET_PROGRAMS = 264  # two programs per SM of an H100/H200 (132 SMs): rows shrink to 16 before going below this
FILL_PROGRAMS = 132  # an H100/H200's SMs: a grid split along its columns while it stays within one program per SM
SUM_TILE_ELEMENTS = 4096  # multiply-and-sum path: BM * BK * BN products live in registers at once
FLAT_BELOW = 16  # a conv whose reduction has fewer channels per tap than this reduces over (tap, channel) pairs


def _pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def gemm_shape(spec: LayerSpec, batch: int, kind: str) -> tuple[int, int, int, int, int]:
    """(rows, columns, channels per tap of the reduction, taps, phases) of a layer's forward ("fwd") or
    input-gradient ("dgrad") GEMM. Dense layers: one "tap" whose channels are all of D (forward) or C_OUT. Input
    gradient: the taps of the largest stride phase."""
    if spec.dense:
        if kind in ("fwd", "head"):
            return batch, spec.c_out, spec.d_in, 1, 1
        return batch, spec.d_in, spec.c_out, 1, 1
    if kind == "fwd":
        return batch * spec.oh * spec.ow, spec.c_out, spec.c_in, spec.kh * spec.kw, 1
    ch, cw = spec.phase_rows
    taps = cdiv(spec.kh, spec.sh) * cdiv(spec.kw, spec.sw)
    return batch * ch * cw, spec.c_in, spec.c_out, taps, spec.sh * spec.sw


def tile_settings(
    spec: LayerSpec, batch: int, kind: str, interpreted: bool | None = None, min_programs: int = TARGET_PROGRAMS
) -> TileSettings:
    """Every launch setting of the layer kernels, chosen here.

    Compiled (GPU):
    - FLAT (conv): one reduction loop over (tap, channel) pairs when a tap has fewer than 16 channels (the seed
      CNN's first conv: 1 channel, 25 taps -> one K = 25 product instead of 25 rank-1 updates); otherwise taps
      outside and channel blocks inside (cheaper addressing: validity and address per row, not per element).
    - BN: the GEMM's columns rounded up to a power of two, at most 64; BK: the reduction block, at most 32.
    - ``tl.dot`` only when BN and BK are >= 16 (compiled dot needs M, N, K >= 16; BM is always >= 16); otherwise a
      multiply-and-sum with BM * BK * BN <= 4096 products in flight (registers).
    - BM: 64 for dot tiles, halved down to 16 while the grid would have fewer than ``TARGET_PROGRAMS`` programs
      (small batches: more, smaller tiles keep the SMs busy); then BN halved down to 16 while the grid, doubled,
      stays within ``FILL_PROGRAMS`` (one program per SM): a grid that leaves most SMs idle is split along its
      columns (the seed CNN's last conv at batch 128: 128 programs instead of 32); one that already fills the SMs is
      not, since narrower tiles repeat the row addressing and the input loads per column tile. ``min_programs=1``
      keeps the largest tiles (the persistent kernel, whose programs own blocks of samples and loop over their tiles).
    - num_warps: 4 (8 for tiles of 64 x 32 and more: fewer registers per thread; with 4 warps Triton 3.6 spilled in
      a 64 x 32 input-gradient tile).
    Interpreted (CPU tests): the interpreter pays per Triton operation, not per element, so every conv is FLAT and
    tiles are as large as the problem (BM up to 1024, BN up to 128, BK up to 1024): a few programs and loop trips
    per launch. The tile code is the same for every setting; the tests also run the compiled settings under the
    interpreter (``interpreted=False``).
    """
    if interpreted is None:
        interpreted = bool(_INTERPRETED)
    if kind == "head":
        return _head_settings(spec, batch, interpreted, min_programs)
    m, n, k, taps, phases = gemm_shape(spec, batch, kind)
    flat = not spec.dense and (interpreted or k < FLAT_BELOW)
    k_red = k * taps if flat else k
    if interpreted:
        bn, bk = min(_pow2(n), 128), min(_pow2(k_red), 1024)
        use_dot = bn >= 16 and bk >= 16
        cap = (1 << 20) // (bk * bn if not use_dot else max(bk, bn))  # Triton's largest tensor: 2**20 elements
        bm = max(16, min(_pow2(m), 1024, cap))
        return TileSettings(bm, bn, bk, 4, use_dot, flat)
    bn = min(_pow2(n), 64)
    bk = min(_pow2(k_red), 32)
    use_dot = bn >= 16 and bk >= 16
    bm = 64 if use_dot else max(16, min(128, SUM_TILE_ELEMENTS // (bk * bn)))
    while bm > 16 and cdiv(m, bm) * cdiv(n, bn) * phases < min_programs:
        bm //= 2
    while use_dot and bn > 16 and cdiv(m, bm) * cdiv(n, bn // 2) * phases <= min(min_programs, FILL_PROGRAMS):
        bn //= 2
    warps = 8 if bm * bn >= 64 * 32 else 4
    return TileSettings(bm, bn, bk, warps, use_dot, flat)


def _head_settings(spec: LayerSpec, batch: int, interpreted: bool, min_programs: int = TARGET_PROGRAMS) -> TileSettings:
    """The fused head: BN holds every output (<= HEAD_MAX_OUT); BK blocks its forward over D, BJ its input gradient
    over D (64 compiled). Rows as for the other kernels, counting programs = row tiles; 8 warps from 32 x 64 tiles
    on (with 4, Triton 3.6 spilled in the seed CNN's 32 x 64 head)."""
    bn = _pow2(spec.c_out)
    cap_k, cap_j = (1024, 1024) if interpreted else (32, 64)
    bk, bj = min(_pow2(spec.d_in), cap_k), min(_pow2(spec.d_in), cap_j)
    use_dot, use_dot_b = bn >= 16 and bk >= 16, bn >= 16 and bj >= 16
    prod = max(bk * bn if not use_dot else 0, bn * bj if not use_dot_b else 0, 1)
    if interpreted:
        bm = max(16, min(_pow2(batch), 1024, (1 << 20) // max(prod, bn, bk, bj)))
        return TileSettings(bm, bn, bk, 4, use_dot, False, bj, use_dot_b)
    bm = 64 if use_dot and use_dot_b else max(16, min(64, SUM_TILE_ELEMENTS // prod))
    while bm > 16 and cdiv(batch, bm) < min_programs:
        bm //= 2
    warps = 8 if bm * max(bn, bj) >= 64 * 32 else 4
    return TileSettings(bm, bn, bk, warps, use_dot, False, bj, use_dot_b)


# ----------------------------------------------------------------------------------------------- launches
class KernelCall(NamedTuple):
    kernel: object  # the @triton.jit kernel
    grid: tuple[int, int, int]
    args: dict  # every parameter by name, constexprs included
    num_warps: int


def _geometry_args(spec: LayerSpec) -> dict:
    return dict(
        C_IN=spec.c_in, H=spec.h, W=spec.w, C_OUT=spec.c_out, OH=spec.oh, OW=spec.ow, KH=spec.kh, KW=spec.kw,
        SH=spec.sh, SW=spec.sw, PH=spec.ph, PW=spec.pw, DENSE=bool(spec.dense), IN_NCHW=bool(spec.in_nchw),
    )  # fmt: skip


def _act_args(spec: LayerSpec) -> dict:
    return dict(IN_ACT=spec.in_act, IN_ACT_P=spec.in_act_value, OUT_ACT=spec.out_act, OUT_ACT_P=spec.out_act_value)


def fwd_call(
    spec, batch, inp, weight, bias, out, wlast, emit_dz, precision, interpreted=None, *, res=None, res_act=ACT_NONE,
    res_act_p=0.0,
) -> KernelCall:  # fmt: skip
    """The forward launch of one layer: z (or dz if ``emit_dz``) into ``out``; with ``res`` (z_{j-1} of the residual
    source j, made h_j by ``res_act`` with parameter ``res_act_p``) z includes h_j."""
    st = tile_settings(spec, batch, "fwd", interpreted)
    m, n, _, _, _ = gemm_shape(spec, batch, "fwd")
    args = dict(
        IN=inp, WT=weight, BIAS=bias if bias is not None else weight, OUT=out, WLAST=wlast,
        RES=res if res is not None else out, M=m, **_geometry_args(spec), **_act_args(spec),
        HAS_BIAS=bias is not None, EMIT_DZ=bool(emit_dz), HAS_RES=res is not None, RES_ACT=int(res_act),
        RES_ACT_P=float(res_act_p), FLAT=st.flat, PREC=int(precision), USE_DOT=st.use_dot, BM=st.bm, BN=st.bn,
        BK=st.bk,
    )  # fmt: skip
    return KernelCall(layer_fwd_kernel, (cdiv(m, st.bm), cdiv(n, st.bn), 1), args, st.num_warps)


def dgrad_call(
    spec, batch, dz, weight, out, mode, precision, *, x=None, z=None, rng=None, step_size=0.0, grad_clip=0.0,
    noise_std=0.0, lo=0.0, hi=0.0, noise_index=0, add_noise=False, interpreted=None, res=None,
) -> KernelCall:  # fmt: skip
    """The input-gradient launch of one layer: dz of the layer below into ``out`` (MODE_DZ), g into ``out``
    (MODE_GRAD), or the Langevin update of ``x`` (MODE_STEP; ``z`` supplied noise or None for the stream).
    ``res`` (MODE_DZ): dz_k of the layer k whose residual add reads this layer's input."""
    st = tile_settings(spec, batch, "dgrad", interpreted)
    m, n, _, _, phases = gemm_shape(spec, batch, "dgrad")
    anchor = out if out is not None else x  # stand-in for pointers the mode does not read
    step = mode == MODE_STEP
    args = dict(
        DZ=dz, WT=weight, OUT=anchor, RES=res if res is not None else anchor, X=x if x is not None else anchor,
        Z=z if z is not None else anchor, RNG=rng if rng is not None else anchor, NB=batch,
        step_size=float(step_size), grad_clip=float(grad_clip), noise_std=float(noise_std), lo=float(lo),
        hi=float(hi), noise_index=int(noise_index), **_geometry_args(spec), IN_ACT=spec.in_act,
        IN_ACT_P=spec.in_act_value, MODE=int(mode), HAS_RES=res is not None, ADD_NOISE=bool(step and add_noise),
        NOISE_FROM_INPUT=bool(step and add_noise and z is not None), FLAT=st.flat, PREC=int(precision),
        USE_DOT=st.use_dot, BM=st.bm, BN=st.bn, BK=st.bk,
    )  # fmt: skip
    return KernelCall(layer_dgrad_kernel, (cdiv(m, st.bm), cdiv(n, st.bn), phases), args, st.num_warps)


def head_call(
    spec, batch, inp, weight, bias, wlast, out, mode, precision, *, x=None, z=None, rng=None, step_size=0.0,
    grad_clip=0.0, noise_std=0.0, lo=0.0, hi=0.0, noise_index=0, add_noise=False, interpreted=None,
) -> KernelCall:  # fmt: skip
    """The fused head's launch (a Linear before the final Linear(k, 1)): its forward from ``inp``, dz, and the
    input gradient into ``out`` (MODE_DZ / MODE_GRAD) or the Langevin update of ``x`` (MODE_STEP)."""
    st = tile_settings(spec, batch, "head", interpreted)
    anchor = out if out is not None else x
    step = mode == MODE_STEP
    args = dict(
        IN=inp, WT=weight, BIAS=bias if bias is not None else weight, WLAST=wlast, OUT=anchor,
        X=x if x is not None else anchor, Z=z if z is not None else anchor, RNG=rng if rng is not None else anchor,
        NB=batch, step_size=float(step_size), grad_clip=float(grad_clip), noise_std=float(noise_std), lo=float(lo),
        hi=float(hi), noise_index=int(noise_index), C_IN=spec.c_in, H=spec.h, W=spec.w, C_OUT=spec.c_out,
        IN_NCHW=bool(spec.in_nchw), **_act_args(spec), HAS_BIAS=bias is not None,
        MODE=int(mode), ADD_NOISE=bool(step and add_noise), NOISE_FROM_INPUT=bool(step and add_noise and z is not None),
        PREC=int(precision), USE_DOT=st.use_dot, USE_DOT_B=st.use_dot_b, BM=st.bm, BN=st.bn, BK=st.bk, BJ=st.bj,
    )  # fmt: skip
    return KernelCall(layer_head_kernel, (cdiv(batch, st.bm), 1, 1), args, st.num_warps)


def step_calls(
    specs, x, weights, biases, scratch, precision, mode, *, g=None, z=None, rng=None, step_size=0.0, grad_clip=0.0,
    noise_std=0.0, lo=0.0, hi=0.0, noise_index=0, add_noise=False, interpreted=None, fuse_head=None,
) -> list[KernelCall]:  # fmt: skip
    """Every launch of one energy gradient (``mode=MODE_GRAD``, into ``g``) or one Langevin step
    (``mode=MODE_STEP``, on ``x`` in place), in order. ``weights``/``biases``: one per affine layer, the final
    Linear(k, 1) last (its bias unused; read only where ``spec.has_bias``); ``scratch``: one buffer per layer but the
    last, ``scratch[i]`` holding ``batch * spec.d_out`` fp32 values. ``fuse_head`` (default: where
    ``geometry.fused_head``) runs the Linear before the final one as one launch (``layer_head_kernel``)."""
    batch = x.shape[0]
    m = len(specs)
    last = m - 2  # the layer before the final Linear(k, 1)
    head = fused_head(specs) if fuse_head is None else bool(fuse_head) and fused_head(specs)
    wlast = weights[m - 1]

    def bias(i):
        return biases[i] if specs[i].has_bias else None

    final = dict(interpreted=interpreted)  # the launch that ends the step: update of x, or g
    if mode == MODE_STEP:
        final.update(
            x=x, z=z, rng=rng, step_size=step_size, grad_clip=grad_clip, noise_std=noise_std, lo=lo, hi=hi,
            noise_index=noise_index, add_noise=add_noise,
        )  # fmt: skip
    final_out = g if mode == MODE_GRAD else None
    feeds = residual_sources(specs)  # {j: k}: layer k adds layer j's input

    def res_fwd(i):  # the residual source's z_{j-1} and the activation that makes h_j of it
        j = specs[i].res_src
        return {} if j < 0 else dict(res=scratch[j - 1], res_act=specs[j].in_act, res_act_p=specs[j].in_act_value)

    calls = []
    for i in range(last if head else last + 1):
        inp = x if i == 0 else scratch[i - 1]
        calls.append(fwd_call(specs[i], batch, inp, weights[i], bias(i), scratch[i], wlast, i == last, precision,
                              interpreted, **res_fwd(i)))  # fmt: skip
    if head:
        inp = x if last == 0 else scratch[last - 1]
        if last == 0:
            calls.append(head_call(specs[0], batch, inp, weights[0], bias(0), wlast, final_out, mode, precision,
                                   **final))  # fmt: skip
            return calls
        calls.append(head_call(specs[last], batch, inp, weights[last], bias(last), wlast, scratch[last - 1], MODE_DZ,
                               precision, interpreted=interpreted))  # fmt: skip
    for i in range(last - 1 if head else last, 0, -1):
        calls.append(dgrad_call(specs[i], batch, scratch[i], weights[i], scratch[i - 1], MODE_DZ, precision,
                                interpreted=interpreted, res=scratch[feeds[i]] if i in feeds else None))  # fmt: skip
    calls.append(dgrad_call(specs[0], batch, scratch[0], weights[0], final_out, mode, precision, **final))
    return calls


def run_calls(calls, wrap=None) -> None:
    for call in calls:
        kernel = wrap(call.kernel) if wrap is not None else call.kernel
        kernel[call.grid](**call.args, num_warps=call.num_warps)


def check_chain(specs) -> None:
    if len(specs) < 2:
        raise ValueError("a layer program needs at least one Conv2d/Linear before the final Linear(k, 1)")
    if specs[0].in_act != ACT_NONE or not specs[0].in_nchw:
        raise ValueError("the first layer reads the chain state: no activation before it, NCHW input")
    reason = residual_reason(specs)
    if reason is not None:
        raise ValueError(reason)


def launch_energy_grad(x, g, weights, biases, scratch, geometry, precision, wrap=None) -> None:
    """g = grad_x sum(-f(x)) into ``g`` (shaped like x, contiguous)."""
    specs = decode_geometry(geometry)
    check_chain(specs)
    run_calls(step_calls(specs, x, weights, biases, scratch, precision, MODE_GRAD, g=g), wrap)


def launch_step(
    x, z, rng, weights, biases, scratch, geometry, precision, step_size, grad_clip, noise_std, lo, hi, noise_index,
    add_noise, wrap=None,
) -> None:  # fmt: skip
    """One Langevin step tail on ``x`` in place: gradient, clipped step, clamp, then (``add_noise``) noise from
    ``z`` or the stream position ``rng[1] + noise_index``, clamp."""
    specs = decode_geometry(geometry)
    check_chain(specs)
    calls = step_calls(
        specs, x, weights, biases, scratch, precision, MODE_STEP, z=z, rng=rng, step_size=step_size,
        grad_clip=grad_clip, noise_std=noise_std, lo=lo, hi=hi, noise_index=noise_index, add_noise=add_noise,
    )  # fmt: skip
    run_calls(calls, wrap)
