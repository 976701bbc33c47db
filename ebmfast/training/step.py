"""How the trainer runs its iterations: the seed's CD iteration is ``ebmfast.cd.CDStep`` (written once, shared with
the training benchmark and the README example); this module decides whether it is replayed as one CUDA graph
(``ebmfast.cd_graph.CDGraph``), builds the optimizer that decision needs, and keeps each iteration's metrics on the
device until the trainer copies them to the host.

No host synchronisation inside an iteration on CUDA. The step returns its metrics as a device tensor and skips a
non-finite update on the device; ``StepHistory`` collects those tensors (plus the divergence monitor's f(noise) at
gap-check iterations) in one device buffer, and the trainer reads it with a single copy every ``sync_every``
iterations ("a flush"): then the CSV, TensorBoard, the progress bar, callbacks and the divergence monitor see every
iteration, in order.

The whole-iteration graph (``TrainConfig.iteration_graph``, on by default, CUDA only) needs ``Adam(capturable=True)``
with its learning rate as a device tensor that the per-epoch schedule writes in place; on CUDA the trainer always
builds its optimizer that way (``build_optimizer``), so an iteration computes the same numbers captured or not, and a
fall-back needs no new optimizer. ``adopt_optimizer`` puts the run's lr tensors and flags back after
``optimizer.load_state_dict`` (resume, divergence roll-back), which replaces the param groups. Where the graph cannot
be used, ``iteration_graph_reason`` says why and the trainer logs it; a capture that fails at run time also falls
back to the uncaptured step, with the error logged.
"""

from __future__ import annotations

import torch

from ..cd import CD_METRICS, CDStep

__all__ = [
    "STEP_METRICS",
    "CPU_SYNC_EVERY",
    "CUDA_SYNC_EVERY",
    "UNCAPTURED_BACKENDS",
    "resolve_sync_every",
    "iteration_graph_reason",
    "build_optimizer",
    "adopt_optimizer",
    "IterationRunner",
    "StepHistory",
]

# Logged for every iteration (``update_skipped`` is logged only when it is 1: a non-finite iteration).
STEP_METRICS = tuple(m for m in CD_METRICS if m != "update_skipped")

# Iterations between host copies of the step metrics when ``TrainConfig.sync_every`` is None (the trainer flushes at
# every sync_every-th iteration). On CPU every operation has finished when it returns, so a copy costs nothing and 1
# keeps detection immediate (measured: docs/quick_preset.md). On CUDA a copy waits for the queued work, after which the
# GPU idles while the host logs and queues the next iteration; every 10th iteration makes that one wait per 10, falls
# on the gap-check iterations (every 10) and the snapshots (every 50), and leaves a divergence undetected for at most
# 9 iterations.
CPU_SYNC_EVERY = 1
CUDA_SYNC_EVERY = 10

# Sampler backends whose chain is the reference loop (autograd or a torch.compile'd gradient per step): not recorded
# inside a whole-iteration CUDA graph (never tested captured, and the loop checks its input on the host).
UNCAPTURED_BACKENDS = ("eager", "compiled")


def resolve_sync_every(config, device: torch.device) -> int:
    if config.sync_every is not None:
        return int(config.sync_every)
    return CUDA_SYNC_EVERY if torch.device(device).type == "cuda" else CPU_SYNC_EVERY


def iteration_graph_reason(config, device: torch.device, sampler_backend: str) -> str | None:
    """Why the trainer's iteration cannot be one CUDA graph (``None``: it can). ``sampler_backend`` is the resolved
    backend (``resolve_backend``)."""
    device = torch.device(device)
    if not config.iteration_graph:
        return "turned off (TrainConfig.iteration_graph=False, --no-iteration-graph)"
    if device.type != "cuda":
        return f"not on {device.type} (CUDA graphs need a CUDA device)"
    if sampler_backend in UNCAPTURED_BACKENDS:
        return (
            f"sampler backend {sampler_backend!r} runs the reference loop, which is not captured inside an iteration "
            "graph (use 'graph', 'fused' or 'auto')"
        )
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        return f"torch {torch.__version__} has no CUDAGraph.register_generator_state (torch >= 2.5 needed)"
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_world_size() > 1:
            return "distributed training: the gradient all-reduce is not captured in the iteration graph"
    return None


def build_optimizer(params, config, device: torch.device) -> torch.optim.Adam:
    """The seed's Adam. On CUDA ``capturable=True`` with the lr as a device tensor (what a captured iteration needs;
    uncaptured it computes the same), elsewhere the plain optimizer with a float lr."""
    if torch.device(device).type == "cuda":
        lr = torch.tensor(float(config.lr), dtype=torch.float32, device=device)
        return torch.optim.Adam(params, lr=lr, betas=config.betas, capturable=True)
    return torch.optim.Adam(params, lr=config.lr, betas=config.betas)


