"""Divergence detection and roll-back for contrastive-divergence training.

The seed warns that EBM training "often diverges" and that the fix is to reload an earlier checkpoint and continue
with another seed by hand. ``DivergenceMonitor`` decides when that is needed; ``SnapshotRing`` keeps the last good
training states in memory; ``Rollback`` wires them into a run: on detection it restores the latest good snapshot,
reseeds the sampler, the replay buffer / noise generator and the data order (``state.derive_seed`` with the retry
number), multiplies the learning rate by ``recovery_lr_factor``, logs the event and goes on, at most
``max_recoveries`` times per run; then it raises ``DivergenceError``.

When it is checked: the trainer copies step metrics to the host every ``sync_every`` iterations (1 on CPU, 10 on CUDA
by default) and runs ``check_step`` on each of them, in order, at that flush. A divergence is therefore acted on up to
``sync_every - 1`` iterations after the iteration that shows it; the iterations run meanwhile are dropped with the
roll-back, which goes to the newest snapshot exactly as before (snapshots are only taken right after a flush whose
iterations all passed). The gap check's f(noise) is computed on the device at the check iteration itself and read at
the flush, so the check sees the same numbers whatever ``sync_every`` is.

What counts as divergence (``f`` = model output = -energy; real = data batch, fake = Langevin samples, noise =
a fixed batch of U(-1, 1) images):

- ``non_finite``: loss, mean f(real), mean f(fake) or the gradient norm is NaN or inf (checked for every iteration;
  the step has then skipped that iteration's update on the device), or a validation metric is (checked every epoch).
- ``energy_explosion``: |mean f(real)| or |mean f(fake)| exceeds ``energy_limit``. The alpha regulariser keeps the
  seed's energies small (its 60-epoch run ends with rand_out = -16.3 and data near 0).
- ``gap_collapse``, checked every ``check_every`` iterations once the data-minus-noise gap ``f(real) - f(noise)`` has
  reached ``min_gap`` (the model has learnt something), either
  - the model stops telling data from noise: the gap falls below ``ratio`` x the largest gap seen so far, or
  - samples score like noise: ``f(fake) - f(noise) < ratio x (f(real) - f(noise))``,
  for ``patience`` consecutive checks.
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass

import torch

from ..errors import DivergenceError
from ..validation import check_int
from .state import S_DATA, S_GEN, S_SAMPLER, derive_seed, restore_run_state, run_state

__all__ = ["DivergenceEvent", "DivergenceMonitor", "SnapshotRing", "Rollback", "REASON_CODES", "params_finite"]

# Numeric codes so that events fit the numeric metrics log (metric "divergence/event").
REASON_CODES = {"non_finite": 1, "energy_explosion": 2, "gap_collapse": 3}


@dataclass
class DivergenceEvent:
    reason: str  # a key of REASON_CODES
    detail: str  # human-readable: which quantity, its value, the threshold

    @property
    def code(self) -> int:
        return REASON_CODES[self.reason]


class DivergenceMonitor:
    def __init__(
        self,
        energy_limit: float = 1000.0,
        check_every: int = 10,
        patience: int = 3,
        ratio: float = 0.2,
        min_gap: float = 1.0,
    ):
        if not (isinstance(energy_limit, (int, float)) and energy_limit > 0 and math.isfinite(energy_limit)):
            raise ValueError(f"energy_limit must be a finite number > 0, got {energy_limit!r}")
        check_every, patience = check_int(check_every, "check_every"), check_int(patience, "patience")
        if not (isinstance(ratio, (int, float)) and 0 <= ratio < 1):
            raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
        if not (isinstance(min_gap, (int, float)) and min_gap > 0 and math.isfinite(min_gap)):
            raise ValueError(f"min_gap must be a finite number > 0, got {min_gap!r}")
        self.energy_limit = float(energy_limit)
        self.check_every = check_every
        self.patience = patience
        self.ratio = float(ratio)
        self.min_gap = float(min_gap)
        self.best_gap = -math.inf  # largest data-minus-noise gap seen (the reference for "collapse")
        self.strikes = 0  # consecutive failing gap checks
        self.last_gap_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------- checks
    def check_step(self, iteration: int, metrics: dict[str, float], noise_out=None) -> DivergenceEvent | None:
        """Check one training step's metrics. ``noise_out``: a callable returning mean f(noise batch), called only
        on gap-check iterations (it costs a forward pass)."""
        for key in ("loss", "metrics_avg_real", "metrics_avg_fake", "grad_norm"):
            v = metrics.get(key)
            if v is not None and not math.isfinite(v):
                return DivergenceEvent("non_finite", f"{key} = {v} at iteration {iteration}")
        for key in ("metrics_avg_real", "metrics_avg_fake"):
            v = metrics.get(key)
            if v is not None and abs(v) > self.energy_limit:
                return DivergenceEvent(
                    "energy_explosion",
                    f"|{key}| = {abs(v):.4g} > energy_limit {self.energy_limit:g} at iteration {iteration}",
                )
        if noise_out is None or iteration % self.check_every:
            return None
        return self._check_gap(iteration, metrics["metrics_avg_real"], metrics["metrics_avg_fake"], float(noise_out()))

    def _check_gap(self, iteration: int, real: float, fake: float, noise: float) -> DivergenceEvent | None:
        if not math.isfinite(noise):
            return DivergenceEvent("non_finite", f"mean f(noise) = {noise} at iteration {iteration}")
        gap = real - noise
        sample_gap = fake - noise
        self.last_gap_metrics = {
            "divergence/noise_out": noise,
            "divergence/data_noise_gap": gap,
            "divergence/sample_noise_gap": sample_gap,
        }
        armed = self.best_gap >= self.min_gap
        self.best_gap = max(self.best_gap, gap)
        if not armed:
            return None
        failing = None
        if gap < self.ratio * self.best_gap:
            failing = (
                f"data-minus-noise energy gap {gap:.4g} fell below {self.ratio:g} x its best "
                f"{self.best_gap:.4g} (the model no longer tells data from noise)"
            )
        elif gap >= self.min_gap and sample_gap < self.ratio * gap:
            failing = (
                f"samples score like noise: f(sample) - f(noise) = {sample_gap:.4g} < {self.ratio:g} x "
                f"(f(data) - f(noise) = {gap:.4g})"
            )
        if failing is None:
            self.strikes = 0
            return None
        self.strikes += 1
        if self.strikes >= self.patience:
            self.strikes = 0
            return DivergenceEvent("gap_collapse", f"{failing}, {self.patience} checks in a row, iteration {iteration}")
        return None

    def check_epoch(self, epoch: int, metrics: dict[str, float]) -> DivergenceEvent | None:
        for key, v in metrics.items():
            if not math.isfinite(v):
                return DivergenceEvent("non_finite", f"{key} = {v} at the end of epoch {epoch}")
        return None

    def reset(self) -> None:
        """After a roll-back: forget the strike count (the reference gap is kept: it was reached honestly)."""
        self.strikes = 0

    def state_dict(self) -> dict:
        return {"best_gap": self.best_gap, "strikes": self.strikes}

    def load_state_dict(self, state: dict) -> None:
        self.best_gap = float(state["best_gap"])
        self.strikes = int(state["strikes"])


def params_finite(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


class SnapshotRing:
    """The last ``keep`` good training states, deep-copied to CPU memory.

    ``rollback_target()`` returns the newest one; if a roll-back to that same snapshot has already failed (no newer
    snapshot was taken since), the newest is dropped and the one before is used, so a snapshot that itself sits
    on the way to divergence is not retried forever."""

    def __init__(self, keep: int = 2):
        self._ring: deque = deque(maxlen=keep)
        self._used_newest = False

    def __len__(self) -> int:
        return len(self._ring)

    def take(self, iteration: int, state: dict) -> None:
        self._ring.append((iteration, _to_cpu_copy(state)))
        self._used_newest = False

    def rollback_target(self) -> tuple[int, dict]:
        if not self._ring:
            raise DivergenceError("no good snapshot to roll back to")
        if self._used_newest and len(self._ring) > 1:
            self._ring.pop()
        self._used_newest = True
        iteration, state = self._ring[-1]
        return iteration, copy.deepcopy(state)


def _to_cpu_copy(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu_copy(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


class Rollback:
    """A run's divergence handling: the monitor, the ring of good snapshots, and the roll-back itself.

    ``snapshot(trainer)`` keeps the trainer's current state when its weights are finite; ``recover(trainer, event)``
    restores the newest good snapshot, reseeds the run's streams with the retry number, multiplies the learning rate
    by ``recovery_lr_factor`` and logs what it did, or raises ``DivergenceError`` once ``max_recoveries`` is spent.
    The retry count and lr scale live on the trainer (``recoveries``, ``lr_scale``): they are part of its state."""

    def __init__(self, config):
        self.config = config
        self.monitor = DivergenceMonitor(
            config.energy_limit,
            config.collapse_check_every,
            config.collapse_patience,
            config.collapse_ratio,
            config.collapse_min_gap,
        )
        self.snapshots = SnapshotRing(keep=2)

    def snapshot(self, trainer) -> None:
        if params_finite(trainer.model):
            state = {"model": trainer.model.state_dict(), "trainer": run_state(trainer, include_global_rng=False)}
            self.snapshots.take(trainer.iteration, state)

    def recover(self, trainer, event: DivergenceEvent) -> None:
        cfg = self.config
        trainer.recoveries += 1
        record = {
            "iteration": trainer.iteration,
            "epoch": trainer.epoch,
            "reason": event.reason,
            "detail": event.detail,
        }
        trainer.events.append(record)
        trainer.metrics.log(
            trainer.iteration,
            trainer.epoch,
            {"divergence/event": event.code, "divergence/recoveries": trainer.recoveries},
        )
        trainer.note(f"divergence detected ({event.reason}): {event.detail}", warn=True, echo=True)
        if trainer.recoveries > cfg.max_recoveries:
            where = trainer.checkpoint_path("last")
            raise DivergenceError(
                f"training diverged {trainer.recoveries} times (max_recoveries={cfg.max_recoveries}); last: "
                f"{event.reason}: {event.detail}. Last good checkpoint: {where if where and where.exists() else 'none'}"
                ". Try a lower --lr, another --seed or a larger alpha"
            )
        target_iter, state = self.snapshots.rollback_target()
        recoveries, lr_scale = trainer.recoveries, trainer.lr_scale * cfg.recovery_lr_factor
        trainer.model.load_state_dict(state["model"])
        restore_run_state(trainer, state["trainer"], restore_global_rng=False)
        trainer.state_restored()  # the lr tensors back into the new param groups; the iteration graph re-captured
        trainer.recoveries = recoveries
        set_lr_scale(trainer, lr_scale)
        attempt = trainer.recoveries
        trainer.sampler.manual_seed(derive_seed(cfg.seed, attempt, S_SAMPLER))
        trainer.gen.manual_seed(derive_seed(cfg.seed, attempt, S_GEN))
        trainer.batches.generator.manual_seed(derive_seed(cfg.seed, attempt, S_DATA))
        self.monitor.reset()
        lr = float(trainer.optimizer.param_groups[0]["lr"])
        trainer.note(
            f"rolled back to iteration {target_iter} (epoch {trainer.epoch}), reseeded (attempt {attempt}), "
            f"lr now {lr:.3g}; recovery {trainer.recoveries}/{cfg.max_recoveries}",
            warn=True,
            echo=True,
        )
        trainer.metrics.log(trainer.iteration, trainer.epoch, {"divergence/rollback_to": target_iter, "lr": lr})


def set_lr_scale(trainer, new_scale: float) -> None:
    """lr = config.lr * new_scale * lr_gamma ** (epochs stepped), recomputed from the schedule rather than taken from
    the restored optimizer state (a spike that set the lr by hand must not survive the roll-back). An lr held in a
    device tensor (what a captured iteration reads) is written in place."""
    base = trainer.config.lr * new_scale
    lr = base * trainer.config.lr_gamma**trainer.scheduler.last_epoch
    for group in trainer.optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
        group["initial_lr"] = base
    trainer.scheduler.base_lrs = [base for _ in trainer.optimizer.param_groups]
    trainer.scheduler._last_lr = [lr for _ in trainer.optimizer.param_groups]
    trainer.lr_scale = new_scale
