"""``TrainConfig``: every knob of a training run, with the seed tutorial's values as defaults, and named presets.

- ``tutorial``: the seed's configuration exactly (60 epochs of batch 128, Adam 1e-4 with betas (0.0, 0.999), StepLR
  0.97 per epoch, gradient-norm clip 0.1, alpha 0.1, 60 Langevin steps of size 10, replay buffer of 8192 with 5%
  fresh starts). The data default is the embedded 5,000-image MNIST subset; ``data="mnist"`` is the seed's set.
- ``quick``: the same recipe, shortened so that it finishes in at most 10 minutes on a 2-core CPU and still gives
  digit-like samples (measured numbers: ``docs/quick_preset.md``).

The config is a frozen dataclass: build one with ``TrainConfig(...)``, ``TrainConfig.preset(name, **overrides)``,
``TrainConfig.from_dict(d)`` or ``cfg.replace(**overrides)``; every field is checked on construction and a bad
value raises ``ValueError``/``TypeError`` naming the field, what was expected and what was given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Any

from ..data import DATASETS
from ..reference import SEED_STEP
from ..sampler import BACKENDS, PRECISION_MODES

__all__ = ["TrainConfig", "PRESETS", "config_value"]


@dataclass(frozen=True)
class TrainConfig:
    # ---- data and model
    data: str = "mnist5k"  # "mnist5k" (embedded subset, no network) or "mnist" (the seed's full MNIST)
    hidden_features: int = 32  # CNNModel width; 32 is the seed's (76,993 parameters)
    # ---- optimisation (seed: DeepEnergyModel.configure_optimizers / training_step, Trainer(gradient_clip_val))
    batch_size: int = 128
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    lr_gamma: float = 0.97  # StepLR(step_size=1 epoch, gamma)
    grad_norm_clip: float = 0.1
    alpha: float = 0.1  # weight of the energy-magnitude regulariser
    real_noise_std: float = 0.005  # N(0, std^2) added to real images (then clamped to [-1, 1])
    epochs: int = 60
    max_iterations: int | None = None  # stop after this many training iterations in total (None: all epochs)
    seed: int = 42
    # ---- Langevin sampler used in training (seed: Sampler.sample_new_exmps(steps=60, step_size=10))
    sampler_steps: int = 60
    sampler_step_size: float = SEED_STEP.step_size
    sampler_noise_std: float = SEED_STEP.noise_std
    sampler_grad_clip: float = SEED_STEP.grad_clip
    sampler_backend: str = "auto"  # "auto" | "eager" | "compiled" | "fused" | "graph" (see LangevinSampler)
    sampler_precision: str = "fp32"  # "fp32" | "tf32" | "bf16"
    # ---- replay buffer
    buffer_size: int = 8192
    buffer_fresh_prob: float = 0.05
    # ---- monitoring (seed callbacks: OutlierCallback, GenerateCallback, SamplerCallback)
    val_batch_size: int = 256
    rand_out_images: int = 1024  # rand_out = mean f(x) over this many U(-1, 1) images, every epoch
    sample_every: int = 5  # PNG grids every N epochs (epoch % N == 0) and after the last epoch; 0 = never
    gen_chains: int = 8  # generation grid: chains started from noise
    gen_steps: int = 256  # ... each run for this many Langevin steps
    gen_show_every: int = 32  # ... showing every N-th step (256 / 32 = 8 columns)
    buffer_grid_images: int = 32  # buffer grid: this many random replay-buffer images
    tensorboard: bool = True
    # ---- how the iteration runs (ebmfast.training.step)
    iteration_graph: bool = True  # CUDA: the whole CD iteration as one CUDA graph (CDGraph) where it can be; CPU: off
    sync_every: int | None = None  # copy step metrics to the host every N iterations; None: 1 on CPU, 10 on CUDA
    # ---- divergence detection and recovery (ebmfast.training.divergence)
    divergence_check: bool = True
    max_recoveries: int = 3  # roll-backs allowed in one run before giving up
    recovery_lr_factor: float = 0.5  # lr multiplier applied at each roll-back (1.0 keeps the lr)
    energy_limit: float = 1000.0  # |mean f| above this = explosion (the seed's run stays within +-20)
    snapshot_every: int = 50  # iterations between in-memory "last good" snapshots
    collapse_check_every: int = 10  # iterations between data/sample/noise energy-gap checks
    collapse_patience: int = 3  # consecutive failing gap checks before a collapse is declared
    collapse_ratio: float = 0.2  # gap below this fraction of its reference = collapsed
    collapse_min_gap: float = 1.0  # gap checks start once data-minus-noise energy has reached this

    # ------------------------------------------------------------------------------------------ construction
    def __post_init__(self):
        _validate(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> TrainConfig:
        """The named preset (``quick`` or ``tutorial``) with ``overrides`` applied."""
        if name not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **overrides) -> TrainConfig:
        unknown = sorted(set(overrides) - set(self.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {self.field_names()}")
        return dataclasses.replace(self, **overrides)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples become lists in JSON; ``from_dict`` turns them back)."""
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        if not isinstance(d, dict):
            raise TypeError(f"TrainConfig.from_dict expects a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; known fields: {cls.field_names()}")
        kw = dict(d)
        if "betas" in kw and isinstance(kw["betas"], list):
            kw["betas"] = tuple(kw["betas"])
        return cls(**kw)

    @classmethod
    def parse_value(cls, name: str, text: str):
        """Turn the text of a command-line override (``--set name=text``) into a value of the field's type."""
        kinds = {f.name: f.type for f in fields(cls)}
        if name not in kinds:
            raise ValueError(f"unknown TrainConfig field {name!r}; known fields: {cls.field_names()}")
        kind = str(kinds[name])
        t = text.strip()
        try:
            if "None" in kind and t.lower() in ("none", "null", ""):
                return None
            if kind.startswith("bool"):
                if t.lower() in ("1", "true", "yes", "on"):
                    return True
                if t.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError("expected true/false")
            if kind.startswith("int"):
                return int(t)
            if kind.startswith("float"):
                return float(t)
            if kind.startswith("tuple"):
                return tuple(float(p) for p in t.strip("()[] ").split(","))
            return t
        except ValueError as exc:
            raise ValueError(f"{name}: cannot read {text!r} as {kind} ({exc})") from None

    def model_kwargs(self) -> dict[str, int]:
        return {"hidden_features": self.hidden_features, "out_dim": 1, "in_channels": 1}


