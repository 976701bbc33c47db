"""Data-parallel training across processes: ``torchrun --nproc-per-node N -m ebmfast train ...``.

One process ("rank") per device. What each rank does, and what they share:

- **Data.** ``batch_size`` is the number of images per iteration in total; each of the N ranks takes
  ``batch_size / N`` of them. All ranks draw the same shuffled order per epoch (``batches.TensorBatches``), so
  together they see exactly the images one process would, each image on one rank (DistributedSampler semantics).
- **Gradients.** The training forward and backward go through ``DistributedDataParallel`` (``wrap_model``), whose
  backward averages the gradients across ranks; the gradient-norm clip and Adam act on the averaged gradients, so
  the parameters stay identical on every rank. The Langevin sampler samples from the plain model.
- **Chains.** Each rank has its own replay-buffer shard (``buffer_size / N`` images, ``shard_sizes``) and its own
  random streams for the real-image noise, the buffer draws and the Langevin noise (``seed``); rank 0 draws exactly
  what a single process draws.
- **Decisions and files.** Step metrics are averaged across ranks (``reduce_mean``); epoch-end numbers (validation,
  rand_out) are rank 0's (``from_main``); stop requests and divergence verdicts are agreed by all ranks
  (``AgreedStopSignals``, ``AgreedRollback``), so every rank stops, rolls back and saves at the same iteration. Only
  rank 0 writes files (log, CSV, TensorBoard, pictures, checkpoints); a checkpoint gathers every rank's buffer shard
  and random states to rank 0 (``state.checkpoint_payload``).

The rule that keeps ranks in step: every collective runs on every rank, the same number of times, in the same order,
never inside a branch that depends on one rank's data. Per iteration that is DDP's gradient all-reduce, the metrics
mean, the stop agreement and the divergence verdict; per epoch end, the validation and rand_out broadcasts and the
checkpoint gather. (The monitor's noise score, computed inside a data-dependent branch, is therefore each rank's own,
on identical parameters; its verdict is agreed afterwards.)

Process groups: NCCL on CUDA (rank -> ``cuda:LOCAL_RANK``) with a gloo group beside it for the small CPU-side control
messages, gloo on CPU. Every collective has a time-out (``ebmfast train --dist-timeout``): a rank that dies or hangs
ends the job with ``DistributedError`` and a one-line message (exit 1) instead of a hang; torchrun then stops the
other ranks.

A non-finite iteration on one rank cannot leave the others waiting: ``ebmfast.cd.CDStep`` (run through
``Trainer.forward_model``) has no data-dependent branch around the backward, every rank runs it, and under the DDP
wrapper the skip is decided on the device from the all-reduced gradient norm alone, so all ranks decide alike.

Without a process group (a plain ``ebmfast train``, or a ``Trainer`` built without ``init_distributed``) the context
is ``DistContext()``: one rank, no collectives, and the trainer behaves exactly as it always has. Under torchrun
with one process the process group exists and the DDP path runs with a world size of 1 (checkpoints are then
ordinary one-rank checkpoints).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from datetime import timedelta
from typing import NoReturn

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import DistributedError
from .divergence import DivergenceEvent, Rollback
from .signals import StopSignals
from .state import S_GEN, S_SAMPLER, derive_seed

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "DistContext",
    "AgreedStopSignals",
    "AgreedRollback",
    "launch_env",
    "rank_device",
    "init_distributed",
    "shutdown_distributed",
    "describe_failure",
    "exit_process",
]

DEFAULT_TIMEOUT_S = 600.0  # seconds a rank waits for the others in one collective before the job ends
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_joined = False  # set once this process has joined a process group (see exit_process)

# Under DDP the whole-iteration CUDA graph must stay off: DDP launches its gradient all-reduce from autograd hooks
# with host-side bucket bookkeeping on every backward, which a replayed graph would skip (per-rank chain graphs, the
# "graph" sampler backend, are fine: they hold no collective).
ITERATION_GRAPH_UNDER_DDP = False


def _dist():
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


class DistContext:
    """Who this process is in a data-parallel run, and the collectives the trainer needs (identities on one rank).

    ``DistContext()`` is the single process: rank 0 of 1, nothing distributed. ``DistContext.current()`` describes
    the process group set up by ``init_distributed`` (or by the application), if there is one."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        backend: str | None = None,
        control_group=None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_rank = int(local_rank)
        self.backend = backend  # None: no process group
        self.control_group = control_group  # the gloo group for CPU-side messages (None: the default group)
        self.timeout_s = float(timeout_s)

    _current: DistContext | None = None  # set by init_distributed, cleared by shutdown_distributed

    @classmethod
    def current(cls) -> DistContext:
        """The running process group's context, or the single-process one when there is none."""
        if not _initialized():
            return cls()
        if cls._current is not None:
            return cls._current
        dist = _dist()  # a process group the application set up itself
        backend = str(dist.get_backend())
        control = dist.new_group(backend="gloo") if backend != "gloo" else None
        cls._current = cls(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), backend, control
        )
        return cls._current

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world_size={self.world_size}, backend={self.backend!r})"

    # ------------------------------------------------------------------------------------------ who and what
    @property
    def distributed(self) -> bool:
        """A process group is running (torchrun), even with one process."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the rank that writes files and whose epoch-end numbers everyone uses."""
        return self.rank == 0

    @property
    def iteration_graph_allowed(self) -> bool:
        """Whether the whole CD iteration may be captured in one CUDA graph: not under DDP (see
        ``ITERATION_GRAPH_UNDER_DDP``: DDP's all-reduce runs from autograd hooks that a replayed graph would skip)."""
        return not self.distributed or ITERATION_GRAPH_UNDER_DDP

    def seed(self, seed: int, attempt: int, stream: int) -> int:
        """This rank's seed of a per-rank random stream (rank 0: the single-process seed)."""
        return derive_seed(seed, attempt, stream, rank=self.rank)

    def shard_sizes(self, total: int) -> list[int]:
        """``total`` split over the ranks as evenly as possible (the first ``total % N`` ranks get one more)."""
        base, extra = divmod(int(total), self.world_size)
        return [base + (1 if r < extra else 0) for r in range(self.world_size)]

    def shard_size(self, total: int) -> int:
        return self.shard_sizes(total)[self.rank]

    def local_batch(self, batch_size: int) -> int:
        """Images per iteration on this rank; ``ValueError`` when the ranks cannot take equal shares."""
        if batch_size % self.world_size:
            raise ValueError(
                f"batch_size {batch_size} must be divisible by the {self.world_size} ranks (batch_size is the "
                f"total per iteration; each rank takes an equal share)"
            )
        return batch_size // self.world_size

    def describe(self, config) -> str:
        """One line for the run's log: ranks, backend, and what each rank holds."""
        return (
            f"data-parallel: rank {self.rank} of {self.world_size} ({self.backend}); per rank "
            f"{self.local_batch(config.batch_size)} of the {config.batch_size} images per iteration and a "
            f"replay-buffer shard of {self.shard_size(config.buffer_size)} of {config.buffer_size}"
        )

    # ------------------------------------------------------------------------------------------ the model
    def wrap_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module the training forward and backward run through: ``DistributedDataParallel(model)`` in a process
        group (its backward averages the gradients across ranks), else ``model`` itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = None
        if device.type == "cuda":
            device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
        return DistributedDataParallel(model, device_ids=device_ids)

    # ------------------------------------------------------------------------------------------ collectives
    def _collective(self, what: str, fn):
        start = time.monotonic()
        try:
            return fn()
        except RuntimeError as exc:
            if isinstance(exc, DistributedError):
                raise
            raise DistributedError(self.lost_message(what, exc, time.monotonic() - start)) from exc

    def lost_message(self, what: str, exc: BaseException | None = None, waited_s: float | None = None) -> str:
        """What happened to the other rank, as far as this one can tell: a time-out when the collective waited about
        the whole time-out (or, without a measured wait, the error says so), else a rank that died (its connection
        closed)."""
        detail = ""
        text = ""
        if exc is not None:
            lines = str(exc).strip().splitlines()
            detail = f" ({type(exc).__name__}: {lines[0][:300] if lines else ''})"
            text = str(exc).lower()
        if waited_s is not None:
            timed_out = waited_s >= 0.9 * self.timeout_s
        else:
            timed_out = any(m in text for m in ("timed out", "timeout", "watchdog"))
        if timed_out:
            how = f"another rank did not answer within the {self.timeout_s:g} s time-out"
        else:
            after = f" after {waited_s:.1f} s" if waited_s is not None else ""
            how = f"another rank died (its connection closed{after}, well before the {self.timeout_s:g} s time-out)"
        return f"rank {self.rank} of {self.world_size}: {what} failed: {how}{detail}"

    def reduce_mean(self, metrics):
        """The mean over ranks of a dict of floats (same keys on every rank) or of a device tensor (in place, on the
        default group: no host synchronisation). Identity on one process."""
        if not self.distributed:
            return metrics
        dist = _dist()
        if isinstance(metrics, torch.Tensor):
            self._collective("reducing metrics", lambda: dist.all_reduce(metrics, op=dist.ReduceOp.SUM))
            return metrics.div_(self.world_size)
        names = list(metrics)
        t = torch.tensor([float(metrics[k]) for k in names], dtype=torch.float64)
        self._collective("reducing metrics", lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.control_group))
        return dict(zip(names, t.div_(self.world_size).tolist()))

    def from_main(self, value):
        """Rank 0's float (or dict of floats, same keys on every rank), on every rank."""
        if not self.distributed:
            return value
        dist = _dist()
        names = list(value) if isinstance(value, dict) else None
        values = [float(value[k]) for k in names] if names is not None else [float(value)]
        t = torch.tensor(values, dtype=torch.float64)
        self._collective("sharing rank 0's numbers", lambda: dist.broadcast(t, src=0, group=self.control_group))
        return dict(zip(names, t.tolist())) if names is not None else float(t[0])

    def agree_max(self, value: int) -> int:
        """The largest of every rank's ``value`` (e.g. a signal number, 0 for none)."""
        if not self.distributed:
            return int(value)
        dist = _dist()
        t = torch.tensor([int(value)], dtype=torch.int64)
        self._collective(
            "agreeing on a stop", lambda: dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control_group)
        )
        return int(t[0])

    def agree_event(self, event: DivergenceEvent | None) -> DivergenceEvent | None:
        """The divergence event of the lowest rank that saw one, on every rank (None when none did). Event codes are
        positive (``divergence.REASON_CODES``); 0 stands for "none"."""
        if not self.distributed:
            return event
        if self.agree_max(event.code if event is not None else 0) == 0:
            return None
        events = self.all_gather((event.reason, event.detail) if event is not None else None)
        rank, (reason, detail) = next((r, e) for r, e in enumerate(events) if e is not None)
        return DivergenceEvent(reason, detail if rank == 0 else f"{detail} (on rank {rank})")

    def all_gather(self, obj) -> list:
        if not self.distributed:
            return [obj]
        dist = _dist()
        out = [None] * self.world_size
        self._collective("gathering", lambda: dist.all_gather_object(out, obj, group=self.control_group))
        return out

    def gather_to_main(self, obj) -> list | None:
        """Every rank's ``obj`` (picklable, CPU tensors) as a list on rank 0; None on the other ranks."""
        if not self.distributed:
            return [obj]
        dist = _dist()
        out = [None] * self.world_size if self.is_main else None
        self._collective(
            "gathering the checkpoint", lambda: dist.gather_object(obj, out, dst=0, group=self.control_group)
        )
        return out

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.distributed:
            dist = _dist()
            self._collective(what, lambda: dist.barrier(group=self.control_group))

    # ------------------------------------------------------------------------------------------ agreed decisions
    def stop_signals(self) -> StopSignals:
        return AgreedStopSignals(self) if self.distributed else StopSignals()

    def rollback(self, config) -> Rollback:
        return AgreedRollback(config, self) if self.distributed else Rollback(config)


