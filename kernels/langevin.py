"""Fused Langevin update with in-kernel Philox noise.

The seed's step k is: noise -> clamp -> gradient -> grad-clip -> step -> clamp. The kernel here fuses the tail of
step k with the head of step k+1, so a K-step chain is one noise launch, then K times (gradient, one update):

    x <- clamp(x - step_size * clamp(g, -grad_clip, grad_clip), lo, hi)     (HAS_GRAD)
    x <- clamp(x + noise_std * z, lo, hi)                                   (ADD_NOISE)

Every clamp keeps NaN (``clamp_nan``): a NaN gradient or state gives a NaN result, as in the torch reference.

Noise ``z`` is either generated in the kernel or read from a supplied tensor (parity mode). Generated noise is a
pure function of (seed, counter, element index): Philox4x32-10 keyed by the 64-bit seed, with the 64-bit element
index in counter words 0-1 and the 64-bit stream counter (``RNG[1] + noise_index``) in words 2-3, then Box-Muller.
Seed and counter are read from a device tensor, so a CUDA graph replay that advances ``RNG[1]`` draws new noise;
nothing is stored between steps. ``normal_kernel`` writes the same stream to memory for parity checks.
"""

import triton
import triton.language as tl

__all__ = [
    "langevin_step_kernel",
    "normal_kernel",
    "launch_langevin_step",
    "launch_normal",
    "block_settings",
    "clamp_nan",
    "grad_step",
    "noise_step",
]