# ---------------------------------------------------------------------------------------------------- presets
PRESETS: dict[str, dict[str, Any]] = {
    # The seed tutorial's run, field for field (TrainConfig's defaults).
    "tutorial": {},
    # Shortened for a 2-core CPU, <= 10 minutes (docs/quick_preset.md has the measurements): 12 epochs of the
    # embedded subset's 4,500 training images = 420 iterations, at twice the seed's lr (at the seed's lr, a run on
    # this project's 2-core CPU held recognisable digits in the replay buffer after 760 iterations; see
    # docs/quick_preset.md). One epoch here is 35 iterations, 1/13 of a full-MNIST epoch (468), so the per-epoch
    # StepLR factor is 0.97^(35/468) = 0.9977: the lr decays per iteration as in the seed's run. Everything else is
    # the seed's.
    "quick": {
        "data": "mnist5k",
        "epochs": 12,
        "lr": 2e-4,
        "lr_gamma": 0.9977,
        "sample_every": 5,
    },
}


def config_value(config, key: str, default=None):
    """``key`` of a training config given as a ``TrainConfig``, any object with that attribute, or a dict (as stored
    in a checkpoint; also looked up one level down, e.g. ``config["sampler"]["step_size"]``); ``default`` when it
    is absent or ``None``."""
    if config is None:
        return default
    if isinstance(config, dict):
        if key in config:
            value = config[key]
        else:
            value = next((v[key] for v in config.values() if isinstance(v, dict) and key in v), None)
    else:
        value = getattr(config, key, None)
    return default if value is None else value


# -------------------------------------------------------------------------------------------------- validation
def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


# Upper bounds of the size fields, with their reasons: a typo (an extra zero or six) must not start a run that cannot
# end or allocate more memory than any machine has; a stop request is honoured within a chain (every 1,000 steps).
_STEPS_WHY = "the seed uses 60 to 256; more is a typo or a run that never ends"
_IMAGES_WHY = "images held on the device at once, 3,136 bytes each in fp32"
_COUNT_WHY = "a count this large is a typo"
_BOUNDS: dict[str, tuple[int, str]] = {
    "hidden_features": (4096, "the CNN's width"),
    "batch_size": (1 << 20, _IMAGES_WHY),
    "epochs": (1_000_000, _COUNT_WHY),
    "max_iterations": (1 << 40, _COUNT_WHY),
    "sampler_steps": (1_000_000, _STEPS_WHY),
    "buffer_size": (1 << 24, _IMAGES_WHY),
    "val_batch_size": (1 << 20, _IMAGES_WHY),
    "rand_out_images": (1 << 20, _IMAGES_WHY),
    "sample_every": (1_000_000, _COUNT_WHY),
    "gen_chains": (1024, "chains in the generation picture"),
    "gen_steps": (1_000_000, _STEPS_WHY),
    "gen_show_every": (1_000_000, _COUNT_WHY),
    "buffer_grid_images": (1 << 16, "images in the buffer picture"),
    "sync_every": (10_000, "iterations whose metrics wait on the device"),
    "max_recoveries": (1000, _COUNT_WHY),
    "snapshot_every": (1_000_000, _COUNT_WHY),
    "collapse_check_every": (1_000_000, _COUNT_WHY),
    "collapse_patience": (1_000_000, _COUNT_WHY),
}


