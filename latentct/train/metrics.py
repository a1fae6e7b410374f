"""Generator quality without downloads: sliced Wasserstein distance on multi-scale patches, anatomy
distribution distances and sample diversity. FID needs Inception weights, which are not available offline."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from latentct.data.slices import unit_to_hu
from latentct.score import anatomy


def laplacian_pyramid(x: torch.Tensor, levels: int) -> list[torch.Tensor]:
    pyramid = []
    for _ in range(levels - 1):
        down = F.avg_pool2d(x, 2)
        pyramid.append(x - F.interpolate(down, scale_factor=2, mode="bilinear", align_corners=False))
        x = down
    return pyramid + [x]


def _patches(x: torch.Tensor, size: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` random size x size patches per image, flattened: (B * count, size * size)."""
    b, _, h, w = x.shape
    rows = torch.randint(0, h - size + 1, (b, count), generator=gen)
    cols = torch.randint(0, w - size + 1, (b, count), generator=gen)
    offs = torch.arange(size)
    r = (rows[..., None, None] + offs[:, None]).expand(b, count, size, size)
    c = (cols[..., None, None] + offs[None, :]).expand(b, count, size, size)
    flat = x[:, 0].reshape(b, -1)
    return torch.gather(flat, 1, (r * w + c).reshape(b, -1)).reshape(b * count, size * size)


def _normalise(desc: torch.Tensor) -> torch.Tensor:
    return (desc - desc.mean(0)) / desc.std(0).clamp_min(1e-6)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, levels: int = 3, patch: int = 7,
                       patches_per_image: int = 64, projections: int = 128, seed: int = 0) -> dict:
    """SWD between two image sets (same count) per Laplacian level, as in progressive GAN work (x1e3)."""
    gen = torch.Generator().manual_seed(seed)
    a, b = a.float().cpu(), b.float().cpu()
    result = []
    for la, lb in zip(laplacian_pyramid(a, levels), laplacian_pyramid(b, levels)):
        size = min(patch, la.shape[-1])
        da = _normalise(_patches(la, size, patches_per_image, gen))
        db = _normalise(_patches(lb, size, patches_per_image, gen))
        dirs = F.normalize(torch.randn(da.shape[1], projections, generator=gen), dim=0)
        pa, _ = torch.sort(da @ dirs, dim=0)
        pb, _ = torch.sort(db @ dirs, dim=0)
        result.append(float((pa - pb).abs().mean()) * 1e3)
    return {"swd": sum(result) / len(result), "swd_levels": result}


def diversity(x: torch.Tensor) -> float:
    """Mean pairwise L1 distance per pixel between the images of a set."""
    flat = x.float().flatten(1)
    d = torch.cdist(flat, flat, p=1) / flat.shape[1]
    n = flat.shape[0]
    return float(d.sum() / (n * (n - 1)))


def _w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """1-D Wasserstein distance between two samples (sorted differences for equal sizes, else 101 quantiles)."""
    if len(a) == len(b):
        return float((torch.sort(a)[0] - torch.sort(b)[0]).abs().mean())
    q = torch.linspace(0, 1, 101, dtype=torch.float64)
    return float((torch.quantile(a.double(), q) - torch.quantile(b.double(), q)).abs().mean())


def anatomy_distance(fake_hu: torch.Tensor, real_hu: torch.Tensor) -> dict:
    """Per measurement, W1 between generated and real distributions in units of the real spread. Slices where a
    measurement is undefined (anterior tissue where no lung shows, below the diaphragm) are left out of it; a
    measurement undefined on every slice of either set is left out of the mean."""
    fm, rm = anatomy.measure(fake_hu), anatomy.measure(real_hu)
    per = {}
    for k in rm:
        f, r = fm[k][~torch.isnan(fm[k])], rm[k][~torch.isnan(rm[k])]
        per[k] = _w1(f, r) / max(float(r.std()), 1e-6) if len(f) and len(r) > 1 else float("nan")
    shown = [v for v in per.values() if v == v]
    return {"anatomy_distance": sum(shown) / len(shown) if shown else float("nan"), "anatomy": per}


def compare_sets(fake: torch.Tensor, real: torch.Tensor, window) -> dict:
    """Every quality figure of ``fake`` against ``real`` (both (N, 1, S, S) in [-1, 1], same N)."""
    out = sliced_wasserstein(fake, real)
    out.update(anatomy_distance(unit_to_hu(fake, window), unit_to_hu(real, window)))
    out["diversity"] = diversity(fake)
    out["diversity_ratio"] = out["diversity"] / max(diversity(real), 1e-9)
    return out