class AgreedStopSignals(StopSignals):
    """SIGINT/SIGTERM on any rank stops every rank after the same iteration: ``requested`` is the agreement of all
    ranks (one small all-reduce per look), and a rank that did not get the signal adopts the other's."""

    def __init__(self, ctx: DistContext):
        super().__init__()
        self.ctx = ctx
        self._own = 0  # signals this process received itself (a second one stops it at once)

    @property
    def requested(self) -> bool:
        agreed = self.ctx.agree_max(self.signum or 0)
        if agreed and self.signum is None:
            self.signum = agreed
        return agreed != 0

    def _handler(self, signum, frame):
        self._own += 1
        if self._own > 1:
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum = signum
        from tqdm.auto import tqdm

        tqdm.write(
            f"[ebmfast] rank {self.ctx.rank}: {signal.Signals(signum).name}: all ranks finish this iteration, "
            "then rank 0 saves a resumable checkpoint"
        )


class _AgreedMonitor:
    """The divergence monitor with its verdicts agreed across ranks (everything else is the wrapped monitor's)."""

    def __init__(self, inner, ctx: DistContext):
        self.__dict__["_inner"] = inner
        self.__dict__["_ctx"] = ctx

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __setattr__(self, name, value):
        setattr(self._inner, name, value)

    def check_step(self, *args, **kwargs):
        return self._ctx.agree_event(self._inner.check_step(*args, **kwargs))

    def check_epoch(self, *args, **kwargs):
        return self._ctx.agree_event(self._inner.check_epoch(*args, **kwargs))


