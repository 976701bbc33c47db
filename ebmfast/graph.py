"""The ``graph`` backend: a whole K-step Langevin chain captured once in a CUDA graph and replayed.

What is captured, per cache entry: copy-in into a static input buffer, then the chain (``ebmfast.chain``: one
noise launch, then K x (energy gradient, fused update): the compiled gradient and ``langevin.step_`` for the
``graph`` backend, the layer kernels for ``triton``; one launch for ``persistent``), then ``rng[1] += K``.
Everything reads its inputs from device memory at replay time:
- the chain state lives in the entry's static buffer ``x``;
- the Philox seed and counter are read by the kernels from the sampler's ``rng`` tensor, and the captured
  ``rng[1] += K`` advances it, so every replay draws new noise with no host involvement;
- parameters are read from their storage, so in-place optimizer updates (``opt.step()``) are seen by the next replay.

Re-capture happens on any change of what a graph bakes in: batch shape, dtype, device, step count, precision, the
model object, its structure (``recognise.structure_key``: submodules, their hyperparameters), or the
identity/shape/storage of any parameter or buffer (e.g. ``load_state_dict`` with
``assign=True`` or a ``module.weight = nn.Parameter(...)``): they are all part of the cache key. Sampler
hyper-parameters (step size, clip, noise, clamp) are part of the key too.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from .chain import Chain
from .recognise import structure_key
from .reference import StepSettings

__all__ = ["GraphCache", "capture_stream"]


class _Entry:
    def __init__(
        self, graph: torch.cuda.CUDAGraph, x_static: torch.Tensor, out_static: torch.Tensor, chain: Chain
    ) -> None:
        self.graph = graph
        self.x = x_static
        self.out = out_static
        self.chain = chain  # keeps the buffers the graph reads and writes alive


_CAPTURE_STREAMS: dict = {}


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every warm-up and capture. cuBLAS keeps a workspace per (handle, stream)
    (32 MiB on Hopper, measured: a graph entry that warmed up and captured on two fresh streams held 64 MB at
    batch 1), so sharing one stream pays that workspace once per process instead of twice per capture."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=torch.device("cuda", index))
    return _CAPTURE_STREAMS[index]


class GraphCache:
    """LRU cache of captured chains (a few entries: each holds a static batch and the graph's memory pool)."""

    def __init__(self, max_entries: int = 4, warmup: int = 2) -> None:
        self.max_entries = max_entries
        self.warmup = warmup
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0  # how many graphs were captured (tests read it)

    @staticmethod
    def key(
        model: nn.Module, settings: StepSettings, precision: str, x: torch.Tensor, steps: int, backend: str
    ) -> tuple:
        tensors = tuple(
            (name, t.data_ptr(), tuple(t.shape), t.dtype)
            for name, t in list(model.named_parameters()) + list(model.named_buffers())
        )
        structure = structure_key(model)  # submodules replaced or added, hyperparameters such as slopes changed
        return (backend, tuple(x.shape), x.dtype, x.device, steps, id(model), tensors, settings, precision, structure)

    def run(
        self,
        model: nn.Module,
        settings: StepSettings,
        precision: str,
        x: torch.Tensor,
        steps: int,
        rng: torch.Tensor,
        make_chain: Callable[[torch.Tensor], Chain],
        backend: str,
    ) -> torch.Tensor:
        """Replay (capturing first if needed) ``make_chain(x_static)``'s chain on a copy of ``x``; ``model``,
        ``settings`` and ``precision``: what the chain bakes in (part of the cache key)."""
        if x.device.type != "cuda":
            raise ValueError(f"the graph backend needs CUDA tensors, got {x.device}")
        key = self.key(model, settings, precision, x, steps, backend)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._capture(x, steps, rng, make_chain)
            self.entries[key] = entry
            while len(self.entries) > self.max_entries:
                self.entries.popitem(last=False)
        else:
            self.entries.move_to_end(key)
        entry.x.copy_(x)
        entry.graph.replay()
        return entry.out.clone()  # the static output is overwritten by the next replay

    @staticmethod
    def _chain(chain: Chain, x_static: torch.Tensor, steps: int, rng: torch.Tensor) -> torch.Tensor:
        """The captured work: the chain on ``x_static`` in place, then advance the noise counter."""
        chain.run_(x_static, steps, rng)
        rng[1:].add_(steps)
        return x_static

    def _capture(
        self, x: torch.Tensor, steps: int, rng: torch.Tensor, make_chain: Callable[[torch.Tensor], Chain]
    ) -> _Entry:
        x_static = torch.empty_like(x, memory_format=torch.contiguous_format)
        chain = make_chain(x_static)
        saved_counter = rng.clone()
        # Warm up on a side stream (torch.compile compiles here; cuDNN/cuBLAS pick algorithms), as CUDA graphs need.
        side = capture_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                x_static.copy_(x)
                self._chain(chain, x_static, steps, rng)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            out = self._chain(chain, x_static, steps, rng)
        # Warm-up and capture must not consume noise: the first replay uses the counter the caller saw.
        rng.copy_(saved_counter)
        self.captures += 1
        return _Entry(graph, x_static, out, chain)
