"""The order in which a training run sees its images: shuffled mini-batches from a tensor on the training device.

In a data-parallel run every rank draws the same order (the same seed) and takes its own slice of each batch, the way
``torch.utils.data.DistributedSampler`` gives each rank a disjoint part of one shared permutation: batch ``i`` of the
epoch is ``perm[i * B : (i + 1) * B]`` for ``B = batch_size`` images in total, and rank ``r`` of ``N`` takes
``B / N`` consecutive images of it. Together the ranks see exactly the images one process sees, in the same batches,
each image on one rank; the order is reshuffled every epoch. The state (generator, permutation, position) is the same
on every rank, so a checkpoint holds it once and it resumes on any number of ranks.
"""

from __future__ import annotations

import torch

__all__ = ["TensorBatches"]


class TensorBatches:
    """Shuffled mini-batches (drop_last) from a tensor that already lives on the training device.

    The order is drawn from its own CPU generator, so it is reproducible and its state can be checkpointed:
    ``state_dict()`` holds the generator state, the epoch's permutation and the position in it.

    ``batch_size`` is the batch of all ranks together; with ``world_size`` N > 1 this rank (``rank``) gets
    ``batch_size / N`` images per iteration (``batch_size`` must be divisible by N)."""

    def __init__(
        self,
        images: torch.Tensor,
        batch_size: int,
        seed: int = 0,
        drop_last: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size <= 0 or batch_size > len(images):
            raise ValueError(f"batch_size must be in [1, {len(images)}] for {len(images)} images, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {world_size} ranks")
        if world_size > 1 and not drop_last:
            raise ValueError("sharded batches need drop_last=True (every rank takes an equal share of every batch)")
        self.images = images
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = batch_size // world_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm: torch.Tensor | None = None
        self.pos = 0

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        if self.perm is None or self.pos >= len(self) * self.batch_size or self.pos >= len(self.images):
            self.perm = torch.randperm(len(self.images), generator=self.generator)
            self.pos = 0
        # One copy of the order to the images' device per epoch, not one per batch: on CUDA a blocking copy from
        # the host waits for all queued work (a host synchronisation in every iteration).
        perm = self.perm.to(self.images.device)
        while self.pos < len(self) * self.batch_size and self.pos < len(self.images):
            start = self.pos + self.rank * self.local_batch_size
            idx = perm[start : start + self.local_batch_size]
            self.pos += self.batch_size
            yield self.images.index_select(0, idx)
        self.perm = None  # the epoch is over: the next iteration draws a new order

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"]
        self.pos = int(state["pos"])
