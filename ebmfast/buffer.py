"""Replay buffer for persistent contrastive divergence (the seed's ``Sampler`` storage), device-resident.

Storage is one fixed-shape tensor ``(capacity, *sample_shape)`` plus a device-side write pointer: drawing and
writing back are pure tensor ops (no host round trip, no Python list of tensors), so both can be captured in a
CUDA graph.

Semantics versus the seed:
- The seed starts from ``capacity`` U(lo, hi) images; so does this.
- The seed draws a Binomial(batch, p) count of fresh U(lo, hi) images and fills the rest uniformly (with
  replacement) from the buffer. Here each of the ``batch`` slots is fresh with probability ``p`` independently:
  the number of fresh slots is the same Binomial(batch, p), only their positions in the batch differ (the seed
  puts them first), which nothing downstream depends on. Fixed shapes make it capturable.
- The seed prepends the newest chains and keeps the first ``capacity``: the oldest are evicted. A ring buffer
  does exactly that.

``fused=True`` (CUDA with Triton) draws and writes back with one Triton kernel each (``kernels/buffer.py``) instead of
about eight and four torch launches; the draw's randomness then comes from the buffer's own Philox stream
(``rng`` = device (seed, counter), advanced on the device per draw), so it stays capturable. It is opt-in: on an
H200, outside a CUDA graph, it showed no consistent win over the torch path (``bench/RESULTS.md``, measured with
``bench/bench_buffer.py``); the default torch path works on every device.

The fused path's torch custom ops, defined here beside their one caller: ``ebmfast::replay_draw(storage, rng, batch,
fresh_prob, lo, hi) -> (out, slots)`` and ``ebmfast::replay_push_(storage, samples, ptr)`` (``kernels/buffer.py``).
They exist for CUDA (and for CPU tensors under the Triton interpreter with EBMFAST_TRITON_ON_CPU=1, for tests).
"""

from __future__ import annotations

import torch

from .opdef import HAS_TRITON, USES_TRITON_OP, define_op, load_kernels, triton_on_cpu, triton_unavailable_reason, wrap
from .validation import check_clamp, check_positive_int, check_probability, check_samples, check_shape

__all__ = ["ReplayBuffer", "fused_replay_available", "replay_draw", "replay_push_"]

kernels = load_kernels("buffer")  # None without Triton


def fused_replay_available(device: torch.device | str) -> bool:
    """Whether the fused replay-buffer kernels run on ``device``."""
    device = torch.device(device)
    if kernels is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_on_cpu())


def _require_fused(device: torch.device | str) -> None:
    if not fused_replay_available(device):
        raise RuntimeError(
            f"the fused replay-buffer kernels run on CUDA with Triton (or on CPU under TRITON_INTERPRET=1 with "
            f"EBMFAST_TRITON_ON_CPU=1); got tensors on {device}"
            + (f" and {triton_unavailable_reason()}" if not HAS_TRITON else "")
        )


