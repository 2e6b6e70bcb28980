"""A deterministic judge of rendered shapes images: which colour, shape and place an image shows.

For generated images (examples/train_dalle.py): the foreground is every pixel whose brightest channel
passes a threshold (the background is dark noise); its colour is the named colour nearest in chromaticity
(the mean RGB over the foreground divided by its largest channel, as shapes_data dims each colour by up to
15 %); its place the named place nearest to the centre of its bounding box; its shape the one whose
rendering (shapes_data's own masks, at that centre, sized by the box, give or take 10 % and half a pixel)
overlaps it best (intersection over union). An image with too little foreground shows nothing: every attribute is then wrong.
"""
from __future__ import annotations

import torch
from torch import Tensor

from shapes_data import COLOURS, PLACES, SHAPES, shape_masks

FOREGROUND = 0.45  # brightest channel in [0, 1]: the background is 0.1 +- 0.05, every colour's >= 0.76
MIN_PIXELS = 4
NOTHING = -1


def _chromaticity(rgb: Tensor) -> Tensor:
    return rgb / rgb.amax(dim=-1, keepdim=True).clamp_min(1e-6)


def judge(images: Tensor) -> dict:
    """images (N, 3, S, S) in [0, 1] -> {"colour", "shape", "place"}: (N,) indices into COLOURS, SHAPES and
    PLACES (in their order), NOTHING where the image shows no shape."""
    n, _, size, _ = images.shape
    colours = _chromaticity(torch.tensor(list(COLOURS.values())))
    places = torch.tensor(list(PLACES.values())) * size
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    out = {name: torch.full((n,), NOTHING, dtype=torch.long) for name in ("colour", "shape", "place")}
    for i in range(n):
        fg = images[i].amax(dim=0) > FOREGROUND
        if int(fg.sum()) < MIN_PIXELS:
            continue
        rgb = images[i][:, fg].mean(dim=1)
        out["colour"][i] = (colours - _chromaticity(rgb)).norm(dim=1).argmin()
        ys, xs = torch.nonzero(fg, as_tuple=True)
        x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
        centre = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2]).float()
        out["place"][i] = (places - centre).norm(dim=1).argmin()
        out["shape"][i] = _best_shape(fg, centre, max(float(x1 - x0), float(y1 - y0)) / 2, grid)
    return out


def _best_shape(fg: Tensor, centre: Tensor, half: float, grid: Tensor) -> int:
    """The shape whose rendering overlaps fg best, over a few sizes and half-pixel shifts of the box's
    centre (a rendered shape's box is whole pixels: a square can come out 6 x 7)."""
    shifts = torch.tensor([-0.5, 0.0, 0.5])
    cx = (centre[0] + shifts).repeat_interleave(3 * 3)  # (27,): 3 x-shifts x 3 y-shifts x 3 sizes
    cy = (centre[1] + shifts).repeat_interleave(3).repeat(3)
    scale = torch.tensor([0.9, 1.0, 1.1]).repeat(9)
    best, best_shape = -1.0, 0
    for s, name in enumerate(SHAPES):
        radius = scale * (half / 0.8 if name == "square" else half)  # the square's half side is 0.8 r
        drawn = shape_masks(torch.full((27,), s), grid[None, None, :] - cx[:, None, None],
                            grid[None, :, None] - cy[:, None, None], radius[:, None, None])
        iou = (drawn & fg).sum(dim=(1, 2)).float() / (drawn | fg).sum(dim=(1, 2)).clamp_min(1).float()
        if float(iou.max()) > best:
            best, best_shape = float(iou.max()), s
    return best_shape
