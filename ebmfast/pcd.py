"""``PCDSampler``: a drop-in for the seed tutorial's ``Sampler`` class (replay buffer + Langevin), on the fast engine.

The seed's code::

    self.sampler = Sampler(self.cnn, img_shape=img_shape, sample_size=batch_size)
    fake_imgs = self.sampler.sample_new_exmps(steps=60, step_size=10)
    imgs_per_step = Sampler.generate_samples(model, inp_imgs, steps=256, step_size=10, return_img_per_step=True)

work unchanged with ``from ebmfast.pcd import PCDSampler as Sampler``. The buffer lives on the model's device (it
follows the model when Lightning moves it), and the chain runs on ``backend`` (default ``auto``).
"""

from __future__ import annotations

import torch
from torch import nn

from .buffer import ReplayBuffer
from .reference import SEED_STEP
from .sampler import LangevinSampler

__all__ = ["PCDSampler"]


class PCDSampler:
    def __init__(
        self,
        model: nn.Module,
        img_shape: tuple[int, ...] | list[int],
        sample_size: int,
        max_len: int = 8192,
        backend: str = "auto",
        seed: int | None = None,
    ) -> None:
        self.model = model
        self.img_shape = tuple(img_shape)
        self.sample_size = int(sample_size)
        self.max_len = int(max_len)
        self.langevin = LangevinSampler(model, backend=backend, seed=seed)
        self.buffer: ReplayBuffer | None = None

    def _device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    def _buffer(self) -> ReplayBuffer:
        device = self._device()
        if self.buffer is None:
            self.buffer = ReplayBuffer(self.img_shape, capacity=self.max_len, device=device)
        elif self.buffer.device != device:  # the model moved (e.g. Lightning's .to(cuda)): the buffer follows
            state = self.buffer.state_dict()
            self.buffer = ReplayBuffer(self.img_shape, capacity=self.max_len, device=device)
            self.buffer.load_state_dict(state)
        return self.buffer

    def sample_new_exmps(self, steps: int = 60, step_size: float = SEED_STEP.step_size) -> torch.Tensor:
        """Draw starts from the buffer (5% fresh noise), run the chain, write the results back, return them."""
        buf = self._buffer()
        self.langevin.step_size = float(step_size)
        samples = self.langevin.sample(buf.draw(self.sample_size), steps=steps)
        buf.push(samples)
        return samples

    @staticmethod
    def generate_samples(
        model: nn.Module,
        inp_imgs: torch.Tensor,
        steps: int = 60,
        step_size: float = SEED_STEP.step_size,
        return_img_per_step: bool = False,
        backend: str = "auto",
    ):
        """The seed's static helper: chains from ``inp_imgs``; with ``return_img_per_step`` the (steps, ...) stack."""
        sampler = LangevinSampler(model, steps=steps, step_size=step_size, backend=backend)
        if return_img_per_step:
            return sampler.sample(inp_imgs, return_trajectory=True)[1]
        return sampler.sample(inp_imgs)