def adopt_optimizer(
    optimizer: torch.optim.Optimizer, lr_tensors: list[torch.Tensor] | None, capturable: bool = False
) -> None:
    """Make ``optimizer``'s param groups use the run's learning-rate tensors again (their values copied in place)
    after ``load_state_dict`` or a scheduler step replaced them; ``lr_tensors=None``: a plain float lr.

    Also sets ``capturable`` back to the run's (a checkpoint written on the other kind of device carries the other
    flag) and, when capturable, moves Adam's ``step`` counters to the parameters' device (``load_state_dict`` leaves
    them on the CPU when the saved groups were not capturable)."""
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if lr_tensors is not None:
            mine = lr_tensors[i]
            if lr is not mine:
                mine.fill_(float(lr))  # a host value (or a tensor read once): outside the iteration
                group["lr"] = mine
        elif isinstance(lr, torch.Tensor):
            group["lr"] = float(lr)
        if "capturable" in group:
            group["capturable"] = capturable
        if capturable:
            for p in group["params"]:
                state = optimizer.state.get(p)
                step = state.get("step") if state else None
                if isinstance(step, torch.Tensor) and step.device != p.device:
                    state["step"] = step.to(device=p.device, dtype=torch.float32)


class IterationRunner:
    """``metrics = runner(real)``: one CD iteration, replayed as a ``CDGraph`` when ``graph_reason`` is None, else
    the uncaptured ``CDStep``. The metrics tensor may be the graph's static output: copy it before the next call
    (``StepHistory.record`` does).

    A capture that raises (``CDGraph`` then puts the training state back as it was) switches to the uncaptured step
    for the rest of the run; ``on_fallback(message)`` is told why."""

    def __init__(self, step: CDStep, graph_reason: str | None, on_fallback=None):
        self.step = step
        self.graph = None
        self.reason = graph_reason
        self.on_fallback = on_fallback
        if graph_reason is None:
            from ..cd_graph import CDGraph, graph_ready_optimizer

            not_ready = graph_ready_optimizer(step.optimizer)
            if not_ready is not None:
                self.reason = f"the optimizer is not graph-ready ({not_ready})"
            else:
                self.graph = CDGraph(step)

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def describe(self) -> str:
        if self.graph is not None:
            return "the whole iteration as one CUDA graph (CDGraph)"
        return f"uncaptured CDStep (iteration graph: {self.reason})"

    def invalidate(self) -> None:
        """Drop a captured graph (after resume or roll-back; it would also notice the replaced optimizer state)."""
        if self.graph is not None:
            self.graph.invalidate()

    def __call__(self, real: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            try:
                return self.graph(real)
            except Exception as exc:
                if not self.graph.capture_failed:
                    raise
                self.graph = None
                self.reason = f"capture failed ({type(exc).__name__}: {exc})"
                if self.on_fallback is not None:
                    self.on_fallback(f"iteration graph: {self.reason}; continuing with the uncaptured CDStep")
        return self.step(real)


class StepHistory:
    """The step metrics of the iterations since the last flush, on the device: row k = ``CD_METRICS`` of the k-th
    iteration and, in the last column, the monitor's mean f(noise) where that iteration had a gap check (NaN
    elsewhere). float64, so float32 metrics come back exactly as they were computed."""

    def __init__(self, size: int, device: torch.device):
        self.size = int(size)
        self.buf = torch.full((self.size, len(CD_METRICS) + 1), float("nan"), dtype=torch.float64, device=device)
        self.iterations: list[int] = []
        self.checked: list[bool] = []

    def __len__(self) -> int:
        return len(self.iterations)

    @property
    def full(self) -> bool:
        return len(self.iterations) >= self.size

    def record(self, iteration: int, metrics: torch.Tensor, noise_out=None) -> None:
        """Copy one iteration's metrics (a device tensor in ``CD_METRICS`` order) into the next row, on the device.
        ``noise_out``: the gap check's mean f(noise), a 0-d tensor or a number, or None."""
        if self.full:
            raise RuntimeError(f"StepHistory holds {self.size} iterations: read() it first")
        row = self.buf[len(self.iterations)]
        row[: len(CD_METRICS)].copy_(metrics)
        if noise_out is not None:
            if isinstance(noise_out, torch.Tensor):
                row[-1].copy_(noise_out)
            else:
                row[-1].fill_(float(noise_out))
        self.iterations.append(int(iteration))
        self.checked.append(noise_out is not None)

    def read(self) -> list[tuple[int, dict[str, float], float | None]]:
        """``(iteration, metrics, noise_out or None)`` per recorded iteration, oldest first; one host copy (the
        flush's synchronisation). Empties the history."""
        n = len(self.iterations)
        if n == 0:
            return []
        rows = self.buf[:n].tolist()
        out = [
            (it, dict(zip(CD_METRICS, row[: len(CD_METRICS)])), row[-1] if checked else None)
            for it, row, checked in zip(self.iterations, rows, self.checked)
        ]
        self.iterations, self.checked = [], []
        return out
