"""Anatomy measurements on batches of CT slices in HU: body and lungs by thresholds, no labels needed.

All functions take (B, 1, H, W) HU tensors and return per-image values; areas are fractions of the image.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BODY_HU = -500.0   # tissue vs air
LUNG_HU = -400.0   # aerated lung vs soft tissue


def _dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(mask.float(), k, 1, k // 2) > 0.5


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    return ~_dilate(~mask, k)


def outside_air(hu: torch.Tensor, threshold: float = BODY_HU) -> torch.Tensor:
    """Air connected to the image border (flood fill through air pixels, batched)."""
    air = hu < threshold
    border = torch.zeros_like(air)
    border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
    outside = air & border
    for i in range(hu.shape[-1] + hu.shape[-2]):
        grown = _dilate(outside, 3) & air
        if i % 8 == 7 and torch.equal(grown, outside):
            break
        outside = grown
    return outside


def body_mask(hu: torch.Tensor) -> torch.Tensor:
    """Everything enclosed by the skin; thin structures outside it (table shells) removed by an opening."""
    solid = ~outside_air(hu)
    k = 3 + 2 * (hu.shape[-1] // 256)
    return _dilate(_erode(solid, k), k) & solid


def lung_mask(hu: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    """Aerated tissue inside the body."""
    body = body_mask(hu) if body is None else body
    return (hu < LUNG_HU) & body


def measure(hu: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image measurements (B,) used for generator quality and, extended, for direction reports."""
    body = body_mask(hu)
    lungs = lung_mask(hu, body)
    area = hu.shape[-1] * hu.shape[-2]
    return {"body_area": body.flatten(1).sum(1).float() / area,
            "lung_area": lungs.flatten(1).sum(1).float() / area}