class AgreedRollback(Rollback):
    """``Rollback`` for a data-parallel run: every rank sees the same divergence verdict (the lowest rank's), so all
    roll back together to their own snapshot of the same iteration; afterwards each rank reseeds its own streams."""

    def __init__(self, config, ctx: DistContext):
        super().__init__(config)
        self.ctx = ctx
        self.monitor = _AgreedMonitor(self.monitor, ctx)

    def recover(self, trainer, event) -> None:
        super().recover(trainer, event)  # reseeds as rank 0 does (or raises DivergenceError on every rank)
        attempt, seed = trainer.recoveries, self.config.seed
        trainer.sampler.manual_seed(self.ctx.seed(seed, attempt, S_SAMPLER))
        trainer.gen.manual_seed(self.ctx.seed(seed, attempt, S_GEN))


# ---------------------------------------------------------------------------------------------- set-up / tear-down
def launch_env() -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` from torchrun's environment, or None when not launched by torchrun."""
    if not all(k in os.environ for k in _ENV):
        return None
    try:
        rank, world, local = (int(os.environ[k]) for k in _ENV)
    except ValueError:
        raise ValueError(
            "RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun), got "
            + ", ".join(f"{k}={os.environ[k]!r}" for k in _ENV)
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}")
    return rank, world, local


def rank_device(device, local_rank: int, world_size: int) -> torch.device:
    """This rank's device: ``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` (one GPU per rank), ``cpu`` -> cpu.
    ``ValueError`` for an explicit ``cuda:N`` with several ranks and for more ranks per machine than GPUs."""
    if device is None or str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device)
    if dev.type != "cuda":
        return dev
    if dev.index is not None:
        if world_size > 1:
            raise ValueError(
                f"--device {device}: under torchrun each rank uses cuda:LOCAL_RANK; give --device cuda (or auto)"
            )
        return dev
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"LOCAL_RANK {local_rank}, but this machine has {count} CUDA device(s): start at most {count} processes "
            f"per machine (torchrun --nproc-per-node {count})"
        )
    return torch.device("cuda", local_rank)


def init_distributed(device="auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[DistContext, torch.device]:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) and return ``(context, this rank's device)``.

    Not launched by torchrun: ``(DistContext(), resolve_device(device))``, nothing initialised. ``ValueError`` for
    a bad device or environment (before anything is started)."""
    if not timeout_s > 0:
        raise ValueError(f"the distributed time-out must be > 0 seconds, got {timeout_s!r}")
    env = launch_env()
    if env is None:
        return DistContext(), resolve_device(device)
    rank, world, local = env
    dev = rank_device(device, local, world)
    dist = _dist()
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run without torchrun")
    timeout = timedelta(seconds=float(timeout_s))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        try:
            dist.init_process_group("nccl", timeout=timeout, device_id=dev)
        except TypeError:  # torch without device_id=
            dist.init_process_group("nccl", timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout)
        backend = "nccl"
    else:
        dist.init_process_group("gloo", timeout=timeout)
        control, backend = None, "gloo"
    global _joined
    _joined = True
    ctx = DistContext(rank, world, local, backend, control, timeout_s)
    DistContext._current = ctx
    return ctx, dev


