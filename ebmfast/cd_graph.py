"""A whole contrastive-divergence iteration (``ebmfast.cd.CDStep``) captured in one CUDA graph and replayed.

One replay = buffer draw, the K-step Langevin chain (recorded inline: a sampler called during a capture does not
capture a graph of its own), the forward on ``cat(real, fake)``, backward, gradient-norm clip, the optimizer step
(``capturable=True``, learning rate a device tensor) and the buffer write-back, with the non-finite guard of
``CDStep``. Everything the graph reads lives at a fixed address: the real batch is copied into a static input,
the metrics come out in a static tensor (copy them before the next replay), and the random streams advance on the
device (the sampler's (seed, counter) tensor; torch generators registered with the graph).

Capture happens on the first call and again whenever something it bakes in changes: the batch shape or dtype,
the identity, shape or storage of a parameter, model buffer or optimizer-state tensor (``optimizer.load_state_dict``
replaces them: resume and divergence roll-back re-capture), the learning-rate tensors, the replay buffer's
storage, or the sampler's settings. The warm-up iterations that capture needs run for real, so the training state
is saved before them and put back in place afterwards: the first replay is the next real iteration.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .cd import CDStep
from .graph import capture_stream

__all__ = ["CDGraph", "TrainingState", "graph_ready_optimizer"]


def graph_ready_optimizer(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer`` cannot be stepped inside a CUDA graph, or None: it must be ``capturable`` and hold its
    learning rates as device tensors (a Python float would be baked into the graph, so a schedule would not be
    seen)."""
    if not optimizer.defaults.get("capturable", False):
        return f"{type(optimizer).__name__} was not built with capturable=True"
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if not isinstance(lr, torch.Tensor) or lr.device.type != "cuda":
            return f"param group {i}: lr must be a CUDA tensor (got {type(lr).__name__}) so a schedule can update it"
    return None


class TrainingState:
    """Everything one CD iteration changes, saved and put back *in place* (tensor identities kept, so a captured
    graph stays valid): parameters and model buffers, optimizer state (tensors the saved state did not have, e.g.
    Adam's moments before its first step, go back to zeros, their initial value), the replay buffer's rows and
    pointer, the sampler's noise counters and the torch generators' states."""

    def __init__(self, step: CDStep) -> None:
        self.step = step
        self._saved: dict | None = None

    def _generators(self) -> list[torch.Generator]:
        gens = [self.step.generator, self.step.buffer.generator]
        out: list[torch.Generator] = []
        for g in gens:
            if g is not None and all(g is not o for o in out):
                out.append(g)
        return out

    def _opt_tensors(self) -> dict[tuple[int, str], torch.Tensor]:
        out = {}
        for i, p in enumerate(self.step.params):
            for k, v in self.step.optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[(i, k)] = v
        return out

    @torch.no_grad()
    def save(self) -> None:
        model, buffer, sampler = self.step.model, self.step.buffer, self.step.sampler
        rng = sampler.rng_state(buffer.device)  # the chains' noise counter (created now if no chain ran yet)
        self._saved = {
            "model": [(t, t.detach().clone()) for t in list(model.parameters()) + list(model.buffers())],
            "opt": {k: (t, t.clone()) for k, t in self._opt_tensors().items()},
            "buffer": (buffer.storage.clone(), buffer.ptr.clone()),
            "buffer_rng": buffer.rng.clone() if getattr(buffer, "rng", None) is not None else None,
            "rng": (rng, rng.clone()),
            "generators": [(g, g.get_state()) for g in self._generators()],
            "training": model.training,
        }

    @torch.no_grad()
    def restore(self) -> None:
        if self._saved is None:
            raise RuntimeError("TrainingState.restore() before save()")
        s = self._saved
        for t, copy in s["model"]:
            t.copy_(copy)
        for key, t in self._opt_tensors().items():
            saved = s["opt"].get(key)
            if saved is not None:
                t.copy_(saved[1])
            else:  # created after save() (e.g. by the first optimizer step)
                t.zero_()
        storage, ptr = s["buffer"]
        self.step.buffer.storage.copy_(storage)
        self.step.buffer.ptr.copy_(ptr)
        if s["buffer_rng"] is not None:
            self.step.buffer.rng.copy_(s["buffer_rng"])
        rng, copy = s["rng"]
        rng.copy_(copy)
        for g, state in s["generators"]:
            g.set_state(state)
        self.step.model.train(s["training"])


