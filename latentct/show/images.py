"""The one image-grid helper and PNG writer (torchvision is not available here)."""
from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch

from latentct.util.io import atomic_path


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(B, C, H, W) in [-1, 1] -> (C, H', W') tiled row by row, like torchvision's make_grid."""
    images = images.detach().float().cpu()
    b, c, h, w = images.shape
    ncol = min(nrow, b)
    nrows = -(-b // ncol)
    grid = torch.full((c, nrows * (h + padding) + padding, ncol * (w + padding) + padding), pad_value)
    for i in range(b):
        r, k = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    return grid


def display(images: torch.Tensor, window, display_window) -> torch.Tensor:
    """Images in [-1, 1] of the model's HU ``window``, redrawn in [-1, 1] of ``display_window``: pictures are
    drawn for anatomy (lungs, fat, the body outline), independent of the window the model was trained in. A
    generator without a known window is shown as it is. A volume's three mid-planes (the channels) are laid
    side by side: axial, coronal, sagittal."""
    from latentct.data.slices import hu_to_unit, parse_window, unit_to_hu

    if window is not None and parse_window(window) != parse_window(display_window):
        images = hu_to_unit(unit_to_hu(images, window), display_window)
    return tile_planes(images)


def tile_planes(images: torch.Tensor) -> torch.Tensor:
    """(..., P, H, W) -> (..., 1, H, P * W): the planes of a volume side by side (P = 1: unchanged)."""
    if images.shape[-3] == 1:
        return images
    planes = images.unbind(-3)
    return torch.cat(planes, dim=-1).unsqueeze(-3)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(C, H, W) or (H, W) in [-1, 1] -> uint8 (H, W) or (H, W, C)."""
    arr = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    if arr.ndim == 3:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return arr


def save_png(image: torch.Tensor | np.ndarray, path: str | Path) -> None:
    arr = image if isinstance(image, np.ndarray) else to_uint8(image)
    with atomic_path(path) as tmp:
        iio.imwrite(tmp, arr, extension=".png")


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8) -> None:
    save_png(make_grid(images, nrow=nrow), path)
