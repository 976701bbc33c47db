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

``fused=True`` (CUDA with Triton) draws and writes back with one Triton kernel each (``kernels/replay.py``) instead of
about eight and four torch launches; the draw's randomness then comes from the buffer's own Philox stream
(``rng`` = device (seed, counter), advanced on the device per draw), so it stays capturable. It is opt-in: on an
H200, outside a CUDA graph, it showed no consistent win over the torch path (``bench/RESULTS.md``, measured with
``bench/bench_buffer.py``); the default torch path works on every device.
"""

from __future__ import annotations

import torch

from .validation import check_clamp, check_positive_int, check_probability, check_samples, check_shape

__all__ = ["ReplayBuffer"]


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
            from . import ops

            if not ops.fused_replay_available(self.device):
                ops._require_replay(self.device)  # raises with the reason
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
