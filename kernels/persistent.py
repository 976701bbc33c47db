"""One launch per Langevin chain: a persistent Triton kernel that runs all K steps of a layer chain
(``kernels/geometry.py``) without leaving the GPU, built from the layer kernels' device functions
(``kernels/layers.py``).

Each program owns a block of ``BLOCK`` samples at a time and runs the whole chain on it (the fused chain of
``ebmfast/chain.py``)::

    x_b <- clamp(x_b + sigma z_0)                                        (head noise, draw 0)
    for k in 0 .. K-1:
        forward of every layer but the final Linear(k, 1)                (z_i into the program's scratch)
        input gradient back to layer 0                                   (dz_i in place over z_i)
        layer 0's input gradient ends with the update of x_b: clip, step, clamp, and unless k = K-1 the next
        noise (draw k+1) and clamp                                       (``langevin_epilogue``)

with ``tl.debug_barrier()`` (``bar.sync``: all of the program's global writes visible to all its threads) between
phases. Programs loop over blocks ``pid, pid + programs, ...`` (a persistent grid: the scratch is per program, so its
size does not grow with the batch). Chains are independent and the weights are read, never written, so programs never
wait for each other. Weights are read from global memory (L2) at every step: an optimizer's in-place update is seen
by the next call.

Noise is the published stream: draw j of element e (e = index in x's contiguous order) is
``_philox_normal(RNG[0], RNG[1] + j, e)``, the block passing its first element index as the epilogue's
``noise_offset``; or ``NOISE[j]`` (supplied-noise mode). The kernel reads the counter and never advances it: the
caller adds K to ``RNG[1]`` after the call, as for every other backend. ``TRAJ`` (trajectory mode) receives the state
after each full step: there the update and the next noise run as two passes (same arithmetic, same values).

Scratch (fp32, one region per program): for every layer whose output is stored, ``BLOCK`` samples of its output in
NHWC (the layer kernels' layout), one after the other; the fused linear head keeps its output in registers, so it
stores nothing. Seed CNN: 4096 + 2048 + 1024 + 256 = 7424 floats (29,696 bytes) per sample.

The kernel is generated per chain geometry: Python writes a source file that calls the shared device functions
with the geometry and tile sizes as literals (constexpr), into a cache folder, and imports it (Triton reads kernel
source from files). Every layer call is then a plain call with literal arguments, the same for the interpreter and
the compiler; a constexpr-unrolled loop over layer descriptions would need tuples of pointers as kernel arguments
and a per-layer dispatch on constexpr kinds. Generated files are keyed by a hash of their text, written atomically,
and reused across processes. With the GPU's tiles each layer phase is a ``noinline`` device function: with every
phase inlined into one function the seed CNN's kernel spilled 448-1012 bytes per thread (ptxas, sm_90, blocks 1-4,
2-8 warps; presumably values of one phase kept live across the others), with one function per phase none (Triton
3.8). Loop trip counts derive from the batch and the block size, never from the program id (uniform across
programs; the last, ragged block runs its extra tiles fully masked). Compiles for sm_90 with Triton 3.8
(``tests/test_persistent.py::test_hopper_compile``) and 3.6 (the same kernels, compiled by hand with 3.6.0); the CPU
tests need Triton 3.8's interpreter (3.6's cannot take runtime loop bounds with numpy 2).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import NamedTuple

import triton
import triton.language as tl

from .geometry import LayerSpec, cdiv, fused_head, residual_reason, residual_sources
from .langevin import noise_step
from .layers import _INTERPRETED, KernelCall, TileSettings, _pow2, gemm_shape, tile_settings

__all__ = [
    "PROGRAM_SCRATCH_BYTES",
    "L2_SCRATCH_BYTES",
    "PROGRAMS_PER_SM",
    "DEFAULT_SM_COUNT",
    "ChainSettings",
    "scratch_per_sample",
    "scratch_layout",
    "scratch_reason",
    "chain_settings",
    "layer_tiles",
    "chain_source",
    "chain_kernel",
    "chain_call",
    "launch_chain",
    "kernel_cache_dir",
    "block_noise",
    "block_copy",
]

PROGRAM_SCRATCH_BYTES = 256 * 1024  # one program's scratch at most: an H100/H200 SM's L1 + shared memory (256 KB)
L2_SCRATCH_BYTES = 32 * 1024 * 1024  # all programs' scratch together: below the H100/H200 L2 (50 MB), room for weights
PROGRAMS_PER_SM = 2  # programs in flight per SM (one waits at a barrier while the other computes)
DEFAULT_SM_COUNT = 132  # H100/H200 SXM; the planner asks the device when there is one
MAX_BLOCK = 64  # samples per program at most
SCRATCH_ALIGN = 32  # floats (128 bytes): each layer's region and each program's region start on a cache line
ELEMENT_BLOCK = 1024  # elements per pass of the head-noise / trajectory copy loops (compiled)


# ----------------------------------------------------------------------------------------------- device functions
@triton.jit
def block_noise(
    XB,  # pointer to the block's first element of x (updated in place)
    ZB,  # pointer to the block's first element of the supplied draw (read if NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] (philox seed, stream counter)
    noise_offset,  # element index of XB[0] in x (int64): the Philox element index is noise_offset + e
    n_elements,  # elements in the block
    n_max,  # elements in a full block (the loop bound: the same for every program)
    noise_index,  # draw number: the stream counter used is RNG[1] + noise_index
    noise_std,  # standard deviation of the noise (fp32)
    lo,  # lower clamp bound (fp32)
    hi,  # upper clamp bound (fp32)
    NOISE_FROM_INPUT: tl.constexpr,  # z from ZB instead of the stream
    EB: tl.constexpr,  # elements per pass
):
    """x <- clamp(x + noise_std * z, lo, hi) over one block: ``langevin_step_kernel``'s noise half, same arithmetic
    and the same draws."""
    for e0 in range(0, n_max, EB):
        offs = e0 + tl.arange(0, EB)
        mask = offs < n_elements
        x = tl.load(XB + offs, mask=mask, other=0.0).to(tl.float32)
        noise_addr = offs.to(tl.int64) + noise_offset
        x = noise_step(x, ZB, RNG, offs, noise_addr, mask, noise_index, noise_std, lo, hi, NOISE_FROM_INPUT)
        tl.store(XB + offs, x.to(XB.dtype.element_ty), mask=mask)


@triton.jit
def block_copy(
    SRC,  # pointer to the block's first element of x
    DST,  # pointer to the block's first element in the trajectory's step slice
    n_elements,  # elements in the block
    n_max,  # elements in a full block (the loop bound)
    EB: tl.constexpr,  # elements per pass
):
    for e0 in range(0, n_max, EB):
        offs = e0 + tl.arange(0, EB)
        mask = offs < n_elements
        tl.store(DST + offs, tl.load(SRC + offs, mask=mask, other=0.0), mask=mask)


# ----------------------------------------------------------------------------------------------- settings
class ChainSettings(NamedTuple):
    """Launch settings of one chain kernel. Encoded as an int list for the torch op (``encode`` / ``decode``)."""

    block: int  # samples per program (BLOCK)
    num_warps: int
    programs: int  # grid size; programs loop over blocks pid, pid + programs, ...
    gpu_tiles: bool  # the GPU's tile sizes (False: the interpreter's, which are as large as the problem)

    def encode(self) -> list[int]:
        return [self.block, self.num_warps, self.programs, int(self.gpu_tiles)]

    @staticmethod
    def decode(values) -> ChainSettings:
        block, warps, programs, gpu = (int(v) for v in values)
        return ChainSettings(block, warps, programs, bool(gpu))


def _stored_layers(specs) -> list[int]:
    """Indices of the layers whose output lives in scratch: every one before the final Linear(k, 1), except the
    fused head's (kept in registers)."""
    m = len(specs)
    return list(range(m - 2 if fused_head(specs) else m - 1))