def _int(cfg, name, lo=None, hi=None, allow_none=False):
    v = getattr(cfg, name)
    if v is None and allow_none:
        return
    if not _is_int(v):
        raise TypeError(f"TrainConfig.{name} must be an integer, got {type(v).__name__} {v!r}")
    if lo is not None and v < lo:
        raise ValueError(f"TrainConfig.{name} must be >= {lo}, got {v!r}")
    if hi is None and name in _BOUNDS:
        hi, why = _BOUNDS[name]
        if v > hi:
            raise ValueError(f"TrainConfig.{name} must be <= {hi:,} ({why}), got {v!r}")
    if hi is not None and v > hi:
        raise ValueError(f"TrainConfig.{name} must be <= {hi}, got {v!r}")


def _float(cfg, name, lo=None, hi=None, lo_open=False, hi_open=False):
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, Real):
        raise TypeError(f"TrainConfig.{name} must be a real number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"TrainConfig.{name} must be finite, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"TrainConfig.{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"TrainConfig.{name} must be {'<' if hi_open else '<='} {hi}, got {v!r}")


def _choice(cfg, name, choices):
    v = getattr(cfg, name)
    if v not in choices:
        raise ValueError(f"TrainConfig.{name} must be one of {list(choices)}, got {v!r}")


def _bool(cfg, name):
    v = getattr(cfg, name)
    if not isinstance(v, bool):
        raise TypeError(f"TrainConfig.{name} must be True or False, got {type(v).__name__} {v!r}")


def _validate(cfg: TrainConfig) -> None:
    _choice(cfg, "data", DATASETS)
    _int(cfg, "hidden_features", lo=2)
    if cfg.hidden_features % 2:
        raise ValueError(
            f"TrainConfig.hidden_features must be even (the first layer has half as many), got {cfg.hidden_features}"
        )
    _int(cfg, "batch_size", lo=1)
    _float(cfg, "lr", lo=0.0, lo_open=True)
    b = cfg.betas
    if not isinstance(b, tuple) or len(b) != 2:
        raise TypeError(f"TrainConfig.betas must be a pair (beta1, beta2), got {b!r}")
    for i, beta in enumerate(b):
        if isinstance(beta, bool) or not isinstance(beta, Real) or not (0.0 <= float(beta) < 1.0):
            raise ValueError(f"TrainConfig.betas[{i}] must be a number in [0, 1), got {beta!r}")
    _float(cfg, "lr_gamma", lo=0.0, hi=1.0, lo_open=True)
    _float(cfg, "grad_norm_clip", lo=0.0, lo_open=True)
    _float(cfg, "alpha", lo=0.0)
    _float(cfg, "real_noise_std", lo=0.0)
    _int(cfg, "epochs", lo=1)
    _int(cfg, "max_iterations", lo=1, allow_none=True)
    _int(cfg, "seed", lo=0, hi=2**62)
    _int(cfg, "sampler_steps", lo=1)
    _float(cfg, "sampler_step_size", lo=0.0, lo_open=True)
    _float(cfg, "sampler_noise_std", lo=0.0)
    _float(cfg, "sampler_grad_clip", lo=0.0, lo_open=True)
    _choice(cfg, "sampler_backend", BACKENDS)
    _choice(cfg, "sampler_precision", PRECISION_MODES)
    _int(cfg, "buffer_size", lo=1)
    if cfg.batch_size > cfg.buffer_size:
        raise ValueError(
            f"TrainConfig.batch_size ({cfg.batch_size}) must be <= buffer_size ({cfg.buffer_size}): "
            "each iteration writes a batch of chains back into the buffer"
        )
    _float(cfg, "buffer_fresh_prob", lo=0.0, hi=1.0)
    _int(cfg, "val_batch_size", lo=1)
    _int(cfg, "rand_out_images", lo=1)
    _int(cfg, "sample_every", lo=0)
    _int(cfg, "gen_chains", lo=1)
    _int(cfg, "gen_steps", lo=1)
    _int(cfg, "gen_show_every", lo=1)
    if cfg.gen_show_every > cfg.gen_steps:
        raise ValueError(f"TrainConfig.gen_show_every ({cfg.gen_show_every}) must be <= gen_steps ({cfg.gen_steps})")
    _int(cfg, "buffer_grid_images", lo=1)
    if cfg.buffer_grid_images > cfg.buffer_size:
        raise ValueError(
            f"TrainConfig.buffer_grid_images ({cfg.buffer_grid_images}) must be <= buffer_size ({cfg.buffer_size})"
        )
    _bool(cfg, "tensorboard")
    _bool(cfg, "iteration_graph")
    _int(cfg, "sync_every", lo=1, allow_none=True)
    _bool(cfg, "divergence_check")
    _int(cfg, "max_recoveries", lo=0)
    _float(cfg, "recovery_lr_factor", lo=0.0, hi=1.0, lo_open=True)
    _float(cfg, "energy_limit", lo=0.0, lo_open=True)
    _int(cfg, "snapshot_every", lo=1)
    _int(cfg, "collapse_check_every", lo=1)
    _int(cfg, "collapse_patience", lo=1)
    _float(cfg, "collapse_ratio", lo=0.0, hi=1.0, hi_open=True)
    _float(cfg, "collapse_min_gap", lo=0.0, lo_open=True)
