"""Contrastive-divergence training of an energy model (the seed's recipe), as a plain PyTorch loop, and the
``ebmfast train`` command.

One iteration (``Trainer.train_step``), as in the seed's ``DeepEnergyModel.training_step``:
real <- clamp(real + N(0, 0.005^2)); fake <- LangevinSampler(replay_buffer.draw(B)); one forward on cat(real, fake);
reg = alpha * mean(real_out^2 + fake_out^2); cdiv = mean(fake_out) - mean(real_out); loss = reg + cdiv; Adam step
after gradient-norm clipping; the chains go back into the buffer. Every epoch: validation (held-out images vs
U(-1, 1) noise), rand_out (mean score of 1,024 noise images), StepLR, checkpoints (best by val_contrastive_divergence,
and last), callbacks; every ``sample_every`` epochs PNG grids of chains from noise and of buffer images.

Output layout under ``out_dir``::

    config.json            the TrainConfig
    metrics.csv            step,epoch,metric,value,wall_time (long format; ebmfast.logging_utils)
    train.log              the run's text log (events: resume, roll-backs, interruptions)
    tb/                    TensorBoard scalars and grids
    checkpoints/last.pt    resumable: model, optimizer, scheduler, buffer, sampler, data order, RNG states
    checkpoints/best.pt    the same, at the epoch with the lowest val_contrastive_divergence
    samples/generation_epochNNN.png   rows = chains from noise, columns = every gen_show_every-th step
    samples/buffer_epochNNN.png       random replay-buffer images

Reliability (issue 6): divergence is detected and rolled back (``ebmfast.divergence``); checkpoints are atomic
(``ebmfast.checkpoint``); SIGINT/SIGTERM save a resumable checkpoint and stop; ``--resume`` continues bit-exactly
on CPU (every random stream the run uses is in the checkpoint; epoch-end work uses its own seeded generators so it
never disturbs the training streams).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .buffer import ReplayBuffer
from .checkpoint import CheckpointError, build_model, load_checkpoint, model_record, remove_stale_temps, save_checkpoint
from .cli import UsageError
from .config import PRESETS, TrainConfig
from .data import DataSplits, TensorBatches, load_dataset
from .divergence import DivergenceError, DivergenceEvent, DivergenceMonitor, SnapshotRing, derive_seed, params_finite
from .logging_utils import MetricsLogger, RunLog
from .models import CNNModel
from .sampler import LangevinSampler, resolve_backend

__all__ = ["Trainer", "FitResult", "resolve_device", "add_arguments", "run", "STEP_METRICS", "VAL_METRICS"]

STEP_METRICS = ("loss", "loss_regularization", "loss_contrastive_divergence", "metrics_avg_real", "metrics_avg_fake")
VAL_METRICS = ("val_contrastive_divergence", "val_real_out", "val_fake_out")
IMAGE_SHAPE = (1, 28, 28)

# Independent random streams of a run, each seeded with derive_seed(seed, attempt, stream).
_S_GEN, _S_SAMPLER, _S_DATA, _S_MONITOR = 1, 2, 3, 5
_S_VAL, _S_RANDOUT, _S_VIS, _S_VIS_START, _S_VIS_BUF = 1000, 2000, 3000, 4000, 5000  # + epoch


def resolve_device(device=None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU. A CUDA device on a machine without one is an error."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for CUDA, but torch.cuda.is_available() is False here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return dev


@dataclass
class FitResult:
    status: str  # "completed" | "max_iterations" | "interrupted"
    epoch: int  # epochs fully done
    iteration: int  # training iterations done
    wall_time_s: float
    recoveries: int
    signal: str | None = None
    last_checkpoint: Path | None = None
    best_val: float | None = None
    metrics: dict = field(default_factory=dict)  # the latest epoch-level metrics


class Trainer:
    """Train ``CNNModel`` by contrastive divergence with a Langevin sampler and a replay buffer.

    Args:
        config: a ``TrainConfig``.
        data: ``DataSplits`` (images (N, 1, 28, 28) in [-1, 1]); default: ``load_dataset(config.data, data_root,
            download)``.
        device: "auto"/None (CUDA if available), "cpu", "cuda[:N]" or a torch.device.
        out_dir: where the run's files go (see the module docstring); ``None`` writes nothing.
        callbacks: objects with ``on_epoch_end(trainer, epoch) -> dict | None`` (returned metrics are logged) and
            optionally ``on_step_end(trainer, iteration, metrics) -> dict | None`` (called after each iteration).
        resume: path of a checkpoint written by a Trainer: continue that run exactly where it stopped.
        overwrite: allow ``out_dir`` to hold an earlier run (its files get replaced/appended).
        progress: show tqdm bars.

    Like the seed's ``seed_everything``, construction seeds torch's, Python's and NumPy's global generators with
    ``config.seed`` (the model's initial weights come from torch's); a resume restores them from the checkpoint.
    """

    def __init__(
        self,
        config: TrainConfig,
        data: DataSplits | None = None,
        device=None,
        out_dir: str | Path | None = "runs/ebmfast",
        *,
        callbacks=(),
        data_root: str | Path | None = None,
        download: bool = False,
        resume: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = True,
    ):
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        cfg = self.config = config
        self.device = resolve_device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = bool(progress)
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not callable(getattr(cb, "on_epoch_end", None)) and not callable(getattr(cb, "on_step_end", None)):
                raise TypeError(f"callback {cb!r} has neither on_epoch_end(trainer, epoch) nor on_step_end(...)")
        if self.out_dir is not None and resume is None and not overwrite:
            existing = self.out_dir / "checkpoints" / "last.pt"
            if existing.exists():
                raise FileExistsError(
                    f"{self.out_dir} already holds a run ({existing}); continue it with "
                    f"--resume {existing}, pick another --out, or pass --overwrite"
                )
        ckpt = load_checkpoint(resume) if resume is not None else None  # fail before anything is written

        # ---- data, on the device as single tensors
        if data is None:
            data = load_dataset(cfg.data, root=data_root, download=download)
        self.data = data
        train_images = _check_images(data.train_images, "data.train_images")
        val_images = _check_images(data.val_images, "data.val_images", allow_empty=True)
        if cfg.batch_size > len(train_images):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(train_images)} training images")
        self.val_images = val_images.to(self.device)

        # ---- model, optimizer, schedule (seed_everything(seed) then build, as the seed does)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.model = CNNModel(**cfg.model_kwargs()).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.betas)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=cfg.lr_gamma)

        # ---- random streams and the sampling machinery
        self.gen = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, 0, _S_GEN))
        self.buffer = ReplayBuffer(
            IMAGE_SHAPE,
            capacity=cfg.buffer_size,
            fresh_prob=cfg.buffer_fresh_prob,
            device=self.device,
            generator=self.gen,
        )
        sampler_kw = dict(
            step_size=cfg.sampler_step_size,
            noise_std=cfg.sampler_noise_std,
            grad_clip=cfg.sampler_grad_clip,
            precision=cfg.sampler_precision,
        )
        try:
            resolve_backend(cfg.sampler_backend, self.device)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        self.sampler = LangevinSampler(
            self.model,
            steps=cfg.sampler_steps,
            backend=cfg.sampler_backend,
            seed=derive_seed(cfg.seed, 0, _S_SAMPLER),
            **sampler_kw,
        )
        # Grids use their own sampler, reseeded per epoch, so they never touch the training noise stream. On CPU it
        # is eager: a compile for an 8-chain batch costs more than it saves.
        vis_backend = "eager" if self.device.type == "cpu" else cfg.sampler_backend
        self.vis_sampler = LangevinSampler(self.model, steps=cfg.gen_steps, backend=vis_backend, seed=0, **sampler_kw)
        self.batches = TensorBatches(
            train_images.to(self.device), cfg.batch_size, seed=derive_seed(cfg.seed, 0, _S_DATA)
        )
        self.monitor = DivergenceMonitor(
            cfg.energy_limit, cfg.collapse_check_every, cfg.collapse_patience, cfg.collapse_ratio, cfg.collapse_min_gap
        )
        g = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, 0, _S_MONITOR))
        self._monitor_noise = torch.rand((64, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        self.snapshots = SnapshotRing(keep=2)

        # ---- progress counters
        self.epoch = 0  # epochs completed (= index of the epoch in progress)
        self.iteration = 0  # training iterations completed
        self.best_val = math.inf
        self.recoveries = 0
        self.lr_scale = 1.0
        self.epoch_metrics: dict[str, float] = {}
        self.events: list[dict] = []
        self._stop_signal: int | None = None
        self._fit_start: float | None = None
        if ckpt is not None:
            self._load_checkpoint(ckpt, str(resume))

        # ---- files (only now: every check above has passed)
        self.metrics = MetricsLogger(
            self.out_dir, tensorboard=cfg.tensorboard, purge_step=self.iteration if ckpt is not None else None
        )
        self.log = RunLog(self.out_dir)
        if self.out_dir is not None:
            self.ckpt_dir = self.out_dir / "checkpoints"
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.ckpt_dir)
            (self.out_dir / "samples").mkdir(exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        else:
            self.ckpt_dir = None
        if ckpt is not None:
            self._info(f"resumed from {resume} at epoch {self.epoch}, iteration {self.iteration}")
        else:
            self._info(
                f"new run on {self.device}: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                f"{len(train_images)} training images, {len(self.batches)} iterations per epoch"
            )

    # ================================================================================================ training
    def train_step(self, real: torch.Tensor) -> dict[str, float]:
        """One contrastive-divergence iteration on a batch of real images; returns the step's metrics."""
        cfg = self.config
        if not isinstance(real, torch.Tensor) or real.dim() != 4 or tuple(real.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"real must be a batch of images (B, 1, 28, 28), got "
                f"{tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__}"
            )
        real = real.to(self.device, torch.float32)
        noise = torch.randn(real.shape, generator=self.gen, device=self.device)
        real = (real + cfg.real_noise_std * noise).clamp_(-1.0, 1.0)
        fake = self.sampler.sample(self.buffer.draw(real.shape[0]))

        self.model.train()
        real_out, fake_out = self.model(torch.cat([real, fake], dim=0)).chunk(2, dim=0)
        reg = cfg.alpha * (real_out**2 + fake_out**2).mean()
        cdiv = fake_out.mean() - real_out.mean()
        loss = reg + cdiv
        values = torch.stack([loss, reg, cdiv, real_out.mean(), fake_out.mean()]).tolist()
        metrics = dict(zip(STEP_METRICS, values))
        if not math.isfinite(values[0]):
            return metrics  # no update from a non-finite loss; the divergence monitor handles it
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        metrics["grad_norm"] = float(nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_norm_clip))
        self.optimizer.step()
        self.buffer.push(fake)
        return metrics

    @torch.no_grad()
    def validate(self, epoch: int | None = None) -> dict[str, float]:
        """Held-out images vs U(-1, 1) noise (the seed's validation_step), averaged over all validation images."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.val_images)
        if n == 0:
            return {}
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, 0, _S_VAL + epoch))
        real_sum = fake_sum = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, n, self.config.val_batch_size):
                real = self.val_images[i : i + self.config.val_batch_size]
                fake = torch.rand(real.shape, generator=g, device=self.device).mul_(2).sub_(1)
                real_out, fake_out = self.model(torch.cat([real, fake])).chunk(2)
                real_sum += float(real_out.double().sum())
                fake_sum += float(fake_out.double().sum())
        finally:
            self.model.train(was_training)
        return {
            "val_contrastive_divergence": (fake_sum - real_sum) / n,
            "val_real_out": real_sum / n,
            "val_fake_out": fake_sum / n,
        }

    @torch.no_grad()
    def rand_out(self, epoch: int | None = None) -> float:
        """Mean score of ``rand_out_images`` U(-1, 1) images (the seed's OutlierCallback)."""
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, 0, _S_RANDOUT + epoch))
        x = torch.rand((self.config.rand_out_images, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        return float(self._score(x).double().mean())

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.cat([self.model(c) for c in x.split(self.config.val_batch_size)])
        finally:
            self.model.train(was_training)

    @torch.no_grad()
    def save_grids(self, epoch: int | None = None) -> list[Path]:
        """The seed's GenerateCallback and SamplerCallback pictures: chains from noise, and buffer images."""
        from torchvision.utils import make_grid, save_image

        cfg = self.config
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, 0, _S_VIS_START + epoch))
        start = torch.rand((cfg.gen_chains, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        self.vis_sampler.manual_seed(derive_seed(cfg.seed, 0, _S_VIS + epoch))
        _, traj = self.vis_sampler.sample(start, steps=cfg.gen_steps, return_trajectory=True)
        shown = traj[cfg.gen_show_every - 1 :: cfg.gen_show_every]  # (columns, chains, 1, 28, 28)
        gen_imgs = shown.transpose(0, 1).reshape(-1, *IMAGE_SHAPE).float().cpu()  # one row per chain
        pick = torch.randperm(
            self.buffer.capacity, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0, _S_VIS_BUF + epoch))
        )[: cfg.buffer_grid_images]
        buf_imgs = self.buffer.storage.index_select(0, pick.to(self.device)).float().cpu()
        grids = {
            "generation": (gen_imgs, shown.shape[0]),
            "buffer": (buf_imgs, min(8, len(buf_imgs))),
        }
        paths = []
        for name, (imgs, nrow) in grids.items():
            grid = make_grid(imgs, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=0.5)
            self.metrics.image(f"samples/{name}", grid, self.iteration)
            if self.out_dir is not None:
                path = self.out_dir / "samples" / f"{name}_epoch{epoch:03d}.png"
                save_image(grid, path)
                paths.append(path)
        return paths

    # ================================================================================================ the loop
    def fit(self) -> FitResult:
        """Train until ``config.epochs`` (or ``config.max_iterations``), a signal, or too many divergences."""
        self._fit_start = time.time()
        handlers = self._install_signal_handlers()
        status = "completed"
        try:
            if len(self.snapshots) == 0:
                self._take_snapshot()
            while True:
                if self._stop_signal is not None:
                    status = self._stop("interrupted")
                    break
                if self._limit_reached():
                    status = self._stop("max_iterations")
                    break
                if self.epoch >= self.config.epochs:
                    break
                outcome = self._run_epoch()
                if outcome in ("interrupted", "max_iterations"):
                    status = self._stop(outcome)
                    break
        except DivergenceError as exc:
            self._info(f"giving up: {exc}", warn=True)
            raise
        finally:
            self._restore_signal_handlers(handlers)
            self.metrics.flush()
        result = FitResult(
            status=status,
            epoch=self.epoch,
            iteration=self.iteration,
            wall_time_s=time.time() - self._fit_start,
            recoveries=self.recoveries,
            last_checkpoint=self._ckpt_path("last"),
            signal=signal.Signals(self._stop_signal).name if self._stop_signal is not None else None,
            best_val=self.best_val if math.isfinite(self.best_val) else None,
            metrics=dict(self.epoch_metrics),
        )
        if status == "completed":
            self._info(f"finished {self.epoch} epochs, {self.iteration} iterations in {result.wall_time_s:.0f} s")
        return result

    def _limit_reached(self) -> bool:
        return self.config.max_iterations is not None and self.iteration >= self.config.max_iterations

    def _run_epoch(self) -> str:
        """One epoch (or the rest of one, after a resume). Returns "done", "rollback", "interrupted" or
        "max_iterations"."""
        from tqdm.auto import tqdm

        cfg = self.config
        total = len(self.batches)
        done = self.batches.pos // cfg.batch_size if self.batches.perm is not None else 0
        t0 = time.time()
        if done < total:
            bar = tqdm(
                total=total,
                initial=done,
                desc=f"epoch {self.epoch + 1}/{cfg.epochs}",
                unit="it",
                disable=not self.progress,
                dynamic_ncols=True,
                leave=False,
            )
            try:
                for real in self.batches:
                    metrics = self.train_step(real)
                    self.iteration += 1
                    logged = dict(metrics)
                    for cb in self.callbacks:
                        hook = getattr(cb, "on_step_end", None)
                        if hook is not None:
                            logged.update(hook(self, self.iteration, metrics) or {})
                    event = None
                    if cfg.divergence_check:
                        event = self.monitor.check_step(self.iteration, metrics, noise_out=self._noise_out)
                        if self.iteration % cfg.collapse_check_every == 0:
                            logged.update(self.monitor.last_gap_metrics)
                    self.metrics.log(self.iteration, self.epoch, logged)
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{metrics['loss']:.3f}",
                        real=f"{metrics['metrics_avg_real']:.3f}",
                        fake=f"{metrics['metrics_avg_fake']:.3f}",
                        refresh=False,
                    )
                    if event is not None:
                        self._recover(event)
                        return "rollback"
                    if self.iteration % cfg.snapshot_every == 0:
                        self._take_snapshot()
                    if self._stop_signal is not None:
                        return "interrupted"
                    if self._limit_reached():
                        return "max_iterations"
            finally:
                bar.close()
        return self._end_epoch(time.time() - t0)

    def _noise_out(self) -> float:
        return float(self._score(self._monitor_noise).double().mean())

    def _end_epoch(self, seconds: float) -> str:
        cfg = self.config
        epoch = self.epoch
        metrics = self.validate(epoch)
        metrics["rand_out"] = self.rand_out(epoch)
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["epoch_seconds"] = seconds
        self.scheduler.step()
        last = epoch + 1 >= cfg.epochs
        if cfg.sample_every and (epoch % cfg.sample_every == 0 or last):
            self.save_grids(epoch)
        for cb in self.callbacks:
            hook = getattr(cb, "on_epoch_end", None)
            if hook is not None:
                extra = hook(self, epoch)
                if extra:
                    metrics.update({k: float(v) for k, v in extra.items()})
        self.metrics.log(self.iteration, epoch, metrics)
        if cfg.divergence_check:
            checked = {k: metrics[k] for k in (*VAL_METRICS, "rand_out") if k in metrics}
            event = self.monitor.check_epoch(epoch, checked)
            if event is not None:
                self._recover(event)
                return "rollback"
        self.epoch += 1
        self.epoch_metrics = metrics
        val = metrics.get("val_contrastive_divergence")
        improved = val is not None and val < self.best_val
        if improved:
            self.best_val = val
        self._save("last")
        if improved:
            self._save("best")
        self._take_snapshot()
        summary = ", ".join(
            f"{k} {metrics[k]:.4g}" for k in ("val_contrastive_divergence", "val_real_out", "rand_out") if k in metrics
        )
        self._info(
            f"epoch {epoch + 1}/{cfg.epochs} ({self.iteration} it, {seconds:.1f} s): {summary}", echo=self.progress
        )
        return "done"

    def _stop(self, why: str) -> str:
        """Stop mid-run: a report that changes no training state (so resuming reproduces the run), then a
        resumable checkpoint."""
        if why == "max_iterations":
            metrics = self.validate(self.epoch)
            metrics["rand_out"] = self.rand_out(self.epoch)
            self.metrics.log(self.iteration, self.epoch, metrics)
            self.epoch_metrics = metrics
            if self.config.sample_every:
                self.save_grids(self.epoch)
        path = self._save("last")
        if why == "interrupted":
            name = signal.Signals(self._stop_signal).name
            where = f"saved a resumable checkpoint: {path}" if path else "no --out folder, nothing saved"
            msg = f"{name} at epoch {self.epoch}, iteration {self.iteration}: {where}"
            if path:
                msg += f". Resume with: ebmfast train --resume {path}"
            self._info(msg, warn=True, echo=True)
            self.metrics.log(self.iteration, self.epoch, {"interrupted": float(self._stop_signal)})
        else:
            self._info(
                f"reached max_iterations={self.config.max_iterations} (epoch {self.epoch}); saved {path}",
                echo=self.progress,
            )
        return why

    # ============================================================================================ divergence
    def _take_snapshot(self) -> None:
        if params_finite(self.model):
            self.snapshots.take(self.iteration, {"model": self.model.state_dict(), "trainer": self.state_dict(False)})

    def _recover(self, event: DivergenceEvent) -> None:
        cfg = self.config
        self.recoveries += 1
        record = {"iteration": self.iteration, "epoch": self.epoch, "reason": event.reason, "detail": event.detail}
        self.events.append(record)
        self.metrics.log(
            self.iteration, self.epoch, {"divergence/event": event.code, "divergence/recoveries": self.recoveries}
        )
        self._info(f"divergence detected ({event.reason}): {event.detail}", warn=True, echo=True)
        if self.recoveries > cfg.max_recoveries:
            where = self._ckpt_path("last")
            raise DivergenceError(
                f"training diverged {self.recoveries} times (max_recoveries={cfg.max_recoveries}); last: "
                f"{event.reason}: {event.detail}. Last good checkpoint: {where if where and where.exists() else 'none'}"
                ". Try a lower --lr, another --seed or a larger alpha"
            )
        target_iter, state = self.snapshots.rollback_target()
        recoveries, lr_scale = self.recoveries, self.lr_scale * cfg.recovery_lr_factor
        self.model.load_state_dict(state["model"])
        self.load_state_dict(state["trainer"], restore_global_rng=False)
        self.recoveries = recoveries
        self._set_lr_scale(lr_scale)
        attempt = self.recoveries
        self.sampler.manual_seed(derive_seed(cfg.seed, attempt, _S_SAMPLER))
        self.gen.manual_seed(derive_seed(cfg.seed, attempt, _S_GEN))
        self.batches.generator.manual_seed(derive_seed(cfg.seed, attempt, _S_DATA))
        self.monitor.reset()
        lr = self.optimizer.param_groups[0]["lr"]
        self._info(
            f"rolled back to iteration {target_iter} (epoch {self.epoch}), reseeded (attempt {attempt}), "
            f"lr now {lr:.3g}; recovery {self.recoveries}/{cfg.max_recoveries}",
            warn=True,
            echo=True,
        )
        self.metrics.log(self.iteration, self.epoch, {"divergence/rollback_to": target_iter, "lr": lr})

    def _set_lr_scale(self, new_scale: float) -> None:
        """lr = config.lr * new_scale * lr_gamma ** (epochs stepped), recomputed from the schedule rather than taken
        from the restored optimizer state (a spike that set the lr by hand must not survive the roll-back)."""
        base = self.config.lr * new_scale
        lr = base * self.config.lr_gamma**self.scheduler.last_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["initial_lr"] = base
        self.scheduler.base_lrs = [base for _ in self.optimizer.param_groups]
        self.scheduler._last_lr = [lr for _ in self.optimizer.param_groups]
        self.lr_scale = new_scale

    # =========================================================================================== state / files
    def state_dict(self, include_global_rng: bool = True) -> dict:
        """Everything besides the model weights that determines the rest of the run."""
        state = {
            "epoch": self.epoch,
            "iteration": self.iteration,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "buffer": self.buffer.state_dict(),
            "generator": self.gen.get_state(),
            "sampler": self.sampler.state_dict(),
            "batches": self.batches.state_dict(),
            "monitor": self.monitor.state_dict(),
            "best_val": self.best_val,
            "recoveries": self.recoveries,
            "lr_scale": self.lr_scale,
            "epoch_metrics": dict(self.epoch_metrics),
        }
        if include_global_rng:
            state["rng"] = _global_rng_state()
        return state

    def load_state_dict(self, state: dict, restore_global_rng: bool = True) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.buffer.load_state_dict(state["buffer"])
        self.gen.set_state(state["generator"])
        self.sampler.load_state_dict(state["sampler"])
        batches = state["batches"]
        self.batches.load_state_dict(batches)
        self.monitor.load_state_dict(state["monitor"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.best_val = float(state["best_val"])
        self.recoveries = int(state["recoveries"])
        self.lr_scale = float(state["lr_scale"])
        self.epoch_metrics = dict(state.get("epoch_metrics", {}))
        if restore_global_rng and "rng" in state:
            _set_global_rng_state(state["rng"])

    def _load_checkpoint(self, ckpt: dict, source: str) -> None:
        if ckpt.get("kind") != "train" or not isinstance(ckpt.get("trainer"), dict):
            raise CheckpointError(f"{source} is not a resumable training checkpoint (it has no trainer state)")
        model = build_model(ckpt.get("model"), source=source)
        if model.hidden_features != self.config.hidden_features:
            raise CheckpointError(
                f"{source} holds a model with hidden_features={model.hidden_features}, but the "
                f"config asks for {self.config.hidden_features}"
            )
        stored = ckpt["trainer"]
        cap = stored.get("buffer", {}).get("capacity")
        if cap != self.config.buffer_size:
            raise CheckpointError(
                f"{source} holds a replay buffer of {cap} images, but the config asks for "
                f"buffer_size={self.config.buffer_size}"
            )
        self.model.load_state_dict(model.state_dict())
        try:
            self.load_state_dict(stored)
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise CheckpointError(
                f"{source}: cannot restore the training state ({type(exc).__name__}: {exc})"
            ) from None

    def checkpoint_state(self) -> dict:
        return {
            "kind": "train",
            "model": model_record(self.model),
            "config": self.config.to_dict(),
            "trainer": self.state_dict(),
            "device": str(self.device),
        }

    def _ckpt_path(self, name: str) -> Path | None:
        return self.ckpt_dir / f"{name}.pt" if self.ckpt_dir is not None else None

    def _save(self, name: str) -> Path | None:
        path = self._ckpt_path(name)
        if path is None:
            return None
        self.metrics.flush()
        save_checkpoint(path, self.checkpoint_state())
        return path

    def _info(self, msg: str, warn: bool = False, echo: bool = False) -> None:
        (self.log.warning if warn else self.log.info)(msg)
        if echo:
            from tqdm.auto import tqdm

            tqdm.write(f"[ebmfast] {msg}")

    def close(self) -> None:
        """Flush and close the run's files (the trainer can still be used in memory)."""
        self.metrics.close()
        self.log.close()

    # ============================================================================================== signals
    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask ``fit`` to stop after the current iteration and save a resumable checkpoint (what SIGINT does)."""
        self._stop_signal = int(signum)

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {}

        def handler(signum, frame):
            if self._stop_signal is not None:  # a second signal: stop now, the last checkpoint stays valid
                raise KeyboardInterrupt
            self._stop_signal = signum
            from tqdm.auto import tqdm

            tqdm.write(
                f"[ebmfast] {signal.Signals(signum).name}: finishing this iteration, then saving a "
                "resumable checkpoint (signal again to stop at once)"
            )

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        if previous:
            for sig, h in previous.items():
                signal.signal(sig, h)


# ================================================================================================== helpers
def _check_images(x, name: str, allow_empty: bool = False) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise ValueError(f"{name} must have shape (N, 1, 28, 28), got {tuple(x.shape)}")
    if len(x) == 0 and not allow_empty:
        raise ValueError(f"{name} is empty")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point in [-1, 1], got {x.dtype}")
    if len(x):
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} holds non-finite values")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
            raise ValueError(f"{name} must lie in [-1, 1] (ToTensor + Normalize(0.5, 0.5)), got [{lo:.3g}, {hi:.3g}]")
    return x.float()


def _global_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch_cpu": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    if "torch_cuda" in state and torch.cuda.is_available():
        cuda_states = state["torch_cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


def _as_tuple(obj):
    if isinstance(obj, list):
        return tuple(_as_tuple(o) for o in obj)
    if isinstance(obj, tuple):
        return tuple(_as_tuple(o) for o in obj)
    return obj


# ====================================================================================================== CLI
def _run_dir_of(checkpoint: Path) -> Path:
    """DIR for DIR/checkpoints/NAME.pt, else the checkpoint's folder."""
    checkpoint = Path(checkpoint)
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


# (flag, config field, type, help); every flag defaults to None = "not given", so the preset (or the resumed run's
# config) decides.
_OVERRIDES = [
    ("--epochs", "epochs", int, "number of epochs (tutorial: 60)"),
    ("--max-iterations", "max_iterations", int, "stop after this many training iterations in total"),
    ("--seed", "seed", int, "random seed (tutorial: 42)"),
    ("--batch-size", "batch_size", int, "images per iteration (tutorial: 128)"),
    ("--lr", "lr", float, "Adam learning rate (tutorial: 1e-4)"),
    ("--alpha", "alpha", float, "weight of the energy regulariser alpha (tutorial: 0.1)"),
    ("--hidden", "hidden_features", int, "CNNModel hidden_features (tutorial: 32)"),
    ("--sampler-steps", "sampler_steps", int, "Langevin steps per training iteration (tutorial: 60)"),
    ("--buffer-size", "buffer_size", int, "replay-buffer capacity (tutorial: 8192)"),
    ("--sample-every", "sample_every", int, "write sample grids every N epochs, 0 = never (tutorial: 5)"),
    ("--gen-steps", "gen_steps", int, "Langevin steps of the generation grid's chains (tutorial: 256)"),
    ("--max-recoveries", "max_recoveries", int, "divergence roll-backs allowed before giving up (default 3)"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="named configuration: 'tutorial' = the seed's (default), 'quick' = <= 10 min on a "
        "2-core CPU (ignored with --resume: the run's own config is used)",
    )
    parser.add_argument(
        "--data",
        choices=["mnist5k", "mnist"],
        default=None,
        help="training data: the embedded 5,000-image MNIST subset (default, no network) or full "
        "MNIST through torchvision",
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        default=None,
        help="folder holding torchvision's MNIST (for --data mnist; default $EBMFAST_DATA or ./data)",
    )
    parser.add_argument("--download", action="store_true", help="download full MNIST into --data-root if missing")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="output folder (default runs/PRESET; with --resume, the resumed run's folder)",
    )
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA when available)")
    for flag, name, kind, help_text in _OVERRIDES:
        parser.add_argument(
            flag, dest=name, type=kind, default=None, metavar="N" if kind is int else "X", help=help_text
        )
    parser.add_argument(
        "--sampler-backend",
        dest="sampler_backend",
        default=None,
        choices=["auto", "eager", "compiled", "fused", "graph"],
        help="Langevin backend (default auto: graph on CUDA, compiled on CPU)",
    )
    parser.add_argument(
        "--precision",
        dest="sampler_precision",
        default=None,
        choices=["fp32", "tf32", "bf16"],
        help="sampler arithmetic (default fp32, the seed's)",
    )
    parser.add_argument(
        "--set",
        dest="set_values",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any TrainConfig field, e.g. --set gen_chains=4 (repeatable; fields: "
        + ", ".join(TrainConfig.field_names())
        + ")",
    )
    parser.add_argument("--no-tensorboard", action="store_true", help="do not write TensorBoard event files")
    parser.add_argument(
        "--no-divergence-check", action="store_true", help="turn off divergence detection and roll-back"
    )
    parser.add_argument(
        "--quality-every",
        type=int,
        default=0,
        metavar="N",
        help="sample-quality metrics (ebmfast.quality.QualityCallback) every N epochs; 0 = off",
    )
    parser.add_argument(
        "--resume",
        metavar="CKPT",
        default=None,
        help="continue the run saved in CKPT (e.g. DIR/checkpoints/last.pt) exactly where it stopped",
    )
    parser.add_argument("--overwrite", action="store_true", help="allow --out to be a folder holding an earlier run")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads for torch (default: torch's choice, one per core). On a CPU shared with "
        "other busy processes, 1 thread (or OMP_WAIT_POLICY=PASSIVE) avoids OpenMP spin-wait "
        "slow-downs of 5-30x measured on a 2-core machine",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_config(args: argparse.Namespace, base: dict | None = None) -> TrainConfig:
    """The TrainConfig the command line asks for (``base``: the resumed run's config dict). Raises UsageError."""
    if base is None:
        base = dict(PRESETS[args.preset or "tutorial"])
    overrides = {name: getattr(args, name) for _, name, _, _ in _OVERRIDES if getattr(args, name, None) is not None}
    for name in ("sampler_backend", "sampler_precision", "data"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "no_tensorboard", False):
        overrides["tensorboard"] = False
    if getattr(args, "no_divergence_check", False):
        overrides["divergence_check"] = False
    for item in getattr(args, "set_values", []):
        key, sep, text = item.partition("=")
        if not sep:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key.strip()] = TrainConfig.parse_value(key.strip(), text)
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
    try:
        return TrainConfig.from_dict({**base, **overrides})
    except (TypeError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    # ---- everything is checked before a file is written
    ckpt_base = None
    if args.resume:
        ckpt = load_checkpoint(args.resume)  # CheckpointError -> exit 2
        if ckpt.get("kind") != "train" or not isinstance(ckpt.get("config"), dict):
            raise CheckpointError(f"{args.resume} is not a resumable training checkpoint")
        ckpt_base = ckpt["config"]
        del ckpt
    config = build_config(args, ckpt_base)
    if isinstance(args.quality_every, bool) or args.quality_every < 0:
        raise UsageError(f"--quality-every must be >= 0, got {args.quality_every}")
    callbacks = []
    if args.quality_every > 0:
        try:
            from .quality import QualityCallback
        except ImportError as exc:
            raise UsageError(f"--quality-every needs ebmfast.quality, which cannot be imported ({exc})") from None
        callbacks.append(QualityCallback(every=args.quality_every))
    try:
        device = resolve_device(args.device)
        resolve_backend(config.sampler_backend, device)
    except (ValueError, RuntimeError) as exc:
        raise UsageError(str(exc)) from None
    threads = getattr(args, "threads", None)
    if threads is not None and not 1 <= threads <= 1024:
        raise UsageError(f"--threads must be in [1, 1024], got {threads}")
    if args.out is not None:
        out = Path(args.out)
    elif args.resume:
        out = _run_dir_of(Path(args.resume))
    else:
        out = Path("runs") / (args.preset or "tutorial")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is not a folder")
    existing = out / "checkpoints" / "last.pt"
    if not args.resume and not args.overwrite and existing.exists():
        raise UsageError(
            f"{out} already holds a run; continue it with --resume {existing}, choose another --out, "
            "or pass --overwrite"
        )
    data = load_dataset(config.data, root=args.data_root, download=args.download)  # DataNotFoundError -> exit 2
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        trainer = Trainer(
            config,
            data=data,
            device=device,
            out_dir=out,
            callbacks=callbacks,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, TypeError, FileExistsError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise UsageError(str(exc)) from None
    print(
        f"ebmfast train: {config.epochs} epochs of {len(trainer.batches)} iterations on {device} "
        f"(sampler backend {config.sampler_backend}, data {config.data}); writing to {out}"
    )
    try:
        result = trainer.fit()
    except DivergenceError as exc:
        print(f"ebmfast train: training diverged: {exc}", file=sys.stderr)
        return 1
    finally:
        trainer.close()
    m = result.metrics
    summary = ", ".join(f"{k} {m[k]:.4g}" for k in ("val_contrastive_divergence", "val_real_out", "rand_out") if k in m)
    if result.status == "interrupted":  # the trainer has printed where the checkpoint is and how to resume
        return 128 + int(signal.Signals[result.signal])
    how = "finished" if result.status == "completed" else f"stopped at max_iterations={config.max_iterations}"
    print(
        f"ebmfast train: {how}: {result.epoch} epochs, {result.iteration} iterations, "
        f"{result.wall_time_s:.0f} s, {result.recoveries} divergence recoveries; {summary}"
    )
    print(
        f"ebmfast train: checkpoints in {out / 'checkpoints'}, grids in {out / 'samples'}, metrics in "
        f"{out / 'metrics.csv'}"
    )
    return 0
