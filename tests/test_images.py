"""``ebmfast.images``: the grids people look at are the model's pixels, enlarged by nearest-neighbour (each 28-pixel
digit at 84 pixels), with text only on the margin."""

import numpy as np
import pytest
import torch
from grid_checks import assert_honest_grid
from PIL import Image

from ebmfast.images import MIN_PIXELS, grid_image, image_tensor, save_image, scale_for, tile, to_pixels


def _digits(n=6, seed=0):
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_grid_is_the_torchvision_grid_enlarged():
    """The 1x grid inside the picture is, pixel for pixel, what torchvision's make_grid + save_image wrote before."""
    tv = pytest.importorskip("torchvision.utils")
    x = _digits(6)
    picture = grid_image(x, 4, title="a title", caption="a caption that says what the rows and columns are")
    small = assert_honest_grid(picture, ncols=4, nrows=2)
    grid = tv.make_grid(x, nrow=4, normalize=True, value_range=(-1, 1), pad_value=0.5)
    as_saved = grid.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)[0].numpy()  # save_image's rounding
    assert np.array_equal(small, as_saved)
    assert np.array_equal(small, tile(to_pixels(x), 4))


def test_scale_and_labels():
    assert scale_for(28, 28) == 3 and scale_for(32, 32) == 3 and scale_for(84, 84) == 1 and scale_for(64, 64) == 2
    x = _digits(4)
    plain = grid_image(x, 4)
    labelled = grid_image(x, 4, col_labels=["0", "32", "64", "96"], cell_labels=["a\nf(x) = 1"] * 4)
    assert plain.size[0] == labelled.size[0] >= 4 * MIN_PIXELS
    assert labelled.size[1] > plain.size[1]  # the labels take their own rows, never the digits' pixels
    assert_honest_grid(plain, ncols=4, nrows=1)


def test_save_image_formats_and_tensor(tmp_path):
    picture = grid_image(_digits(2), 2, title="t")
    for name in ("g.png", "g.jpg", "g.jpeg"):
        path = save_image(picture, tmp_path / name)
        assert Image.open(path).size == picture.size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.jpeg", "g.jpg", "g.png"]  # no temporary files left
    with pytest.raises(ValueError, match=".png"):
        save_image(picture, tmp_path / "g.txt")
    t = image_tensor(picture)
    assert t.shape == (1, picture.size[1], picture.size[0]) and 0.0 <= float(t.min()) <= float(t.max()) <= 1.0
    with pytest.raises(ValueError, match="single-channel"):
        to_pixels(torch.zeros(2, 3, 28, 28))