def shutdown_distributed(ctx: DistContext, wait: bool = True) -> None:
    """Leave the process group. ``wait``: first wait until every rank is done (no rank exits while another still
    writes a checkpoint); skip it after a failure."""
    if not ctx.distributed or not _initialized():
        return
    try:
        if wait:
            ctx.barrier("waiting for the other ranks to finish")
    finally:
        try:
            _dist().destroy_process_group()
        except Exception:  # after a lost rank the group may already be broken
            pass
        DistContext._current = None


def exit_process(code: int) -> NoReturn:
    """End the process with exit code ``code`` (the command line's last step). A process that joined a process group
    flushes stdout and stderr and leaves with ``os._exit``, skipping interpreter finalization: there, tensors still
    held by gloo's worker threads can abort the process (SIGABRT) after its checkpoint is written, which made a clean
    stop look like a crashed rank. Its files are closed by then (the trainer closes them before ``main`` returns)."""
    if _joined:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said on it
                pass
        os._exit(code)
    sys.exit(code)


_FAILURE_MARKERS = (
    "gloo",
    "nccl",
    "connection reset",
    "connection closed",
    "connection refused",
    "broken pipe",
    "timed out",
    "timeout",
    "watchdog",
    "processgroup",
)


def describe_failure(exc: BaseException, ctx: DistContext) -> str | None:
    """A one-line message when ``exc`` means that another rank is gone (a ``DistributedError``, or an error from a
    collective, e.g. DDP's gradient all-reduce in backward); None for anything else."""
    if not ctx.distributed:
        return None
    if isinstance(exc, DistributedError):
        return str(exc)
    dist = _dist()
    dist_error = getattr(dist, "DistError", None)
    text = str(exc).lower()
    if (dist_error is not None and isinstance(exc, dist_error)) or (
        isinstance(exc, RuntimeError) and any(m in text for m in _FAILURE_MARKERS)
    ):
        return ctx.lost_message("training", exc)
    return None
