"""Anatomy measurements on batches of CT slices in HU: thresholds and moments, no labels, no training.

Every function takes (B, 1, H, W) HU tensors; ``spacing`` is mm per pixel (1.0 gives pixel units).
Image convention as DICOM: x to the right of the image (patient's left), y down (posterior).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BODY_HU = -500.0   # tissue vs air
LUNG_HU = -400.0   # aerated lung vs soft tissue
BONE_HU = 300.0

# name -> (label used in reports, unit)
MEASURES = {
    "body_area": ("body area", "cm2"),
    "lung_area": ("lung area", "cm2"),
    "centroid_x": ("left-right position", "mm"),
    "centroid_y": ("vertical position", "mm"),
    "orientation": ("rotation", "deg"),
    "thickness": ("AP thickness", "mm"),
    "width": ("LR width", "mm"),
    "anterior_tissue": ("anterior soft tissue (breast)", "cm2"),
    "bone_area": ("bone area", "cm2"),
    "mean_hu": ("mean HU in body", "HU"),
}



def min_spread(name: str, spacing: float) -> float:
    """The smallest natural spread a measurement is normalised by: one pixel, one degree, twenty pixels of
    area, 5 HU. Without it a measurement that hardly varies between samples (every body is centred, so
    its left-right position) would turn sub-pixel changes into large effects."""
    unit = MEASURES[name][1]
    return {"mm": spacing, "deg": 1.0, "cm2": 20 * spacing * spacing / 100.0, "HU": 5.0}[unit]


# Weight when choosing a direction's dominant measurement. Mean HU moves with any change in composition (more
# lung, more fat, more bone), body area with any change in size (width, thickness, breasts) and the tissue in
# front of the lungs with the lungs' own size as well as with breasts: they name a direction only when nothing
# more specific explains it better. Set on the phantom's known-answer sweeps (latentct/score/validate.py): with equal
# weights body area out-scored AP thickness on thickness sweeps.
PRIORITY = {name: {"mean_hu": 0.6, "body_area": 0.7, "anterior_tissue": 0.9}.get(name, 1.0) for name in MEASURES}


def _dilate(mask: torch.Tensor, k: int) -> torch.Tensor:
    return F.max_pool2d(mask.float(), k, 1, k // 2) > 0.5


def _erode(mask: torch.Tensor, k: int) -> torch.Tensor:
    return ~_dilate(~mask, k)


def _spread_along_rows(outside: torch.Tensor, air: torch.Tensor) -> torch.Tensor:
    """Every air pixel whose horizontal run of air holds an outside pixel becomes outside (one pass)."""
    lines = air.reshape(-1, air.shape[-1])
    run = torch.cumsum((~lines).long(), dim=1)  # runs of air between tissue pixels share an id
    seeds = torch.zeros(lines.shape[0], lines.shape[1] + 1, dtype=torch.float32, device=air.device)
    seeds.scatter_reduce_(1, run, (outside.reshape(lines.shape) & lines).float(), reduce="amax")
    return (seeds.gather(1, run) > 0).reshape(air.shape) & air


def outside_air(hu: torch.Tensor, threshold: float = BODY_HU) -> torch.Tensor:
    """Air connected to the image border: whole runs of air spread along rows and columns in turn (a few
    passes, not one pixel per step), then a 3x3 step for diagonal links, until nothing changes."""
    air = hu < threshold
    border = torch.zeros_like(air)
    border[..., 0, :] = border[..., -1, :] = border[..., :, 0] = border[..., :, -1] = True
    outside = air & border
    for _ in range(hu.shape[-1] + hu.shape[-2]):
        grown = _spread_along_rows(outside, air)
        grown = _spread_along_rows(grown.transpose(-1, -2), air.transpose(-1, -2)).transpose(-1, -2)
        grown = _dilate(grown, 3) & air
        if torch.equal(grown, outside):
            break
        outside = grown
    return outside


def body_mask(hu: torch.Tensor) -> torch.Tensor:
    """Everything enclosed by the skin; thin structures outside it (table shells) removed by an opening."""
    solid = ~outside_air(hu)
    k = 3 + 2 * (hu.shape[-1] // 256)
    return _dilate(_erode(solid, k), k) & solid


def lung_mask(hu: torch.Tensor, body: torch.Tensor | None = None) -> torch.Tensor:
    """Aerated tissue inside the body, opened by a 3 x 3 square: the pixels at the skin, half air and half
    tissue after resizing, fall below the lung threshold too and would otherwise count as lung (in front of
    the breasts they moved the lungs' front edge to the skin)."""
    body = body_mask(hu) if body is None else body
    raw = (hu < LUNG_HU) & body
    return _dilate(_erode(raw, 3), 3) & raw


def _coords(hu: torch.Tensor, spacing: float):
    h, w = hu.shape[-2:]
    ys = (torch.arange(h, dtype=torch.float32, device=hu.device) + 0.5 - h / 2) * spacing
    xs = (torch.arange(w, dtype=torch.float32, device=hu.device) + 0.5 - w / 2) * spacing
    return xs.view(1, 1, 1, w), ys.view(1, 1, h, 1)


def _masked_range(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(values.dtype).max
    hi = torch.where(mask, values, torch.full_like(values, -big)).flatten(1).amax(1)
    lo = torch.where(mask, values, torch.full_like(values, big)).flatten(1).amin(1)
    return hi - lo


def measure(hu: torch.Tensor, spacing: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-image measurements (B,), see MEASURES. Images without a body give NaN for shape measures."""
    hu = hu.float()
    body = body_mask(hu)
    lungs = lung_mask(hu, body)
    px_area = spacing * spacing / 100.0  # cm2 per pixel
    x, y = _coords(hu, spacing)
    n = body.flatten(1).sum(1).float()
    safe = n.clamp_min(1)
    bodyf = body.float()
    cx = (bodyf * x).flatten(1).sum(1) / safe
    cy = (bodyf * y).flatten(1).sum(1) / safe
    dx, dy = x - cx.view(-1, 1, 1, 1), y - cy.view(-1, 1, 1, 1)
    mu20 = (bodyf * dx * dx).flatten(1).sum(1)
    mu02 = (bodyf * dy * dy).flatten(1).sum(1)
    mu11 = (bodyf * dx * dy).flatten(1).sum(1)
    theta = 0.5 * torch.atan2(2 * mu11, mu20 - mu02)  # the body's long axis, y down
    # The left-right axis is the principal axis nearer the horizontal: a patient rolls by tens of degrees, not
    # 45, but a round body (thick, or with large breasts) can have its long axis anterior-posterior.
    theta = torch.where(theta > math.pi / 4, theta - math.pi / 2, torch.where(theta < -math.pi / 4, theta + math.pi / 2, theta))
    ct, st = torch.cos(theta).view(-1, 1, 1, 1), torch.sin(theta).view(-1, 1, 1, 1)
    along = dx * ct + dy * st         # along the left-right axis
    across = -dx * st + dy * ct       # along the anterior-posterior axis, positive = posterior
    has_lung = lungs.flatten(1).sum(1) > 4
    lung_front = torch.where(lungs, across, torch.full_like(across, float("inf"))).flatten(1).amin(1)
    in_front = body & (across < lung_front.view(-1, 1, 1, 1))
    nan = torch.full_like(n, float("nan"))
    empty = n < 1
    out = {
        "body_area": n * px_area,
        "lung_area": lungs.flatten(1).sum(1).float() * px_area,
        "centroid_x": torch.where(empty, nan, cx),
        "centroid_y": torch.where(empty, nan, cy),
        "orientation": torch.where(empty, nan, theta * 180.0 / math.pi),
        "thickness": torch.where(empty, nan, _masked_range(across, body) + spacing),
        "width": torch.where(empty, nan, _masked_range(along, body) + spacing),
        "anterior_tissue": torch.where(has_lung, in_front.flatten(1).sum(1).float() * px_area, nan),
        "bone_area": ((hu > BONE_HU) & body).flatten(1).sum(1).float() * px_area,
        "mean_hu": torch.where(empty, nan, (hu * bodyf).flatten(1).sum(1) / safe),
    }
    return out
