"""The pictures a training run writes (the seed's GenerateCallback and SamplerCallback): chains from noise, and
replay-buffer images, as PNG grids under ``OUT/samples/`` and TensorBoard images.

The chains use their own sampler, reseeded per epoch, so the pictures never touch the training noise stream. On CPU
it is eager: a compile for an 8-chain batch costs more than it saves. The grids are drawn by ``ebmfast.images``: each
digit at 84 pixels (nearest-neighbour), titled with the iteration and epoch, the columns labelled with their steps.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import require
from ..images import grid_image, image_tensor, save_image
from ..sampler import LangevinSampler
from .state import S_VIS, S_VIS_BUF, S_VIS_START, derive_seed

__all__ = ["TrainingPictures"]

IMAGE_SHAPE = (1, 28, 28)


class TrainingPictures:
    def __init__(self, model, config, device: torch.device, **sampler_kw):
        if config.sample_every:  # checked when the trainer is built, before it writes anything
            require("PIL.Image", "the training's sample pictures (sample_every > 0)", package="pillow")
        self.config = config
        self.device = device
        backend = "eager" if device.type == "cpu" else config.sampler_backend
        self.sampler = LangevinSampler(model, steps=config.gen_steps, backend=backend, seed=0, **sampler_kw)

    @torch.no_grad()
    def save(self, epoch: int, iteration: int, buffer, metrics, out_dir: Path | None) -> list[Path]:
        """Both grids for ``epoch`` (0-based, as in the file names): to TensorBoard (through ``metrics``) and, with
        an ``out_dir``, as PNGs. Each digit is shown at 84 pixels (``ebmfast.images``), titled with the iteration."""
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
        when = f"iteration {iteration} (epoch {epoch + 1} of {cfg.epochs})"
        steps = list(range(cfg.gen_show_every, cfg.gen_steps + 1, cfg.gen_show_every))[: shown.shape[0]]
        pictures = {
            "generation": grid_image(
                gen_imgs,
                shown.shape[0],
                title=f"Chains from U(-1, 1) noise, {when}",
                caption=f"rows: {cfg.gen_chains} chains; columns: after the Langevin step shown above "
                f"(one column every {cfg.gen_show_every} of {cfg.gen_steps} steps)",
                col_labels=[str(k) for k in steps],
            ),
            "buffer": grid_image(
                buf_imgs,
                min(8, len(buf_imgs)),
                title=f"Replay buffer, {when}",
                caption=f"{len(buf_imgs)} random images of {buffer.capacity} (the persistent training chains)",
            ),
        }
        paths = []
        for name, picture in pictures.items():
            metrics.image(f"samples/{name}", image_tensor(picture), iteration)
            if out_dir is not None:
                paths.append(save_image(picture, Path(out_dir) / "samples" / f"{name}_epoch{epoch:03d}.png"))
        return paths
