"""``Trainer``: contrastive-divergence training of an energy model (the seed's recipe) as a plain PyTorch loop.

Each iteration is ``ebmfast.cd.CDStep`` (the seed's ``DeepEnergyModel.training_step``), on CUDA replayed as one CUDA
graph (``CDGraph``) unless ``iteration_graph`` is off or cannot be used (``step.py`` decides; the log says why). Its
metrics stay on the device and are copied to the host every ``sync_every`` iterations (a "flush", the one
synchronisation); each flush hands every iteration's metrics, in order, to the CSV, TensorBoard, the progress bar,
``on_step_end`` callbacks and the divergence monitor. Snapshots, stops (signals, ``max_iterations``) and epoch ends
come right after a flush. Every epoch: validation (held-out images vs U(-1, 1) noise), rand_out (mean score of 1,024
noise images), StepLR, checkpoints (best by val_contrastive_divergence, and last), callbacks; every ``sample_every``
epochs PNG grids of chains from noise and of buffer images (``pictures.py``). Between epoch ends ``last.pt`` is also
written at the first flush ``checkpoint_every_s`` seconds after the previous save, so a kill -9 loses at most that
much.

Output layout under ``out_dir``::

    config.json            the TrainConfig
    metrics.csv            step,epoch,metric,value,wall_time (long format; runlog.py)
    train.log              the run's text log (events: resume, roll-backs, interruptions)
    tb/                    TensorBoard scalars and grids
    checkpoints/last.pt    resumable: model, optimizer, scheduler, buffer, sampler, data order, RNG states
    checkpoints/best.pt    the same, at the epoch with the lowest val_contrastive_divergence
    samples/generation_epochNNN.png   rows = chains from noise, columns = every gen_show_every-th step
    samples/buffer_epochNNN.png       random replay-buffer images

The trainer's concerns each have their own module: how iterations run (``step.py``), divergence roll-back
(``divergence.py``), what is saved and resumed (``state.py``, atomic files in ``checkpoint.py``), signals
(``signals.py``), pictures (``pictures.py``), run records (``runlog.py``). ``--resume`` continues bit-exactly on CPU:
every random stream the run uses is in the checkpoint, and epoch-end work uses its own seeded generators so it never
disturbs the training streams.
"""

from __future__ import annotations

import json
import math
import random
import signal
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..buffer import ReplayBuffer
from ..cd import CD_METRICS, CDStep
from ..data import DataSplits, load_dataset
from ..devices import resolve_device
from ..errors import DivergenceError, StopRequested
from ..models import CNNModel
from ..reference import energy_scores
from ..sampler import LangevinSampler, resolve_backend
from .batches import TensorBatches
from .checkpoint import load_checkpoint, remove_stale_temps, save_checkpoint
from .config import TrainConfig
from .distributed import DistContext
from .pictures import TrainingPictures
from .runlog import MetricsLogger, RunLog
from .state import (
    S_DATA,
    S_GEN,
    S_MONITOR,
    S_RANDOUT,
    S_SAMPLER,
    S_VAL,
    checkpoint_payload,
    derive_seed,
    restore_run_state,
    resume_from,
    run_state,
)
from .step import (
    STEP_METRICS,
    IterationRunner,
    StepHistory,
    adopt_optimizer,
    build_optimizer,
    iteration_graph_reason,
    resolve_sync_every,
)

__all__ = ["Trainer", "FitResult", "STEP_METRICS", "VAL_METRICS"]

VAL_METRICS = ("val_contrastive_divergence", "val_real_out", "val_fake_out")
IMAGE_SHAPE = (1, 28, 28)


CHECKPOINT_EVERY_S = 120.0  # a mid-epoch last.pt at the first flush this long after the previous save


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
    timing: dict = field(default_factory=dict)  # first iteration, steady ms per iteration, epoch-end seconds