def _align(n: int) -> int:
    return cdiv(n, SCRATCH_ALIGN) * SCRATCH_ALIGN


def scratch_per_sample(specs) -> int:
    """fp32 values of scratch one sample needs (its stored activations)."""
    return sum(specs[i].d_out for i in _stored_layers(specs))


def scratch_layout(specs, block: int) -> tuple[dict[int, int], int]:
    """({layer: offset of its region in a program's scratch}, floats per program), for ``block`` samples."""
    offsets, pos = {}, 0
    for i in _stored_layers(specs):
        offsets[i] = pos
        pos += _align(block * specs[i].d_out)
    return offsets, max(pos, SCRATCH_ALIGN)


def scratch_reason(specs) -> str | None:
    """Why the chain's activations do not fit the persistent kernel (None if they do)."""
    need = 4 * scratch_per_sample(specs)
    if need > PROGRAM_SCRATCH_BYTES:
        return (
            f"one sample's activations need {need / 1024:.1f} KiB of scratch, more than the persistent kernel's "
            f"{PROGRAM_SCRATCH_BYTES // 1024} KiB per program (use backend 'triton')"
        )
    return None


def _floor_pow2(n: int) -> int:
    return 1 << (max(1, int(n)).bit_length() - 1)


def chain_settings(
    specs,
    batch: int,
    *,
    interpreted: bool | None = None,
    sm_count: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    programs: int | None = None,
) -> ChainSettings:
    """Every launch setting of the chain kernel for ``batch`` samples, chosen here (a reasoned default until a
    table measured on the GPU replaces it; each can be overridden).

    Compiled (GPU):
    - ``block`` (samples per program): as many as fit both budgets, at most ``MAX_BLOCK``: one program's scratch
      within ``PROGRAM_SCRATCH_BYTES`` (an SM's L1), and the scratch of all ``sm_count * PROGRAMS_PER_SM`` programs
      in flight within ``L2_SCRATCH_BYTES``; more samples per program read the weights (from L2) once for more
      samples. Then halved while the batch gives fewer blocks than SMs (small batches: one sample per program
      rather than idle SMs). Seed CNN (29,696 bytes per sample, 132 SMs): 4 from batch 528 on, 1 at batch 128.
    - ``programs``: one per block, at most ``sm_count * PROGRAMS_PER_SM`` (the rest loop).
    - tiles: the layer kernels' GPU tiles for a batch of ``block`` without their small-batch row shrinking
      (``min_programs=1``), rows capped at the block's rows (``layer_tiles``).
    - ``num_warps`` 4: ``PROGRAMS_PER_SM`` programs of 128 threads fit an SM's 65,536 registers at up to 255
      registers per thread (the seed CNN's kernel uses 255 at block 4, no spills; with 8 warps it needs 179, so only
      one program would fit).
    Interpreted (CPU tests): the interpreter pays per Triton operation, so blocks are as large as the scratch
    budget allows (capped at the batch), one program per block, and the tiles the interpreter's (large).
    """
    if interpreted is None:
        interpreted = bool(_INTERPRETED)
    batch = max(1, int(batch))
    per = 4 * max(1, scratch_per_sample(specs))  # bytes per sample (a one-hidden-layer chain stores nothing)
    fit = _floor_pow2(max(1, PROGRAM_SCRATCH_BYTES // per))
    if interpreted:
        bb = block or max(1, min(fit, MAX_BLOCK, _pow2(batch)))
        n_blocks = cdiv(batch, bb)
        settings = ChainSettings(bb, num_warps or 4, programs or n_blocks, False)
    else:
        sms = int(sm_count or DEFAULT_SM_COUNT)
        in_flight = sms * PROGRAMS_PER_SM
        bb = block
        if bb is None:
            bb = max(1, min(fit, MAX_BLOCK, _floor_pow2(max(1, L2_SCRATCH_BYTES // (in_flight * per)))))
            while bb > 1 and cdiv(batch, bb) < sms:
                bb //= 2
        n_blocks = cdiv(batch, bb)
        settings = ChainSettings(bb, num_warps or 4, programs or min(n_blocks, in_flight), True)
    return settings


def layer_tiles(specs, settings: ChainSettings) -> dict[int, dict[str, TileSettings]]:
    """{layer: {"fwd" / "dgrad" / "head": tile settings}} for the phases the chain kernel runs."""
    interpreted = not settings.gpu_tiles
    m, bb = len(specs), settings.block
    head = fused_head(specs)
    last = m - 2
    out: dict[int, dict[str, TileSettings]] = {}
    for i in range(m - 1):
        kinds = ["head"] if head and i == last else ["fwd", "dgrad"]
        out[i] = {}
        for kind in kinds:
            st = tile_settings(specs[i], bb, kind, interpreted, min_programs=1)
            rows = bb if kind == "head" else gemm_shape(specs[i], bb, kind)[0]
            bm = max(16, min(st.bm, _pow2(rows)))
            warps = st.num_warps if interpreted else (8 if bm * max(st.bn, st.bj) >= 64 * 64 else 4)
            out[i][kind] = st._replace(bm=bm, num_warps=warps)
    return out


def _element_block(specs, settings: ChainSettings) -> int:
    n = settings.block * specs[0].d_in
    return min(_pow2(n), ELEMENT_BLOCK if settings.gpu_tiles else 1 << 16)


# ----------------------------------------------------------------------------------------------- source generation
_HEADER = '''"""Generated by ebmfast.kernels.persistent (chain_source) for one chain geometry, precision and tile
settings. Do not edit: regenerated on demand; the file name is a hash of this text.

{summary}
"""

import triton
import triton.language as tl

from ebmfast.kernels.layers import (
    conv_dgrad_tile,
    conv_fwd_tile,
    dense_dgrad_tile,
    dense_fwd_tile,
    dgrad_dz_epilogue,
    fwd_epilogue,
    head_dgrad_tile,
    head_dz_tile,
    langevin_epilogue,
)
from ebmfast.kernels.persistent import block_copy, block_noise
'''

_UPDATE_PARAMS = (
    "XB, ZB, RNG, off, noise_index, step_size, grad_clip, noise_std, lo, hi, UPDATE_NOISE: tl.constexpr, "
    "NOISE_FROM_INPUT: tl.constexpr"
)
_UPDATE_CALL = (
    "langevin_epilogue(XB, ZB, RNG, acc, addr, mask, off, step_size, grad_clip, noise_std, lo, hi, noise_index, "
    "UPDATE_NOISE, NOISE_FROM_INPUT)"
)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def __call__(self, indent: int, text: str = "") -> None:
        for line in text.strip("\n").splitlines() or [""]:
            self.lines.append(("    " * indent + line) if line.strip() else "")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _loop(w: _Writer, indent: int, var: str, count: str | int) -> int:
    """``for var in range(count)`` unless the count is the literal 1 (then ``var = 0``); returns the body indent."""
    if isinstance(count, int) and count == 1:
        w(indent, f"{var} = 0")
        return indent
    w(indent, f"for {var} in range(0, {count}):")
    return indent + 1


def _geom(s: LayerSpec) -> str:
    return f"{s.c_in}, {s.h}, {s.w}, {s.c_out}, {s.oh}, {s.ow}, {s.kh}, {s.kw}, {s.sh}, {s.sw}, {s.ph}, {s.pw}"


def _in_act(s: LayerSpec) -> str:
    """The input activation's code and parameter (a float literal that round-trips the float32 value)."""
    return f"{s.in_act}, {s.in_act_value!r}"


def _out_act(s: LayerSpec) -> str:
    return f"{s.out_act}, {s.out_act_value!r}"


def _dot(st: TileSettings) -> str:
    return f"{st.use_dot}, {st.bm}, {st.bn}, {st.bk}"


def _def(w: _Writer, name: str, params: str, doc: str, noinline: bool) -> None:
    w(0)
    w(0)
    w(0, "@triton.jit(noinline=True)" if noinline else "@triton.jit")
    w(0, f"def {name}({params}):")
    w(1, f'"""{doc}"""')


def _emit_fwd(
    w: _Writer, i: int, s: LayerSpec, st: TileSettings, emit_dz: bool, prec: int, noinline: bool, src: LayerSpec | None
) -> str:
    """Layer i's forward from IN (x's block, or layer i-1's z) into OUT (its z, or dz if it feeds the final
    Linear); ``src``: the residual source layer j (its input h_j made of RES = z_{j-1} by its input activation),
    or None. Returns the function's name."""
    name = f"_forward_{i}"
    what = " (stores dz for the final Linear)" if emit_dz else ""
    what += f" + the input of layer {s.res_src}" if src is not None else ""
    _def(w, name, "IN, OUT, RES, WT, BIAS, WL, nb, nbmax", f"Layer {i} forward{what}: {s.describe()}.", noinline)
    rows = "nb" if s.dense else f"nb * {s.oh * s.ow}"
    b = _loop(w, 1, "tm", f"tl.cdiv({rows.replace('nb', 'nbmax')}, {st.bm})")
    b = _loop(w, b, "tn", cdiv(s.c_out, st.bn))
    if s.dense:
        w(b, "acc, offs_m, offs_n, mask_m, mask_n = dense_fwd_tile(")
        w(b + 1, f"IN, WT, BIAS, tm, tn, {rows}, {s.c_in}, {s.h * s.w}, {s.c_out}, {bool(s.in_nchw)}, {_in_act(s)}, "
                 f"{bool(s.has_bias)}, {prec}, {_dot(st)}")  # fmt: skip
    else:
        w(b, "acc, offs_m, offs_n, mask_m, mask_n = conv_fwd_tile(")
        w(b + 1, f"IN, WT, BIAS, tm, tn, {rows}, {_geom(s)}, {bool(s.in_nchw)}, {_in_act(s)}, {bool(s.has_bias)}, "
                 f"{st.flat}, {prec}, {_dot(st)}")  # fmt: skip
    w(b, ")")
    res = f"True, {_in_act(src)}" if src is not None else "False, 0, 0.0"
    w(b, f"fwd_epilogue(OUT, WL, RES, acc, offs_m, offs_n, mask_m, mask_n, {s.c_out}, {s.oh * s.ow}, "
         f"{_out_act(s)}, {emit_dz}, {res})")  # fmt: skip
    return name


def _emit_dgrad(
    w: _Writer, i: int, s: LayerSpec, st: TileSettings, prec: int, update: bool, noinline: bool, feeds: bool = False
) -> str:
    """Layer i's input gradient from DZ (its dz): dz of layer i-1 in place over its z in OUT, or (``update``, layer
    0) the Langevin update of x's block; ``feeds``: layer i's input feeds a residual add, whose dz (RES) joins its
    gradient. Returns the function's name."""
    if update:
        name, params = "_update", f"DZ, WT, nb, nbmax, {_UPDATE_PARAMS}"
        doc = f"Layer 0 input gradient + the Langevin update of x's block: {s.describe()}."
    else:
        name, params = f"_input_grad_{i}", "DZ, OUT, RES, WT, nb, nbmax"
        doc = f"Layer {i} input gradient (dz of layer {i - 1}, in place over its z): {s.describe()}."
    _def(w, name, params, doc, noinline)
    if s.dense:
        b = _loop(w, 1, "tm", f"tl.cdiv(nbmax, {st.bm})")
        b = _loop(w, b, "tn", cdiv(s.d_in, st.bn))
        w(b, f"acc, addr, mask = dense_dgrad_tile(DZ, WT, tm, tn, nb, {s.c_in}, {s.h * s.w}, {s.c_out}, "
             f"{bool(s.in_nchw)}, {prec}, {_dot(st)})")  # fmt: skip
    else:
        ch, cw = s.phase_rows
        b = _loop(w, 1, "phase", s.sh * s.sw)
        b = _loop(w, b, "tm", f"tl.cdiv(nbmax * {ch * cw}, {st.bm})")
        b = _loop(w, b, "tn", cdiv(s.c_in, st.bn))
        w(b, "acc, addr, mask = conv_dgrad_tile(")
        w(b + 1, f"DZ, WT, tm, tn, phase, nb, {_geom(s)}, {bool(s.in_nchw)}, {st.flat}, {prec}, {_dot(st)}")
        w(b, ")")
    w(b, _UPDATE_CALL if update else f"dgrad_dz_epilogue(OUT, RES, acc, addr, mask, {_in_act(s)}, {feeds})")
    return name


def _emit_head(w: _Writer, i: int, s: LayerSpec, st: TileSettings, prec: int, update: bool, noinline: bool) -> str:
    """The fused linear head (layer i = m-2): forward from IN, dz in registers, input gradient into OUT (layer
    i-1's z, in place) or, as the first layer (``update``), the Langevin update of x's block."""
    if update:
        name, params = "_update", f"IN, WT, BIAS, WL, nb, nbmax, {_UPDATE_PARAMS}"
        doc = f"The fused head as the first layer (forward, dz, input gradient) + the Langevin update: {s.describe()}."
    else:
        name, params = "_head", "IN, OUT, WT, BIAS, WL, nb, nbmax"
        doc = f"Layer {i}, the fused head (forward, dz, input gradient into layer {i - 1}'s z): {s.describe()}."
    _def(w, name, params, doc, noinline)
    b = _loop(w, 1, "tm", f"tl.cdiv(nbmax, {st.bm})")
    w(b, "dz, offs_m, mask_m = head_dz_tile(")
    w(b + 1, f"IN, WT, BIAS, WL, tm, nb, {s.c_in}, {s.h * s.w}, {s.c_out}, {bool(s.in_nchw)}, {_in_act(s)}, "
             f"{_out_act(s)}, {bool(s.has_bias)}, {prec}, {st.use_dot}, {st.bm}, {st.bn}, {st.bk}")  # fmt: skip
    w(b, ")")
    j = _loop(w, b, "tj", cdiv(s.d_in, st.bj))
    w(j, f"acc, addr, mask = head_dgrad_tile(dz, WT, offs_m, mask_m, tj, {s.c_in}, {s.h * s.w}, {s.c_out}, "
         f"{bool(s.in_nchw)}, {prec}, {st.use_dot_b}, {st.bm}, {st.bn}, {st.bj})")  # fmt: skip
    w(j, _UPDATE_CALL if update else f"dgrad_dz_epilogue(OUT, OUT, acc, addr, mask, {_in_act(s)}, False)")
    return name


def chain_source(specs, precision: int, settings: ChainSettings) -> str:
    """The Python source of the chain kernel ``chain_kernel`` for ``specs`` (``LayerSpec`` list, final
    Linear(k, 1) last) in ``precision`` (0 fp32, 1 tf32, 2 bf16) with ``settings``. Each layer phase is a device
    function of its own, compiled ``noinline`` on the GPU: the compiler cannot hoist one phase's loop-invariant
    addresses out of the step loop, where they would stay live (in registers, or spilled) through every other
    phase."""
    specs = list(specs)
    reason = residual_reason(specs)
    if reason is not None:
        raise ValueError(reason)
    m = len(specs)
    last = m - 2
    head = fused_head(specs)
    tiles = layer_tiles(specs, settings)
    offsets, per_program = scratch_layout(specs, settings.block)
    bb, d0 = settings.block, specs[0].d_in
    eb = _element_block(specs, settings)
    prec = int(precision)
    noinline = settings.gpu_tiles
    summary = "\n".join(f"layer {i}: {s.describe()}" for i, s in enumerate(specs))
    summary += (
        f"\nprecision {prec}; {bb} samples per program; scratch {per_program} floats per program; "
        f"tiles: {'GPU' if settings.gpu_tiles else 'interpreter'}"
    )
    w = _Writer()
    w(0, _HEADER.format(summary=summary))

    def scr(i: int) -> str:
        return "XB" if i < 0 else f"S{i}"

    feeds = residual_sources(specs)  # {j: k}: layer k adds the input of layer j
    step: list[str] = []  # the step's phase calls, in order (a barrier after each)
    for i in range(last if head else last + 1):
        j = specs[i].res_src
        f = _emit_fwd(w, i, specs[i], tiles[i]["fwd"], i == last, prec, noinline, specs[j] if j >= 0 else None)
        step.append(f"{f}({scr(i - 1)}, S{i}, {scr(j - 1) if j >= 0 else f'S{i}'}, W{i}, B{i}, WL, nb, nbmax)")
    if head and last > 0:
        f = _emit_head(w, last, specs[last], tiles[last]["head"], prec, False, noinline)
        step.append(f"{f}(S{last - 1}, S{last - 1}, W{last}, B{last}, WL, nb, nbmax)")
    for i in range(last - 1 if head else last, 0, -1):
        f = _emit_dgrad(w, i, specs[i], tiles[i]["dgrad"], prec, False, noinline, i in feeds)
        step.append(f"{f}(S{i}, S{i - 1}, S{feeds.get(i, i)}, W{i}, nb, nbmax)")
    if head and last == 0:
        _emit_head(w, 0, specs[0], tiles[0]["head"], prec, True, noinline)
        update_args = "XB, W0, B0, WL, nb, nbmax"
    else:
        _emit_dgrad(w, 0, specs[0], tiles[0]["dgrad"], prec, True, noinline)
        update_args = "S0, W0, nb, nbmax"

    def update(zb: str, index: str, noise: str) -> str:
        return (
            f"_update({update_args}, XB, {zb}, RNG, off, {index}, step_size, grad_clip, noise_std, lo, hi, {noise}, "
            "NOISE_FROM_INPUT)"
        )

    params = ", ".join(f"W{i}, B{i}" for i in range(m - 1)) + ", WL"
    w(0)
    w(0)
    w(0, "@triton.jit")
    w(0, "def chain_kernel(")
    w(1, "X,  # pointer to the chain state (N, ...) fp32, contiguous; updated in place")
    w(1, "NOISE,  # pointer to supplied draws (K, N, ...) (read if NOISE_FROM_INPUT)")
    w(1, "TRAJ,  # pointer to the trajectory (K, N, ...) (written if TRAJECTORY)")
    w(1, "RNG,  # pointer to int64[2] (philox seed, stream counter); read, never advanced")
    w(1, f"SCR,  # pointer to the scratch: programs x {per_program} fp32")
    w(1, f"{params},  # weights and biases of the affine layers (torch layout), the final Linear's weight last")
    w(1, "N,  # batch size")
    w(1, "P,  # programs in the grid: program pid runs blocks pid, pid + P, ...")
    w(1, "K,  # steps")
    w(1, "step_size,  # gradient step size (fp32)")
    w(1, "grad_clip,  # gradient clip bound (fp32)")
    w(1, "noise_std,  # noise standard deviation (fp32)")
    w(1, "lo,  # lower clamp bound (fp32)")
    w(1, "hi,  # upper clamp bound (fp32)")
    w(1, "NOISE_FROM_INPUT: tl.constexpr,  # draws from NOISE instead of the Philox stream")
    w(1, "TRAJECTORY: tl.constexpr,  # write the state after each step to TRAJ")
    w(0, "):")
    w(1, "pid = tl.program_id(0)")
    w(1, f"scr = SCR + tl.cast(pid, tl.int64) * {per_program}  # this program's scratch")
    for i, o in offsets.items():
        w(1, f"S{i} = scr + {o}  # layer {i}'s output: {bb} x {specs[i].d_out} (NHWC per sample)")
    w(1, f"numel = tl.cast(N, tl.int64) * {d0}  # elements of x")
    w(1, f"n_blocks = tl.cdiv(N, {bb})")
    w(1, f"nbmax = tl.minimum(N, {bb})  # samples in a full block: every loop bound below derives from it, not from")
    w(1, f"el_max = nbmax * {d0}  # the program id (uniform trip counts; the last block's extra tiles are masked)")
    w(1, "for it in range(0, tl.cdiv(n_blocks, P)):")
    w(2, "blk = pid + it * P")
    w(2, "if blk < n_blocks:")
    w(3, f"nb = tl.minimum(N - blk * {bb}, {bb})  # samples in this block")
    w(3, f"off = tl.cast(blk, tl.int64) * {bb * d0}  # element index of the block's first element")
    w(3, "XB = X + off")
    w(3, f"n_el = nb * {d0}")
    w(3, f"block_noise(XB, NOISE + off, RNG, off, n_el, el_max, 0, noise_std, lo, hi, NOISE_FROM_INPUT, {eb})")
    w(3, "tl.debug_barrier()")
    w(3, "for k in range(0, K):")
    for call in step:
        w(4, call)
        w(4, "tl.debug_barrier()")
    w(4, "if TRAJECTORY:  # the state after the step goes out, then the next draw is added")
    w(5, update("XB", "0", "False"))
    w(5, "tl.debug_barrier()")
    w(5, f"block_copy(XB, TRAJ + k * numel + off, n_el, el_max, {eb})")
    w(5, "tl.debug_barrier()")
    w(5, "if k + 1 < K:")
    w(6, f"block_noise(XB, NOISE + (k + 1) * numel + off, RNG, off, n_el, el_max, k + 1, noise_std, lo, hi, "
         f"NOISE_FROM_INPUT, {eb})")  # fmt: skip
    w(4, "else:  # the update and the next draw in one pass")
    w(5, "if k + 1 < K:")
    w(6, update("NOISE + (k + 1) * numel + off", "k + 1", "True"))
    w(5, "else:")
    w(6, update("XB", "K", "False"))
    w(4, "tl.debug_barrier()")
    return w.text()


# ----------------------------------------------------------------------------------------------- kernel cache
_KERNELS: dict[str, object] = {}
_LOCK = threading.Lock()


def kernel_cache_dir() -> Path:
    """Where generated kernel sources live: ``$EBMFAST_KERNEL_CACHE``, else ``~/.cache/ebmfast/kernels``, else a
    folder in the system's temporary directory (when the home folder is not writable)."""
    env = os.environ.get("EBMFAST_KERNEL_CACHE")
    candidates = [Path(env)] if env else [Path.home() / ".cache" / "ebmfast" / "kernels"]
    candidates.append(Path(tempfile.gettempdir()) / f"ebmfast-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for path in candidates:
        try:
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    raise RuntimeError(f"no writable folder for generated kernels (tried {', '.join(map(str, candidates))})")


def _load(source: str):
    digest = hashlib.sha256(source.encode()).hexdigest()[:20]
    with _LOCK:
        kernel = _KERNELS.get(digest)
        if kernel is not None:
            return kernel
        path = kernel_cache_dir() / f"chain_{digest}.py"
        if not path.exists() or path.read_text() != source:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)  # atomic: another process sees the old file or the whole new one
        name = f"ebmfast_generated_chain_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # Triton and inspect look modules up by name
        spec.loader.exec_module(module)
        _KERNELS[digest] = kernel = module.chain_kernel
        return kernel


def chain_kernel(specs, precision: int, settings: ChainSettings):
    """The ``@triton.jit`` chain kernel for this geometry, precision and settings (generated once per process and
    source text)."""
    return _load(chain_source(specs, precision, settings))


# ----------------------------------------------------------------------------------------------- launches
def chain_call(
    specs, x, rng, weights, biases, scratch, precision, settings: ChainSettings, steps, *, noise=None,
    trajectory=None, step_size=0.0, grad_clip=0.0, noise_std=0.0, lo=0.0, hi=0.0,
) -> KernelCall:  # fmt: skip
    """The one launch of a K-step chain on ``x`` in place. ``weights``/``biases``: one per affine layer, the final
    Linear(k, 1) last (bias entries read only where ``spec.has_bias``); ``scratch``: at least
    ``settings.programs * scratch_layout(specs, settings.block)[1]`` fp32 values; ``noise`` (K, *x.shape) or None
    (the stream at ``rng[1] + j``); ``trajectory`` (K, *x.shape) or None."""
    kernel = chain_kernel(specs, precision, settings)
    args = dict(
        X=x, NOISE=noise if noise is not None else x, TRAJ=trajectory if trajectory is not None else x, RNG=rng,
        SCR=scratch,
    )  # fmt: skip
    for i in range(len(specs) - 1):
        args[f"W{i}"] = weights[i]
        args[f"B{i}"] = biases[i] if specs[i].has_bias else weights[i]
    args.update(
        WL=weights[-1], N=int(x.shape[0]), P=int(settings.programs), K=int(steps), step_size=float(step_size),
        grad_clip=float(grad_clip), noise_std=float(noise_std), lo=float(lo), hi=float(hi),
        NOISE_FROM_INPUT=noise is not None, TRAJECTORY=trajectory is not None,
    )  # fmt: skip
    return KernelCall(kernel, (settings.programs, 1, 1), args, settings.num_warps)


def launch_chain(
    x, noise, trajectory, rng, weights, biases, scratch, specs, precision, settings, steps, step_size, grad_clip,
    noise_std, lo, hi, wrap=None,
) -> None:  # fmt: skip
    call = chain_call(
        specs, x, rng, weights, biases, scratch, precision, settings, steps, noise=noise, trajectory=trajectory,
        step_size=step_size, grad_clip=grad_clip, noise_std=noise_std, lo=lo, hi=hi,
    )  # fmt: skip
    kernel = wrap(call.kernel) if wrap is not None else call.kernel
    kernel[call.grid](**call.args, num_warps=call.num_warps)