@define_op("ebmfast::replay_draw", mutates_args={})
def replay_draw(
    storage: torch.Tensor, rng: torch.Tensor, batch: int, fresh_prob: float, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = torch.empty((batch, *storage.shape[1:]), dtype=storage.dtype, device=storage.device)
    slots = torch.empty(batch, dtype=torch.int64, device=storage.device)
    _require_fused(storage.device)
    kernels.launch_replay_draw(out, slots, storage, rng, fresh_prob, lo, hi, wrap=wrap)
    return out, slots


@define_op("ebmfast::replay_push_", mutates_args={"storage"})
def replay_push_(storage: torch.Tensor, samples: torch.Tensor, ptr: torch.Tensor) -> None:
    _require_fused(storage.device)
    kernels.launch_replay_push(storage, samples, ptr, wrap=wrap)


@replay_draw.register_kernel("cpu")
def _(
    storage: torch.Tensor, rng: torch.Tensor, batch: int, fresh_prob: float, lo: float, hi: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _require_fused(storage.device)
    out = torch.empty((batch, *storage.shape[1:]), dtype=storage.dtype)
    slots = torch.empty(batch, dtype=torch.int64)
    kernels.launch_replay_draw(out, slots, storage, rng, fresh_prob, lo, hi)
    return out, slots


@replay_push_.register_kernel("cpu")
def _(storage: torch.Tensor, samples: torch.Tensor, ptr: torch.Tensor) -> None:
    _require_fused(storage.device)
    kernels.launch_replay_push(storage, samples, ptr)


if not USES_TRITON_OP:  # triton_op derives fake implementations itself; custom_op needs them spelled out

    @replay_draw.register_fake
    def _(storage: torch.Tensor, rng: torch.Tensor, batch: int, *rest: object) -> tuple[torch.Tensor, torch.Tensor]:
        return storage.new_empty((batch, *storage.shape[1:])), storage.new_empty(batch, dtype=torch.int64)

    @replay_push_.register_fake
    def _(storage: torch.Tensor, *rest: object) -> None:
        return None


class ReplayBuffer:
    def __init__(
        self,
        sample_shape: tuple[int, ...] | list[int],
        capacity: int = 8192,
        fresh_prob: float = 0.05,
        clamp: tuple[float, float] = (-1.0, 1.0),
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        fused: bool = False,
    ) -> None:
        self.sample_shape = check_shape(sample_shape, "sample_shape")
        self.capacity = check_positive_int(capacity, "capacity")
        self.fresh_prob = check_probability(fresh_prob, "fresh_prob")
        self.lo, self.hi = check_clamp(clamp)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.generator = generator
        self.storage = self._uniform((self.capacity, *self.sample_shape))
        # Next slot to overwrite (the oldest entry); a device tensor so that writes need no host sync.
        self.ptr = torch.zeros((), dtype=torch.long, device=self.device)
        self.fused = bool(fused)
        if self.fused:
            _require_fused(self.device)
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=self.device).item())
            self.rng = torch.tensor([seed, 0], dtype=torch.int64, device=self.device)

    def _uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        u = torch.rand(shape, device=self.device, dtype=self.dtype, generator=self.generator)
        return u.mul_(self.hi - self.lo).add_(self.lo)

    def __len__(self) -> int:
        return self.capacity

    def draw(self, batch_size: int) -> torch.Tensor:
        """A batch of chain starts: fresh U(lo, hi) with probability ``fresh_prob``, else a stored sample."""
        batch_size = check_positive_int(batch_size, "batch_size")
        if self.fused:
            out, _slots = torch.ops.ebmfast.replay_draw(
                self.storage, self.rng, batch_size, self.fresh_prob, self.lo, self.hi
            )
            self.rng[1:].add_(1)
            return out
        idx = torch.randint(0, self.capacity, (batch_size,), device=self.device, generator=self.generator)
        fresh = torch.rand(batch_size, device=self.device, generator=self.generator) < self.fresh_prob
        noise = self._uniform((batch_size, *self.sample_shape))
        mask = fresh.view(batch_size, *([1] * len(self.sample_shape)))
        return torch.where(mask, noise, self.storage.index_select(0, idx))

    @torch.no_grad()
    def push(self, samples: torch.Tensor, keep: torch.Tensor | None = None, check_finite: bool = True) -> None:
        """Write sampled chains back, overwriting the oldest entries.

        ``keep``: an optional 0-d bool device tensor; when it is False the buffer is left exactly as it was (rows and
        write pointer), decided on the device without a host synchronisation (the CD step skips the write-back of a
        non-finite iteration this way). ``check_finite=False`` skips the finiteness check, the one host
        synchronisation here (it is skipped during CUDA-graph capture anyway)."""
        check_samples(samples, "samples", finite=check_finite)
        if tuple(samples.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"samples must have shape (N, {', '.join(map(str, self.sample_shape))}), got {tuple(samples.shape)}"
            )
        n = samples.shape[0]
        if n > self.capacity:
            raise ValueError(f"cannot push {n} samples into a buffer of capacity {self.capacity}")
        samples = samples.detach().to(device=self.device, dtype=self.dtype)
        pos = None
        if keep is not None:
            if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.numel() != 1:
                raise TypeError(f"keep must be a 1-element bool tensor, got {keep!r}")
            pos = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
            samples = torch.where(keep.to(self.device), samples, self.storage.index_select(0, pos))
        if self.fused:
            torch.ops.ebmfast.replay_push_(self.storage, samples.contiguous(), self.ptr)
        else:
            if pos is None:
                pos = (self.ptr + torch.arange(n, device=self.device)) % self.capacity
            self.storage.index_copy_(0, pos, samples)
        advance = n if keep is None else keep.to(device=self.device, dtype=torch.long).reshape(()) * n
        self.ptr.add_(advance).remainder_(self.capacity)

    def state_dict(self) -> dict:
        return {
            "storage": self.storage.detach().cpu().clone(),
            "ptr": int(self.ptr),
            "capacity": self.capacity,
            "sample_shape": self.sample_shape,
            "fresh_prob": self.fresh_prob,
            "clamp": (self.lo, self.hi),
            "rng": self.rng.detach().cpu().clone() if self.fused else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("storage", "ptr", "capacity", "sample_shape"):
            if key not in state:
                raise KeyError(f"replay-buffer state is missing {key!r}; keys given: {sorted(state)}")
        if int(state["capacity"]) != self.capacity or tuple(state["sample_shape"]) != self.sample_shape:
            raise ValueError(
                f"replay-buffer state is for capacity {state['capacity']} and sample shape "
                f"{tuple(state['sample_shape'])}, this buffer has {self.capacity} and {self.sample_shape}"
            )
        self.storage.copy_(state["storage"].to(device=self.device, dtype=self.dtype))
        self.ptr.fill_(int(state["ptr"]))
        self.fresh_prob = check_probability(state.get("fresh_prob", self.fresh_prob), "fresh_prob")
        if "clamp" in state:
            self.lo, self.hi = check_clamp(state["clamp"])
        if self.fused and state.get("rng") is not None:
            self.rng.copy_(state["rng"].to(self.device))