class Trainer:
    """Train ``CNNModel`` by contrastive divergence with a Langevin sampler and a replay buffer.

    Args:
        config: a ``TrainConfig``.
        data: ``DataSplits`` (images (N, 1, 28, 28) in [-1, 1]); default: ``load_dataset(config.data, data_root,
            download)``.
        device: "auto"/None (CUDA if available), "cpu", "cuda[:N]" or a torch.device.
        out_dir: where the run's files go (see the module docstring); ``None`` writes nothing.
        callbacks: objects with ``on_epoch_end(trainer, epoch) -> dict | None`` (returned metrics are logged) and
            optionally ``on_step_end(trainer, iteration, metrics) -> dict | None``, called for every iteration, in
            order, at the flush that copies its metrics to the host (``sync_every``; on CPU right after the
            iteration), so ``trainer.iteration`` may be up to ``sync_every - 1`` iterations further.
        resume: path of a checkpoint written by a Trainer: continue that run exactly where it stopped.
        overwrite: allow ``out_dir`` to hold an earlier run (its files get replaced/appended).
        progress: show tqdm bars.

    In a process group (``torchrun``, ``distributed.init_distributed``) build one Trainer per rank with the same
    arguments: it trains data-parallel (``distributed.py``: DDP through ``forward_model``, a shard of every batch and
    of the replay buffer per rank, agreed decisions), and only rank 0 (``dist.is_main``) writes files. Callbacks run
    on every rank.

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
        self.config = config
        self.device = resolve_device(device)
        self.dist = DistContext.current()  # one process, or this rank of a data-parallel run
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = bool(progress) and self.dist.is_main
        self.callbacks = _checked_callbacks(callbacks)
        if self.out_dir is not None and resume is None and not overwrite:
            _refuse_earlier_run(self.out_dir)
        ckpt = load_checkpoint(resume) if resume is not None else None  # fail before anything is written

        train_images = self._set_up_data(data, data_root, download)
        self._build_model()
        backend = self._build_sampling(train_images)
        self._start_counters()
        resharded = resume_from(self, ckpt, str(resume)) if ckpt is not None else None
        self._build_iterations(backend)
        if ckpt is not None:
            self.state_restored()
        self._open_files(resumed=ckpt is not None)  # only now: every check above has passed
        if ckpt is not None:
            self.note(f"resumed from {resume} at epoch {self.epoch}, iteration {self.iteration}")
            if resharded:
                self.note(resharded, warn=True)
        else:
            self.note(
                f"new run on {self.device}: {sum(p.numel() for p in self.model.parameters()):,} parameters, "
                f"{len(train_images)} training images, {len(self.batches)} iterations per epoch"
            )
        self.note(f"iterations: {self.runner.describe()}; metrics copied to the host every {self.sync_every}")
        if self.dist.distributed:
            self.note(self.dist.describe(self.config))

    # ============================================================================================ construction
    def _set_up_data(self, data: DataSplits | None, data_root: str | Path | None, download: bool) -> torch.Tensor:
        """The data, checked; the validation images go to the device; returns the training images (checked)."""
        cfg = self.config
        if data is None:
            data = load_dataset(cfg.data, root=data_root, download=download)
        self.data = data
        train_images = _check_images(data.train_images, "data.train_images")
        val_images = _check_images(data.val_images, "data.val_images", allow_empty=True)
        if cfg.batch_size > len(train_images):
            raise ValueError(f"batch_size {cfg.batch_size} is larger than the {len(train_images)} training images")
        self.dist.local_batch(cfg.batch_size)  # ValueError unless the ranks can take equal shares
        self.val_images = val_images.to(self.device)
        return train_images

    def _build_model(self) -> None:
        """Model, optimizer, schedule: seed_everything(seed), then build, as the seed does."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.model = CNNModel(**cfg.model_kwargs()).to(self.device)
        self.optimizer = build_optimizer(self.model.parameters(), cfg, self.device)
        # On CUDA the lr lives in device tensors that a captured iteration reads; the schedule writes them in place.
        groups = self.optimizer.param_groups
        self._lr_tensors = [g["lr"] for g in groups] if isinstance(groups[0]["lr"], torch.Tensor) else None
        self._capturable = bool(self.optimizer.defaults.get("capturable", False))
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=cfg.lr_gamma)
        self._adopt_lr()

    def _build_sampling(self, train_images: torch.Tensor) -> str:
        """The random streams and the sampling machinery (buffer, sampler, pictures, batches, roll-back, signals);
        returns the sampler backend the configuration resolves to on this device."""
        cfg = self.config
        self.gen = torch.Generator(device=self.device).manual_seed(self.dist.seed(cfg.seed, 0, S_GEN))
        self.buffer = ReplayBuffer(
            IMAGE_SHAPE,
            capacity=self.dist.shard_size(cfg.buffer_size),  # this rank's shard (all of it on one process)
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
            backend = resolve_backend(cfg.sampler_backend, self.device)
        except RuntimeError as exc:
            raise ValueError(str(exc)) from None
        self.sampler = LangevinSampler(
            self.model,
            steps=cfg.sampler_steps,
            backend=cfg.sampler_backend,
            seed=self.dist.seed(cfg.seed, 0, S_SAMPLER),
            check_finite=False,  # the step flags non-finite iterations on the device instead of waiting for it
            **sampler_kw,
        )
        self.pictures = TrainingPictures(self.model, cfg, self.device, **sampler_kw)
        self.batches = TensorBatches(
            train_images.to(self.device),
            cfg.batch_size,
            seed=derive_seed(cfg.seed, 0, S_DATA),
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.rollback = self.dist.rollback(cfg)  # divergence verdicts agreed by all ranks
        g = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, 0, S_MONITOR))
        self._monitor_noise = torch.rand((64, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        self.signals = self.dist.stop_signals()  # a stop on any rank stops all after the same iteration
        if not self.dist.distributed:
            # A long chain looks at the flag between its chunks (sampler.CHUNK_STEPS); under torchrun the ranks agree
            # on stops between iterations only (a rank leaving mid-iteration would leave the others in a collective).
            self.sampler.stop_check = lambda: self.signals.signum is not None
        return backend

    def _start_counters(self) -> None:
        """The progress counters of a new run (a resume then loads the checkpoint's)."""
        self.epoch = 0  # epochs completed (= index of the epoch in progress)
        self.iteration = 0  # training iterations completed
        self.best_val = math.inf
        self.recoveries = 0
        self.lr_scale = 1.0
        self.epoch_metrics: dict[str, float] = {}
        self.events: list[dict] = []
        self._fit_start: float | None = None

    def _build_iterations(self, backend: str) -> None:
        """How iterations run: the forward model, the CD step, the runner (CDGraph or CDStep), the flush cadence."""
        cfg = self.config
        # The module the training forward/backward runs through: DistributedDataParallel(model) in a process group
        # (gradients averaged across ranks before the clip), else the model. The sampler samples from self.model.
        # Under DDP the whole-iteration CUDA graph stays off (step.iteration_graph_reason says why).
        self.forward_model = self.dist.wrap_model(self.model, self.device)
        self.cd_step = CDStep(
            self.model,
            self.optimizer,
            self.sampler,
            self.buffer,
            alpha=cfg.alpha,
            real_noise_std=cfg.real_noise_std,
            grad_norm_clip=cfg.grad_norm_clip,
            generator=self.gen,
            forward=self.forward_model,
        )
        self.runner = IterationRunner(
            self.cd_step,
            iteration_graph_reason(cfg, self.device, backend),
            on_fallback=lambda msg: self.note(msg, warn=True, echo=self.progress),
        )
        self.sync_every = resolve_sync_every(cfg, self.device)
        self.checkpoint_every_s = CHECKPOINT_EVERY_S
        self._history = StepHistory(self.sync_every, self.device)
        self.timing: dict = {}

    def _open_files(self, resumed: bool) -> None:
        """The run's metrics log, text log and folders; only rank 0 writes."""
        writes = self.out_dir if self.dist.is_main else None
        self.metrics = MetricsLogger(
            writes, tensorboard=self.config.tensorboard, purge_step=self.iteration if resumed else None
        )
        self.log = RunLog(writes)
        self.ckpt_dir = self.out_dir / "checkpoints" if self.out_dir is not None else None
        if writes is not None:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(self.ckpt_dir)
            (self.out_dir / "samples").mkdir(exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")

    # ================================================================================================ training
    def train_step(self, real: torch.Tensor) -> dict[str, float]:
        """One contrastive-divergence iteration (the loop's, ``runner``) on a batch of real images; returns its
        metrics (``CD_METRICS``) as host floats, which waits for the device. Not counted in ``iteration``."""
        if not isinstance(real, torch.Tensor) or real.dim() != 4 or tuple(real.shape[1:]) != IMAGE_SHAPE:
            raise ValueError(
                f"real must be a batch of images (B, 1, 28, 28), got "
                f"{tuple(real.shape) if isinstance(real, torch.Tensor) else type(real).__name__}"
            )
        metrics = self.dist.reduce_mean(self.runner(real.to(self.device, torch.float32)))  # mean over ranks
        return dict(zip(CD_METRICS, metrics.tolist()))

    def state_restored(self) -> None:
        """After the run's state was loaded (resume, roll-back, ``load_state_dict``): the optimizer's new param groups
        get the run's lr tensors and flags back, and a captured iteration graph is dropped (re-captured next time)."""
        self._adopt_lr()
        self.runner.invalidate()

    def _adopt_lr(self) -> None:
        adopt_optimizer(self.optimizer, self._lr_tensors, self._capturable)

    @torch.no_grad()
    def validate(self, epoch: int | None = None) -> dict[str, float]:
        """Held-out images vs U(-1, 1) noise (the seed's validation_step), averaged over all validation images."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.val_images)
        if n == 0:
            return {}
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, 0, S_VAL + epoch))
        real_sum = fake_sum = 0.0
        was_training = self.model.training
        self.model.eval()
        try:
            for i in range(0, n, self.config.val_batch_size):
                real = self.val_images[i : i + self.config.val_batch_size]
                fake = torch.rand(real.shape, generator=g, device=self.device).mul_(2).sub_(1)
                real_out, fake_out = energy_scores(self.model, torch.cat([real, fake])).chunk(2)
                real_sum += float(real_out.double().sum())
                fake_sum += float(fake_out.double().sum())
        finally:
            self.model.train(was_training)
        metrics = {
            "val_contrastive_divergence": (fake_sum - real_sum) / n,
            "val_real_out": real_sum / n,
            "val_fake_out": fake_sum / n,
        }
        return self.dist.from_main(metrics)  # every rank decides (best checkpoint, divergence) on rank 0's numbers

    @torch.no_grad()
    def rand_out(self, epoch: int | None = None) -> float:
        """Mean score of ``rand_out_images`` U(-1, 1) images (the seed's OutlierCallback)."""
        epoch = self.epoch if epoch is None else epoch
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.config.seed, 0, S_RANDOUT + epoch))
        x = torch.rand((self.config.rand_out_images, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        return self.dist.from_main(float(self._score(x).double().mean()))

    @torch.no_grad()
    def _score(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            return torch.cat([energy_scores(self.model, c) for c in x.split(self.config.val_batch_size)])
        finally:
            self.model.train(was_training)

    def _noise_out(self) -> torch.Tensor:
        """Mean score of a fixed batch of noise images (the divergence monitor's gap check), a 0-d device tensor:
        computed at the check iteration, read at the next flush."""
        return self._score(self._monitor_noise).double().mean()

    def save_grids(self, epoch: int | None = None) -> list[Path]:
        """The seed's GenerateCallback and SamplerCallback pictures: chains from noise, and buffer images."""
        epoch = self.epoch if epoch is None else epoch
        if not self.dist.is_main:
            return []
        return self.pictures.save(epoch, self.iteration, self.buffer, self.metrics, self.out_dir)

    # ================================================================================================ the loop
    def fit(self) -> FitResult:
        """Train until ``config.epochs`` (or ``config.max_iterations``), a signal, or too many divergences."""
        self._fit_start = time.time()
        self._last_save = time.monotonic()
        self._fit_iterations = 0
        self._clock = {"first": None, "loop_s": 0.0, "loop_iterations": 0, "epoch_end_s": []}
        status = "completed"
        try:
            with self.signals:
                if len(self.rollback.snapshots) == 0:
                    self.rollback.snapshot(self)
                while True:
                    if self.signals.requested:
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
            self.note(f"giving up: {exc}", warn=True)
            raise
        finally:
            self._finish_timing()
            self.metrics.flush()
        result = FitResult(
            status=status,
            epoch=self.epoch,
            iteration=self.iteration,
            wall_time_s=time.time() - self._fit_start,
            recoveries=self.recoveries,
            last_checkpoint=self.checkpoint_path("last"),
            signal=self.signals.name,
            best_val=self.best_val if math.isfinite(self.best_val) else None,
            metrics=dict(self.epoch_metrics),
            timing=dict(self.timing),
        )
        if status == "completed":
            self.note(f"finished {self.epoch} epochs, {self.iteration} iterations in {result.wall_time_s:.0f} s")
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
        self._mark = time.perf_counter()
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
                    try:
                        self._iterate(real)
                    except StopRequested:  # in a long chain; the iteration is undone (see _iterate)
                        return "rollback" if self._flush(bar) == "rollback" else "interrupted"
                    if self._flush_due():
                        outcome = self._flush(bar)
                        if outcome is not None:
                            return outcome
                # The epoch's last iterations, when no flush fell on them. A stop asked for only now (a signal after
                # the last in-loop check) waits for the epoch end, which fit() runs first, as it always did.
                if self._flush(bar) == "rollback":
                    return "rollback"
            finally:
                bar.close()
        return self._end_epoch(time.time() - t0)

    def _iterate(self, real: torch.Tensor) -> None:
        """One training iteration; its metrics (and, at gap-check iterations, the monitor's f(noise)) stay on the
        device in the step history until the next flush."""
        cfg = self.config
        # A stop inside a long chain (StopRequested) abandons the iteration before it changed the model, the
        # optimizer or the buffer; what it consumed is put back (the sampler rewinds its own noise counter), so the
        # resumed run redoes this iteration exactly.
        long_chain = self.sampler.stop_check is not None and cfg.sampler_steps > self.sampler.chunk_steps
        undo = (self.gen.get_state(), self.batches.pos - self.batches.batch_size) if long_chain else None
        try:
            metrics = self.dist.reduce_mean(self.runner(real))  # the mean over ranks (identity on one process)
        except StopRequested:
            if undo is not None:
                self.gen.set_state(undo[0])
                self.batches.pos = undo[1]
            raise
        self.iteration += 1
        self._fit_iterations += 1
        noise = None
        if cfg.divergence_check and self.iteration % cfg.collapse_check_every == 0:
            noise = self._noise_out()
        self._history.record(self.iteration, metrics, noise)

    def _checkpoint_due(self) -> bool:
        """A mid-epoch ``last.pt`` when ``checkpoint_every_s`` seconds have passed since the last save (so a kill -9
        loses at most that much, also before the first epoch ends); the ranks of a data-parallel run agree."""
        due = self.ckpt_dir is not None and time.monotonic() - self._last_save >= self.checkpoint_every_s
        return bool(self.dist.agree_max(int(due))) if self.dist.distributed else due

    def _flush_due(self) -> bool:
        """A flush now: at every ``sync_every``-th iteration (or when the history is full), when a snapshot or a stop
        is due (both need checked metrics), or after the run's first iteration (so its time, with compilation and
        capture, is measured on its own)."""
        return (
            self._history.full
            or self.iteration % self.sync_every == 0
            or self.iteration % self.config.snapshot_every == 0
            or self.signals.requested
            or self._limit_reached()
            or self._fit_iterations == 1
        )

    def _flush(self, bar) -> str | None:
        """Copy the pending iterations' metrics to the host (one synchronisation) and hand each, in order, to the
        callbacks, the divergence monitor, the metrics log and the progress bar. Returns "rollback" when the monitor
        found a divergence (the iterations after the divergent one are dropped: the roll-back undoes them),
        "interrupted" / "max_iterations" when the loop must stop, else None (after a snapshot when one is due)."""
        rows = self._history.read()
        if not rows:
            return None
        cfg = self.config
        for i, (iteration, metrics, noise) in enumerate(rows):
            logged = {k: metrics[k] for k in STEP_METRICS}
            if metrics["update_skipped"]:
                logged["update_skipped"] = metrics["update_skipped"]
            for cb in self.callbacks:
                hook = getattr(cb, "on_step_end", None)
                if hook is not None:
                    logged.update(hook(self, iteration, metrics) or {})
            event = None
            if cfg.divergence_check:
                monitor = self.rollback.monitor
                event = monitor.check_step(iteration, metrics, noise_out=None if noise is None else (lambda v=noise: v))
                if iteration % cfg.collapse_check_every == 0:
                    logged.update(monitor.last_gap_metrics)
            self.metrics.log(iteration, self.epoch, logged)
            bar.update(1)
            bar.set_postfix(
                loss=f"{metrics['loss']:.3f}",
                real=f"{metrics['metrics_avg_real']:.3f}",
                fake=f"{metrics['metrics_avg_fake']:.3f}",
                refresh=False,
            )
            if event is not None:
                later = len(rows) - 1 - i
                if later:
                    self.note(
                        f"divergence at iteration {iteration} seen at the flush after iteration {self.iteration} "
                        f"(sync_every={self.sync_every}): the {later} iteration(s) after it are dropped",
                        warn=True,
                    )
                self._clock_rows(len(rows))
                self.rollback.recover(self, event)
                return "rollback"
        self._clock_rows(len(rows))
        if self.iteration % cfg.snapshot_every == 0:
            self.rollback.snapshot(self)
        if self._checkpoint_due():
            self._save("last")
        if self.signals.requested:
            return "interrupted"
        if self._limit_reached():
            return "max_iterations"
        return None

    # ================================================================================================ timing
    def _clock_rows(self, n: int) -> None:
        """Wall time since the last mark, charged to the run's first iteration (compilation, capture) or to the
        steady loop (iterations with their flushes, logging and snapshots; epoch-end work is timed apart)."""
        now = time.perf_counter()
        clock = self._clock
        if clock["first"] is None and self._fit_iterations == n == 1:
            clock["first"] = now - self._mark
        else:
            clock["loop_s"] += now - self._mark
            clock["loop_iterations"] += n
        self._mark = now

    def _finish_timing(self) -> None:
        """``timing`` (also in FitResult and, as ``time/...`` metrics, in the log): the first iteration's seconds,
        steady milliseconds per iteration, the median epoch-end seconds, the whole fit's seconds."""
        clock = getattr(self, "_clock", None)
        if clock is None:
            return
        timing = {"fit_s": time.time() - self._fit_start}
        if clock["first"] is not None:
            timing["first_iteration_s"] = clock["first"]
        if clock["loop_iterations"]:
            timing["iteration_ms"] = 1e3 * clock["loop_s"] / clock["loop_iterations"]
            timing["steady_iterations"] = float(clock["loop_iterations"])
        if clock["epoch_end_s"]:
            timing["epoch_end_s"] = statistics.median(clock["epoch_end_s"])
        self.timing = timing
        self.metrics.log(self.iteration, self.epoch, {f"time/{k}": v for k, v in timing.items()})
        parts = [f"{k} {v:.4g}" for k, v in timing.items()]
        self.note(f"timing: {', '.join(parts)} ({self.runner.describe()}, sync_every {self.sync_every})")

    def _end_epoch(self, seconds: float) -> str:
        t0 = time.perf_counter()
        try:
            return self._epoch_end_work(seconds)
        finally:
            if getattr(self, "_clock", None) is not None:
                self._clock["epoch_end_s"].append(time.perf_counter() - t0)

    def _epoch_end_work(self, seconds: float) -> str:
        cfg = self.config
        epoch = self.epoch
        metrics = self.validate(epoch)
        metrics["rand_out"] = self.rand_out(epoch)
        metrics["lr"] = float(self.optimizer.param_groups[0]["lr"])
        metrics["epoch_seconds"] = seconds
        self.scheduler.step()
        self._adopt_lr()  # an older torch's scheduler may assign a new lr object instead of writing into ours
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
            event = self.rollback.monitor.check_epoch(epoch, checked)
            if event is not None:
                self.rollback.recover(self, event)
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
        self.rollback.snapshot(self)
        summary = ", ".join(
            f"{k} {metrics[k]:.4g}" for k in ("val_contrastive_divergence", "val_real_out", "rand_out") if k in metrics
        )
        self.note(
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
            where = f"saved a resumable checkpoint: {path}" if path else "no --out folder, nothing saved"
            msg = f"{self.signals.name} at epoch {self.epoch}, iteration {self.iteration}: {where}"
            if path:
                msg += f". Resume with: ebmfast train --resume {path}"
            self.note(msg, warn=True, echo=True)
            self.metrics.log(self.iteration, self.epoch, {"interrupted": float(self.signals.signum)})
        else:
            self.note(
                f"reached max_iterations={self.config.max_iterations} (epoch {self.epoch}); saved {path}",
                echo=self.progress,
            )
        return why

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Ask ``fit`` to stop after the current iteration and save a resumable checkpoint (what SIGINT does)."""
        self.signals.request(signum)

    # =========================================================================================== state / files
    def state_dict(self, include_global_rng: bool = True) -> dict:
        """Everything besides the model weights that determines the rest of the run (``state.run_state``)."""
        return run_state(self, include_global_rng)

    def load_state_dict(self, state: dict, restore_global_rng: bool = True) -> None:
        restore_run_state(self, state, restore_global_rng)

    def checkpoint_state(self) -> dict:
        """What a training checkpoint holds (``state.checkpoint_payload``)."""
        return checkpoint_payload(self)

    def checkpoint_path(self, name: str) -> Path | None:
        """``OUT/checkpoints/NAME.pt`` (``None`` without an ``out_dir``)."""
        return self.ckpt_dir / f"{name}.pt" if self.ckpt_dir is not None else None

    def _save(self, name: str) -> Path | None:
        path = self.checkpoint_path(name)
        if path is None:
            return None
        self._last_save = time.monotonic()
        self.metrics.flush()
        state = self.checkpoint_state()  # in a process group: gathers every rank's shard and streams to rank 0
        if state is not None:
            save_checkpoint(path, state)
        self.dist.barrier("saving a checkpoint")  # no rank goes on (or exits) before the file is written
        return path

    def note(self, msg: str, warn: bool = False, echo: bool = False) -> None:
        """A line in the run's log (``train.log`` and the ``ebmfast.train`` logger); ``echo`` also prints it."""
        (self.log.warning if warn else self.log.info)(msg)
        if echo and self.dist.is_main:
            from tqdm.auto import tqdm

            tqdm.write(f"[ebmfast] {msg}")

    def close(self) -> None:
        """Flush and close the run's files (the trainer can still be used in memory)."""
        self.metrics.close()
        self.log.close()


def _checked_callbacks(callbacks) -> list:
    callbacks = list(callbacks)
    for cb in callbacks:
        if not callable(getattr(cb, "on_epoch_end", None)) and not callable(getattr(cb, "on_step_end", None)):
            raise TypeError(f"callback {cb!r} has neither on_epoch_end(trainer, epoch) nor on_step_end(...)")
    return callbacks


def _refuse_earlier_run(out_dir: Path) -> None:
    existing = out_dir / "checkpoints" / "last.pt"
    if existing.exists():
        raise FileExistsError(
            f"{out_dir} already holds a run ({existing}); continue it with "
            f"--resume {existing}, pick another --out, or pass --overwrite"
        )


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
