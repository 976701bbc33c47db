"""Fused replay-buffer draw and write-back.

``replay_draw_kernel``: one launch builds the batch of chain starts. For batch row i it draws, from Philox keyed by the
buffer's own (seed, counter) device tensor, a slot ``s_i`` (uniform over the capacity) and a fresh flag
(``u < fresh_prob``); the row is then a copy of ``STORE[s_i]``, or, when fresh, U(lo, hi) values drawn per element.
It also writes ``SLOTS[i]`` = s_i, or -1 for a fresh row (diagnostics and tests). The torch path of
``ReplayBuffer.draw`` needs about eight launches (randint, rand, compare, rand, scale, shift, gather, where).

``replay_push_kernel``: writes the batch into rows ``(PTR + i) % capacity``, reading the write pointer from device
memory, so both kernels can sit inside a CUDA graph; the caller advances the pointer afterwards.

Counter words: (row index, element index within the row or 0xFFFFFFFF for the row's own draw, counter lo, counter
hi). Grid: (batch rows, blocks per row).
"""

import triton
import triton.language as tl

__all__ = ["replay_draw_kernel", "replay_push_kernel", "launch_replay_draw", "launch_replay_push"]


@triton.jit
def replay_draw_kernel(
    OUT,  # pointer to the drawn batch, (batch, row_numel) contiguous
    SLOTS,  # pointer to int64[batch]: the slot each row was copied from, -1 for fresh rows
    STORE,  # pointer to the buffer storage, (capacity, row_numel) contiguous
    RNG,  # pointer to int64[2] on the device: (philox seed, draw counter) of the buffer's own stream
    row_numel,  # elements per sample
    capacity,  # rows in STORE
    fresh_prob,  # probability that a row is fresh U(lo, hi) noise (fp32)
    lo,  # lower bound of fresh values (fp32)
    hi,  # upper bound of fresh values (fp32)
    BLOCK_SIZE: tl.constexpr,  # elements per program (within one row)
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * row_numel cannot overflow
    block = tl.program_id(1).to(tl.int64)
    seed = tl.load(RNG)
    counter = tl.load(RNG + 1)
    c2 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # the row's own draw: slot and fresh flag (same in every block of the row)
    r0, r1, _, _ = tl.philox(seed, row.to(tl.uint32), tl.full((), 0xFFFFFFFF, tl.uint32), c2, c3)
    slot = r0.to(tl.int64) % capacity  # uint32 -> int64 zero-extends; capacity may be a specialised constant
    keep = tl.uint_to_uniform_float(r1) >= fresh_prob  # False: a fresh row
    cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = cols < row_numel  # ragged tail of the row
    # A fresh row still reads its (valid) slot: 5% of rows, cheaper than a branch per row.
    stored = tl.load(STORE + slot * row_numel + cols, mask=mask, other=0.0).to(tl.float32)
    zero = (cols * 0).to(tl.uint32)
    e0, _, _, _ = tl.philox(seed, zero + row.to(tl.uint32), cols.to(tl.uint32), zero + c2, zero + c3)
    u = tl.uint_to_uniform_float(e0)
    value = tl.where(keep, stored, lo + (hi - lo) * u)
    tl.store(OUT + row * row_numel + cols, value.to(OUT.dtype.element_ty), mask=mask)
    if block == 0:
        tl.store(SLOTS + row, tl.where(keep, slot, -1))


@triton.jit
def replay_push_kernel(
    STORE,  # pointer to the buffer storage, (capacity, row_numel) contiguous, written in place
    SRC,  # pointer to the samples to write, (batch, row_numel) contiguous
    PTR,  # pointer to the int64 write position (the oldest row), read on the device
    row_numel,  # elements per sample
    capacity,  # rows in STORE
    BLOCK_SIZE: tl.constexpr,  # elements per program (within one row)
):
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    dest = (tl.load(PTR) + row) % capacity
    cols = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE).to(tl.int64)
    mask = cols < row_numel
    x = tl.load(SRC + row * row_numel + cols, mask=mask)
    tl.store(STORE + dest * row_numel + cols, x.to(STORE.dtype.element_ty), mask=mask)


def _grid(batch: int, row_numel: int, block: int):
    return (batch, triton.cdiv(row_numel, block))


def launch_replay_draw(out, slots, storage, rng, fresh_prob, lo, hi, wrap=None) -> None:
    batch, row_numel, capacity = out.shape[0], out[0].numel(), storage.shape[0]
    block = min(1024, triton.next_power_of_2(row_numel))
    kernel = wrap(replay_draw_kernel) if wrap is not None else replay_draw_kernel
    kernel[_grid(batch, row_numel, block)](
        out, slots, storage, rng, row_numel, capacity, float(fresh_prob), float(lo), float(hi), BLOCK_SIZE=block
    )


def launch_replay_push(storage, samples, ptr, wrap=None) -> None:
    batch, row_numel, capacity = samples.shape[0], samples[0].numel(), storage.shape[0]
    block = min(1024, triton.next_power_of_2(row_numel))
    kernel = wrap(replay_push_kernel) if wrap is not None else replay_push_kernel
    kernel[_grid(batch, row_numel, block)](storage, samples, ptr, row_numel, capacity, BLOCK_SIZE=block)
