"""The order in which a training run sees its images: shuffled mini-batches from a tensor on the training device."""

from __future__ import annotations

import torch

__all__ = ["TensorBatches"]


class TensorBatches:
    """Shuffled mini-batches (drop_last) from a tensor that already lives on the training device.

    The order is drawn from its own CPU generator, so it is reproducible and its state can be checkpointed:
    ``state_dict()`` holds the generator state, the epoch's permutation and the position in it."""

    def __init__(self, images: torch.Tensor, batch_size: int, seed: int = 0, drop_last: bool = True):
        if batch_size <= 0 or batch_size > len(images):
            raise ValueError(f"batch_size must be in [1, {len(images)}] for {len(images)} images, got {batch_size}")
        self.images = images
        self.batch_size = batch_size
        self.drop_last = drop_last
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
            idx = perm[self.pos : self.pos + self.batch_size]
            self.pos += self.batch_size
            yield self.images.index_select(0, idx)
        self.perm = None  # the epoch is over: the next iteration draws a new order

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.perm = state["perm"]
        self.pos = int(state["pos"])
