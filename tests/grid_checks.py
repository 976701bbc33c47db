"""Checks of the sample pictures people look at (``ebmfast.images``): find the tiled block of digits in a picture
and prove it is a whole-factor nearest-neighbour enlargement of a 28-pixel grid, each digit at least 84 pixels."""

from __future__ import annotations

import numpy as np

from ebmfast.images import GAP_VALUE, MARGIN, MIN_PIXELS, PAD


def grid_block(picture, ncols: int, nrows: int, size: int = 28) -> tuple[np.ndarray, int]:
    """The block of ``nrows x ncols`` tiles in ``picture`` (a PIL image without cell labels) and its scale.

    The block starts at x = MARGIN with a grey gap row as wide as the block; its scale is the smallest whole
    factor that shows ``size`` pixels at MIN_PIXELS or more."""
    a = np.asarray(picture.convert("L"))
    s = -(-MIN_PIXELS // size)
    bw, bh = (ncols * (size + PAD) + PAD) * s, (nrows * (size + PAD) + PAD) * s
    assert a.shape[1] >= MARGIN + bw, f"picture {a.shape} narrower than {ncols} tiles at {s}x"
    rows = [y for y in range(a.shape[0] - bh + 1) if (a[y, MARGIN : MARGIN + bw] == GAP_VALUE).all()]
    assert rows, "no grid block found"
    block = a[rows[0] : rows[0] + bh, MARGIN : MARGIN + bw]
    return block, s


def assert_honest_grid(picture, ncols: int, nrows: int, size: int = 28) -> np.ndarray:
    """The block is exactly the ``size``-pixel grid enlarged by nearest-neighbour (every pixel a s x s square) and
    each digit is at least MIN_PIXELS wide; returns the 1x grid (the model's pixels)."""
    block, s = grid_block(picture, ncols, nrows, size)
    assert size * s >= MIN_PIXELS
    small = block[::s, ::s]
    assert np.array_equal(np.repeat(np.repeat(small, s, axis=0), s, axis=1), block), "not a nearest-neighbour blow-up"
    return small
