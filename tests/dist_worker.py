"""One rank of a small data-parallel training run, for tests/test_distributed.py (started by torchrun, gloo on CPU).

Builds the tiny trainer of train_helpers on the first 160 mnist5k images (each image's top-left pixel encodes its
index, so the test can tell which images each rank trained on), trains, and saves what the test compares to
OUT/rank{RANK}.pt: parameters, replay-buffer shard, sampler and generator states, Adam state, counters, the indices
of the images this rank saw, and which ebmfast it imported.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py --out DIR --max-iterations N
        [--resume CKPT] [--config JSON] [--device cpu|cuda] [--inject-divergence-at I]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from train_helpers import small_data, tiny_config

import ebmfast
from ebmfast.data import DataSplits
from ebmfast.training.batches import TensorBatches
from ebmfast.training.distributed import init_distributed, shutdown_distributed
from ebmfast.training.divergence import DivergenceEvent
from ebmfast.training.trainer import Trainer

N_TRAIN = 160


def encode(images: torch.Tensor) -> torch.Tensor:
    """Image i gets pixel (0, 0, 0) = -1 + 2 (i + 1) / (N + 1) (the corner is background in MNIST)."""
    images = images.clone()
    images[:, 0, 0, 0] = -1 + 2 * (torch.arange(len(images), dtype=torch.float32) + 1) / (len(images) + 1)
    return images


def decode(batch: torch.Tensor) -> list[int]:
    return (((batch[:, 0, 0, 0].double() + 1) / 2 * (N_TRAIN + 1)).round() - 1).long().tolist()


class RecordingBatches(TensorBatches):
    """TensorBatches that remember the index of every image they hand out."""

    seen: list[int]

    def __iter__(self):
        for batch in super().__iter__():
            self.seen.extend(decode(batch))
            yield batch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--max-iterations", type=int, required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--config", default="{}", help="JSON overrides of the tiny config")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (rank r on cuda:LOCAL_RANK, NCCL)")
    p.add_argument("--inject-divergence-at", type=int, default=None, help="rank 1 alone reports a divergence here")
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx, device = init_distributed(args.device, timeout_s=60)
    d = small_data(N_TRAIN, 64)
    data = DataSplits(d.name, encode(d.train_images), d.train_labels, d.val_images, d.val_labels)
    config = tiny_config(epochs=3, snapshot_every=4, collapse_check_every=2, max_iterations=args.max_iterations)
    config = config.replace(**json.loads(args.config))
    trainer = Trainer(config, data=data, device=device, out_dir=args.out, resume=args.resume, progress=False)
    trainer.batches.__class__ = RecordingBatches
    trainer.batches.seen = []
    if args.inject_divergence_at is not None and ctx.rank == 1:
        monitor = trainer.rollback.monitor._inner
        check, fired = monitor.check_step, []

        def check_step(iteration, metrics, **kw):
            if iteration == args.inject_divergence_at and not fired:
                fired.append(iteration)
                return DivergenceEvent("energy_explosion", f"injected on rank 1 at iteration {iteration}")
            return check(iteration, metrics, **kw)

        monitor.check_step = check_step
    result = trainer.fit()
    trainer.close()
    opt = [t.clone() for s in trainer.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    torch.save(
        {
            "rank": ctx.rank,
            "world_size": ctx.world_size,
            "backend": ctx.backend,
            "device": str(device),
            "ebmfast_file": ebmfast.__file__,
            "status": result.status,
            "iteration": result.iteration,
            "epoch": result.epoch,
            "recoveries": result.recoveries,
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "buffer": trainer.buffer.storage.clone(),
            "buffer_ptr": int(trainer.buffer.ptr),
            "sampler": trainer.sampler.state_dict(),
            "generator": trainer.gen.get_state(),
            "adam": opt,
            "seen": trainer.batches.seen,
            "events": trainer.events,
            "metrics": result.metrics,
        },
        Path(args.out) / f"rank{ctx.rank}.pt",
    )
    shutdown_distributed(ctx)


if __name__ == "__main__":
    main()
