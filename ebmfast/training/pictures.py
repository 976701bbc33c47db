"""The pictures a training run writes (the seed's GenerateCallback and SamplerCallback): chains from noise, and
replay-buffer images, as PNG grids under ``OUT/samples/`` and TensorBoard images.

The chains use their own sampler, reseeded per epoch, so the pictures never touch the training noise stream. On CPU
it is eager: a compile for an 8-chain batch costs more than it saves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..sampler import LangevinSampler
from .state import S_VIS, S_VIS_BUF, S_VIS_START, derive_seed

__all__ = ["TrainingPictures"]

IMAGE_SHAPE = (1, 28, 28)


class TrainingPictures:
    def __init__(self, model, config, device: torch.device, **sampler_kw):
        self.config = config
        self.device = device
        backend = "eager" if device.type == "cpu" else config.sampler_backend
        self.sampler = LangevinSampler(model, steps=config.gen_steps, backend=backend, seed=0, **sampler_kw)

    @torch.no_grad()
    def save(self, epoch: int, iteration: int, buffer, metrics, out_dir: Path | None) -> list[Path]:
        """Both grids for ``epoch``: to TensorBoard (through ``metrics``) and, with an ``out_dir``, as PNGs."""
        from torchvision.utils import make_grid, save_image

        cfg = self.config
        g = torch.Generator(device=self.device).manual_seed(derive_seed(cfg.seed, 0, S_VIS_START + epoch))
        start = torch.rand((cfg.gen_chains, *IMAGE_SHAPE), generator=g, device=self.device).mul_(2).sub_(1)
        self.sampler.manual_seed(derive_seed(cfg.seed, 0, S_VIS + epoch))
        _, traj = self.sampler.sample(start, steps=cfg.gen_steps, return_trajectory=True)
        shown = traj[cfg.gen_show_every - 1 :: cfg.gen_show_every]  # (columns, chains, 1, 28, 28)
        gen_imgs = shown.transpose(0, 1).reshape(-1, *IMAGE_SHAPE).float().cpu()  # one row per chain
        pick = torch.randperm(
            buffer.capacity, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, 0, S_VIS_BUF + epoch))
        )[: cfg.buffer_grid_images]
        buf_imgs = buffer.storage.index_select(0, pick.to(self.device)).float().cpu()
        grids = {
            "generation": (gen_imgs, shown.shape[0]),
            "buffer": (buf_imgs, min(8, len(buf_imgs))),
        }
        paths = []
        for name, (imgs, nrow) in grids.items():
            grid = make_grid(imgs, nrow=nrow, normalize=True, value_range=(-1, 1), pad_value=0.5)
            metrics.image(f"samples/{name}", grid, iteration)
            if out_dir is not None:
                path = Path(out_dir) / "samples" / f"{name}_epoch{epoch:03d}.png"
                save_image(grid, path)
                paths.append(path)
        return paths
