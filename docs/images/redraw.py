"""Redraw the two sample grids of the docs at 84 pixels per digit from the earlier, smaller pictures: no retraining,
no new sampling; the pixels are the same, only enlarged.

    python3 docs/images/redraw.py OLD_QUICK_SAMPLES.png OLD_GENERATION_STEPS.png docs/images

The originals are in the repository's history (``git show 185461f:docs/images/quick_samples.png`` and
``...:docs/images/generation_steps.png``).

- ``quick_samples.png`` was torchvision's 8 x 4 grid of 28-pixel images (2-pixel grey gaps): its tiles are taken
  as they are.
- ``generation_steps.png`` was a matplotlib figure showing a 9 x 8 grid of 28-pixel images (2-pixel white gaps) at
  about 2x: every model pixel a block of 2 (a few of 1) screen pixels, nearest-neighbour. The transform from model
  pixel to screen pixel is fitted per axis (offset and scale) so that every screen pixel of one model pixel has one
  value; one screen column where matplotlib blended two neighbours is skipped. The check below refuses to write
  anything unless the read-back grid has exactly the white gaps of the original layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ebmfast.images import grid_image, save_image

CELL, PAD = 28, 2


def tiles(grid: np.ndarray, ncols: int, nrows: int) -> torch.Tensor:
    """The 28 x 28 tiles of a grid with 2-pixel gaps, row by row, as uint8 (N, 1, 28, 28)."""
    out = [
        grid[
            PAD + r * (CELL + PAD) : PAD + r * (CELL + PAD) + CELL,
            PAD + c * (CELL + PAD) : PAD + c * (CELL + PAD) + CELL,
        ]
        for r in range(nrows)
        for c in range(ncols)
    ]
    return torch.from_numpy(np.stack(out)).unsqueeze(1)


def _fit(values: np.ndarray, n_src: int, lo: int, hi: int, axis: int) -> np.ndarray:
    """Screen index -> model index along one axis: floor((x + 0.5 - offset) / scale), offset and scale chosen so that
    the fewest neighbouring screen lines of one model line differ."""
    best = None
    xs = np.arange(lo, hi)
    for offset in np.arange(lo - 2.5, lo + 0.5, 0.01):
        for scale in np.arange(1.985, 2.0, 0.0001):
            idx = np.floor((xs + 0.5 - offset) / scale).astype(int)
            if idx.min() != 0 or idx.max() != n_src - 1:
                continue
            lines = np.take(values, xs, axis=axis)
            same = idx[1:] == idx[:-1]
            a, b = np.take(lines, np.arange(1, len(xs)), axis=axis), np.take(lines, np.arange(len(xs) - 1), axis=axis)
            diff = (a != b).any(axis=1 - axis)[same].sum()
            if best is None or diff < best[0]:
                best = (diff, idx)
    return best[1]


def read_back_generation(path: Path) -> np.ndarray:
    a = np.asarray(Image.open(path).convert("L")).astype(np.int32)
    rows_src, cols_src = 8 * (CELL + PAD) + PAD, 9 * (CELL + PAD) + PAD
    r0, r1, c0, c1 = 49, 531, 61, 602  # inside the axes' frame lines (found by looking at the picture)
    ry = _fit(a[:, c0:c1], rows_src, r0, r1, axis=0)
    cx = _fit(a[r0:r1, :], cols_src, c0, c1, axis=1)
    grid = np.zeros((rows_src, cols_src), dtype=np.int32)
    for r in range(rows_src):
        y = r0 + int(np.nonzero(ry == r)[0][0])
        for c in range(cols_src):
            xs = c0 + np.nonzero(cx == c)[0]
            grid[r, c] = np.bincount(a[y, xs]).argmax()  # the blended seam column loses the vote
    gaps = np.ones_like(grid, dtype=bool)
    for r in range(8):
        for c in range(9):
            gaps[
                PAD + r * (CELL + PAD) : PAD + r * (CELL + PAD) + CELL,
                PAD + c * (CELL + PAD) : PAD + c * (CELL + PAD) + CELL,
            ] = False
    if not (grid[gaps] == 255).all():
        raise SystemExit("the read-back grid does not have the original's white gaps: not writing anything")
    return grid.astype(np.uint8)


def main(quick: str, generation: str, out_dir: str) -> None:
    out = Path(out_dir)
    q = np.asarray(Image.open(quick).convert("L"))
    assert q.shape == (4 * (CELL + PAD) + PAD, 8 * (CELL + PAD) + PAD), q.shape
    save_image(
        grid_image(
            tiles(q, 8, 4),
            8,
            title="Replay buffer after 385 iterations of --preset quick (epoch 11 of 12)",
            caption="32 random images of 8192 (the persistent training chains); each digit shown 3x, nearest-neighbour",
        ),
        out / "quick_samples.png",
    )
    g = read_back_generation(Path(generation))
    steps = [0, 32, 64, 96, 128, 160, 192, 224, 256]
    save_image(
        grid_image(
            tiles(g, 9, 8),
            9,
            title="Generation from noise: 8 chains",
            caption="rows: chains; columns: after the Langevin step shown above (0 = the U(-1, 1) start)",
            col_labels=[str(k) for k in steps],
        ),
        out / "generation_steps.png",
    )


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
