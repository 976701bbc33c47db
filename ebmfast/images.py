"""Sample grids that people look at: images tiled, blown up by nearest-neighbour so that a 28-pixel digit is at least
84 pixels on screen, with a title, a caption and labels where there is room.

Nearest-neighbour upscaling by a whole factor keeps the pixels honest: every model pixel becomes a ``scale x scale``
block of the same value, nothing is smoothed or invented. The tiling is torchvision's ``make_grid`` convention
(values mapped from ``value_range`` to 0-255 as ``save_image`` rounds them, 2-pixel grey gaps), so a grid here is
exactly the earlier 28-pixel grid, enlarged, plus text on a white margin. Text uses Pillow's built-in font (no font
files needed). Pillow is part of the ``train`` extra; it is imported only when a picture is made.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .errors import require

__all__ = ["MIN_PIXELS", "scale_for", "to_pixels", "tile", "grid_image", "save_image", "image_tensor"]

MIN_PIXELS = 84  # a 28-pixel digit is shown at 3x
PAD = 2  # gap between tiles, in image pixels (before upscaling), as torchvision's make_grid
GAP_VALUE = 128  # make_grid's pad_value=0.5
MARGIN = 10
TITLE_SIZE, TEXT_SIZE = 16, 13
_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def scale_for(height: int, width: int, min_pixels: int = MIN_PIXELS) -> int:
    """The smallest whole factor that shows an image of ``height x width`` at least ``min_pixels`` on its short side."""
    return max(1, math.ceil(min_pixels / max(1, min(height, width))))


def to_pixels(images: torch.Tensor, value_range=(-1.0, 1.0)) -> np.ndarray:
    """(N, 1, H, W) or (N, H, W) values in ``value_range`` -> uint8 (N, H, W), rounded as torchvision's save_image.
    A uint8 tensor is taken as pixels already."""
    x = images.detach().cpu()
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"expected single-channel images (N, 1, H, W), got shape {tuple(x.shape)}")
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"expected images of shape (N, 1, H, W) or (N, H, W), got {tuple(images.shape)}")
    if x.dtype == torch.uint8:
        return x.numpy().copy()
    x = x.float()
    lo, hi = value_range
    x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return x.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()


def tile(pixels: np.ndarray, ncols: int) -> np.ndarray:
    """uint8 (N, H, W) -> one uint8 picture: ``ncols`` per row, ``PAD``-pixel grey gaps around every image."""
    n, h, w = pixels.shape
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    out = np.full((nrows * (h + PAD) + PAD, ncols * (w + PAD) + PAD), GAP_VALUE, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = PAD + r * (h + PAD), PAD + c * (w + PAD)
        out[y : y + h, x : x + w] = pixels[i]
    return out


def _font(size: int):
    font_mod = require("PIL.ImageFont", "sample pictures", package="pillow")
    try:
        return font_mod.load_default(size=size)  # Pillow >= 10.1: a scalable font
    except TypeError:
        return font_mod.load_default()


def _text_size(draw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a longer word stays whole)."""
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_size(draw, candidate, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def grid_image(
    images: torch.Tensor,
    ncols: int,
    *,
    title: str | None = None,
    caption: str | None = None,
    col_labels: list[str] | None = None,
    cell_labels: list[str] | None = None,
    value_range=(-1.0, 1.0),
    min_pixels: int = MIN_PIXELS,
):
    """A PIL image (mode "L"): the images tiled ``ncols`` per row and upscaled by ``scale_for`` (nearest-neighbour),
    under a ``title`` and a ``caption`` (wrapped to the picture's width), with ``col_labels`` above the columns and
    ``cell_labels`` (one per image, ``\\n`` for a second line) above each image."""
    image_mod = require("PIL.Image", "sample pictures", package="pillow")
    draw_mod = require("PIL.ImageDraw", "sample pictures", package="pillow")
    pixels = to_pixels(images, value_range)
    n, h, w = pixels.shape
    if n == 0:
        raise ValueError("a grid needs at least one image")
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    s = scale_for(h, w, min_pixels)
    block = np.repeat(np.repeat(tile(pixels, ncols), s, axis=0), s, axis=1)  # the honest enlargement
    title_font, text_font = _font(TITLE_SIZE), _font(TEXT_SIZE)
    measure = draw_mod.Draw(image_mod.new("L", (1, 1)))
    line_h = _text_size(measure, "Ag", text_font)[1] + 4
    label_lines = max((len(lbl.split("\n")) for lbl in cell_labels), default=0) if cell_labels else 0
    label_h = label_lines * line_h + (2 if label_lines else 0)

    # rows of the tiled block, with a white strip for the cell labels above each row of images
    band = (h + PAD) * s
    bands = []
    for r in range(nrows):
        if label_h:
            bands.append(np.full((label_h, block.shape[1]), 255, dtype=np.uint8))
        bands.append(block[r * band : (r + 1) * band + (PAD * s if r == nrows - 1 else 0)])
    body = np.concatenate(bands)

    text_w = max(block.shape[1], 360)
    title_lines = _wrap(measure, title, title_font, text_w) if title else []
    caption_lines = _wrap(measure, caption, text_font, text_w) if caption else []
    title_h = _text_size(measure, "Ag", title_font)[1] + 6
    head_h = len(title_lines) * title_h + len(caption_lines) * line_h + (line_h if col_labels else 0)
    width = max(block.shape[1], max((_text_size(measure, t, title_font)[0] for t in title_lines), default=0))
    page = image_mod.new("L", (width + 2 * MARGIN, head_h + body.shape[0] + 2 * MARGIN + (4 if head_h else 0)), 255)
    draw = draw_mod.Draw(page)
    y = MARGIN
    for line in title_lines:
        draw.text((MARGIN, y), line, fill=0, font=title_font)
        y += title_h
    for line in caption_lines:
        draw.text((MARGIN, y), line, fill=60, font=text_font)
        y += line_h
    if col_labels:
        for c, label in enumerate(col_labels[:ncols]):
            cx = MARGIN + (PAD + c * (w + PAD)) * s + w * s // 2
            draw.text((cx - _text_size(draw, label, text_font)[0] // 2, y), label, fill=0, font=text_font)
        y += line_h
    if head_h:
        y += 4
    top = y
    page.paste(image_mod.fromarray(body), (MARGIN, top))
    for i, label in enumerate(cell_labels or []):
        r, c = divmod(i, ncols)
        cx = MARGIN + (PAD + c * (w + PAD)) * s + w * s // 2
        ly = top + r * (label_h + band) + 1
        for k, part in enumerate(label.split("\n")):
            draw.text((cx - _text_size(draw, part, text_font)[0] // 2, ly + k * line_h), part, fill=0, font=text_font)
    return page


def save_image(picture, path: str | os.PathLike) -> Path:
    """Write a PIL picture to ``path`` (.png, .jpg or .jpeg) atomically: a temporary file in the same folder,
    renamed over the target, so a reader never sees half a picture."""
    path = Path(path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"picture files must end in {'/'.join(_FORMATS)}, got {str(path)!r}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        picture.save(tmp, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def image_tensor(picture) -> torch.Tensor:
    """A PIL picture as a (1, H, W) float tensor in [0, 1] (for TensorBoard)."""
    return torch.from_numpy(np.asarray(picture, dtype=np.uint8).copy()).float().div_(255).unsqueeze(0)
