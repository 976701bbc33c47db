"""Shared pieces of the trainer tests: a tiny configuration, a small slice of the embedded data, one CPU thread.

Tiny models on 2 busy cores run far faster on one thread (measured: a batch-16 step took 0.05 s with one thread and
1.5-4.8 s with two while other processes were using the cores), so these tests pin torch to one thread and restore it.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ebmfast.data import DataSplits, load_mnist5k
from ebmfast.training.config import TrainConfig


def tiny_config(**overrides) -> TrainConfig:
    base = dict(
        hidden_features=8,
        batch_size=16,
        sampler_steps=5,
        buffer_size=128,
        sampler_backend="eager",
        epochs=2,
        rand_out_images=32,
        val_batch_size=64,
        gen_chains=2,
        gen_steps=4,
        gen_show_every=2,
        buffer_grid_images=8,
        sample_every=1,
        tensorboard=False,
        snapshot_every=4,
    )
    base.update(overrides)
    return TrainConfig(**base)


@functools.cache
def _mnist5k():
    return load_mnist5k()


def small_data(n_train: int = 160, n_val: int = 64) -> DataSplits:
    d = _mnist5k()
    return DataSplits(
        "mnist5k", d.train_images[:n_train], d.train_labels[:n_train], d.val_images[:n_val], d.val_labels[:n_val]
    )


# CLI flags for the same tiny run (added after "train").
TINY_CLI = [
    "--device",
    "cpu",
    "--hidden",
    "8",
    "--batch-size",
    "16",
    "--sampler-steps",
    "3",
    "--buffer-size",
    "64",
    "--sampler-backend",
    "eager",
    "--gen-steps",
    "4",
    "--no-tensorboard",
    "--quiet",
    "--set",
    "gen_show_every=2",
    "--set",
    "rand_out_images=16",
    "--set",
    "gen_chains=2",
    "--set",
    "buffer_grid_images=8",
]


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