class CDGraph:
    """``CDStep`` as one CUDA graph: ``metrics = graph(real)`` runs one training iteration by a single replay.

    The returned metrics tensor is the graph's static output: copy it (``.clone()`` or into a history buffer, both
    without a host synchronisation) before the next call. ``captures`` counts captures (tests read it)."""

    def __init__(self, step: CDStep, warmup: int = 2) -> None:
        reason = graph_ready_optimizer(step.optimizer)
        if reason is not None:
            raise ValueError(f"CDGraph needs a graph-ready optimizer: {reason}")
        if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            raise RuntimeError("CDGraph needs torch.cuda.CUDAGraph.register_generator_state (torch >= 2.5)")
        self.step = step
        self.warmup = int(warmup)
        self.state = TrainingState(step)
        self.captures = 0
        self.capture_failed = False  # the last capture raised (the training state was put back first)
        self._key: tuple | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._real: torch.Tensor | None = None
        self._metrics: torch.Tensor | None = None

    def key(self, real: torch.Tensor) -> tuple:
        step = self.step
        s = step.sampler

        def ids(tensors: Iterable[torch.Tensor]) -> tuple:
            return tuple((t.data_ptr(), tuple(t.shape), t.dtype) for t in tensors)

        model = step.model
        return (
            tuple(real.shape),
            real.dtype,
            real.device,
            ids(list(model.parameters()) + list(model.buffers())),
            ids(self.state._opt_tensors().values()),
            tuple(g["lr"].data_ptr() for g in step.optimizer.param_groups),
            step.buffer.storage.data_ptr(),
            (s.backend, s.steps, s.step_size, s.noise_std, s.grad_clip, s.clamp, s.precision),
            (step.alpha, step.real_noise_std, step.grad_norm_clip),
        )

    def invalidate(self) -> None:
        """Drop the captured graph (the next call captures again)."""
        self._graph = self._real = self._metrics = None
        self._key = None

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        if real.device.type != "cuda":
            raise ValueError(f"CDGraph runs on CUDA tensors, got {real.device}")
        if self._graph is None or self.key(real) != self._key:
            self._capture(real)
        self._real.copy_(real)
        self._graph.replay()
        return self._metrics

    def _capture(self, real: torch.Tensor) -> None:
        """Capture, or raise with the training state put back as it was before the call (the warm-up iterations
        run for real), so that a caller can fall back to the uncaptured step."""
        self.invalidate()
        self.capture_failed = True
        self.state._saved = None
        try:
            self._capture_now(real)
        except BaseException:
            if self.state._saved is not None:
                try:
                    self.state.restore()
                except Exception:  # a broken device: keep the capture's own error
                    pass
            self.invalidate()
            raise
        self.capture_failed = False

    def _capture_now(self, real: torch.Tensor) -> None:
        step = self.step
        self._real = torch.empty_like(real, memory_format=torch.contiguous_format)
        self._real.copy_(real)
        self.state.save()
        side = capture_stream(real.device)
        side.wait_stream(torch.cuda.current_stream(real.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):  # creates the optimizer state, compiles, picks algorithms
                step(self._real)
        torch.cuda.current_stream(real.device).wait_stream(side)
        self.state.restore()  # the warm-up iterations did not happen
        self.state.save()  # (now including the optimizer state the warm-up created, at its initial values)
        graph = torch.cuda.CUDAGraph()
        for g in self.state._generators():
            if g.device.type == "cuda":
                graph.register_generator_state(g)
        step.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph, stream=side):
            metrics = step(self._real)
        self.state.restore()
        self._graph, self._metrics = graph, metrics
        self._key = self.key(real)
        self.captures += 1