@triton.jit
def clamp_nan(v, lo, hi):
    """clamp(v, lo, hi) that keeps NaN (as torch.clamp does): the one clamp of every update kernel. Plain
    minimum/maximum lower to min/max instructions that return the other operand for a NaN, which would turn a NaN
    gradient or state into a clip bound silently."""
    return tl.clamp(v, lo, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _philox_normal(seed, counter, offs):
    """Standard normals for int64 element indices ``offs`` at stream position ``counter`` (int64 scalar)."""
    zero = (offs * 0).to(tl.uint32)
    c0 = offs.to(tl.uint32)  # low 32 bits of the element index
    c1 = (offs >> 32).to(tl.uint32)  # high 32 bits
    c2 = zero + (counter & 0xFFFFFFFF).to(tl.uint32)
    c3 = zero + ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    r0, r1, _, _ = tl.philox(seed, c0, c1, c2, c3)
    u1 = tl.maximum(tl.uint_to_uniform_float(r0), 1.0e-7)  # (0, 1): log stays finite
    u2 = tl.uint_to_uniform_float(r1)
    return tl.sqrt(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


@triton.jit
def grad_step(x, g, step_size, grad_clip, lo, hi):
    """The update's gradient half on fp32 values: clamp(x - step_size * clamp(g, +-grad_clip), lo, hi)."""
    g = clamp_nan(g, -grad_clip, grad_clip)
    x = x - step_size * g
    return clamp_nan(x, lo, hi)


@triton.jit
def noise_step(
    x,  # fp32 state values
    Z,  # pointer to supplied standard-normal noise (read at Z + addr if NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] (philox seed, stream counter)
    addr,  # element indices relative to Z
    noise_addr,  # int64 Philox element indices of the same elements in the whole chain state
    mask,  # elements in range
    noise_index,  # draw number: the stream counter used is RNG[1] + noise_index
    noise_std,  # standard deviation of the noise (fp32)
    lo,  # lower clamp bound (fp32)
    hi,  # upper clamp bound (fp32)
    NOISE_FROM_INPUT: tl.constexpr,  # z from Z instead of the stream
):
    """The update's noise half on fp32 values, every kernel's one copy: clamp(x + noise_std * z, lo, hi) with z
    supplied or the stream's draw."""
    if NOISE_FROM_INPUT:
        z = tl.load(Z + addr, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(RNG)
        counter = tl.load(RNG + 1) + noise_index
        z = _philox_normal(seed, counter, noise_addr)
    x = x + noise_std * z
    return clamp_nan(x, lo, hi)


@triton.jit
def langevin_step_kernel(
    X,  # pointer to the chain state x, n_elements values, updated in place
    G,  # pointer to the energy gradient g = grad_x sum(-f(x)), same layout as X (read only if HAS_GRAD)
    Z,  # pointer to supplied standard-normal noise, same layout as X (read only if NOISE_FROM_INPUT)
    RNG,  # pointer to int64[2] on the device: (philox seed, stream counter)
    n_elements,  # number of elements in X
    step_size,  # gradient step size s (fp32)
    grad_clip,  # gradient clip bound c: g is clamped to [-c, c] (fp32)
    noise_std,  # standard deviation of the added noise (fp32)
    lo,  # lower clamp bound of the state (fp32)
    hi,  # upper clamp bound of the state (fp32)
    noise_index,  # draw number within the chain; the stream counter used is RNG[1] + noise_index
    HAS_GRAD: tl.constexpr,  # apply the clipped gradient step and clamp
    ADD_NOISE: tl.constexpr,  # then add noise and clamp
    NOISE_FROM_INPUT: tl.constexpr,  # take z from Z instead of generating it
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)  # int64: offsets cannot overflow for > 2**31 elements
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = offs < n_elements  # ragged tail
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_GRAD:
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        x = grad_step(x, g, step_size, grad_clip, lo, hi)
    if ADD_NOISE:
        x = noise_step(x, Z, RNG, offs, offs, mask, noise_index, noise_std, lo, hi, NOISE_FROM_INPUT)
    tl.store(X + offs, x.to(X.dtype.element_ty), mask=mask)


@triton.jit
def normal_kernel(
    OUT,  # pointer to the output, n_elements fp32 values
    RNG,  # pointer to int64[2] on the device: (philox seed, stream counter)
    n_elements,  # number of values to write
    noise_index,  # draw number; the stream counter used is RNG[1] + noise_index
    BLOCK_SIZE: tl.constexpr,  # elements per program
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = offs < n_elements
    seed = tl.load(RNG)
    counter = tl.load(RNG + 1) + noise_index
    z = _philox_normal(seed, counter, offs)
    tl.store(OUT + offs, z, mask=mask)


def block_settings(n_elements: int) -> tuple[int, int]:
    """BLOCK_SIZE and num_warps for an elementwise kernel over ``n_elements`` (chosen in one place)."""
    if n_elements <= 4096:
        return 512, 4
    if n_elements <= 1 << 20:
        return 1024, 4
    return 2048, 8


def launch_langevin_step(
    x, g, z, rng, step_size, grad_clip, noise_std, lo, hi, noise_index, add_noise, wrap=None
) -> None:
    """Launch ``langevin_step_kernel`` over contiguous ``x`` (and ``g``/``z`` of the same shape)."""
    n = x.numel()
    block, warps = block_settings(n)
    kernel = wrap(langevin_step_kernel) if wrap is not None else langevin_step_kernel
    grid = (triton.cdiv(n, block),)
    kernel[grid](
        x,
        g if g is not None else x,
        z if z is not None else x,
        rng,
        n,
        float(step_size),
        float(grad_clip),
        float(noise_std),
        float(lo),
        float(hi),
        int(noise_index),
        HAS_GRAD=g is not None,
        ADD_NOISE=bool(add_noise),
        NOISE_FROM_INPUT=z is not None,
        BLOCK_SIZE=block,
        num_warps=warps,
    )


def launch_normal(out, rng, noise_index, wrap=None) -> None:
    n = out.numel()
    block, warps = block_settings(n)
    kernel = wrap(normal_kernel) if wrap is not None else normal_kernel
    kernel[(triton.cdiv(n, block),)](out, rng, n, int(noise_index), BLOCK_SIZE=block, num_warps=warps)
