"""What each direction does: sweeps along directions, linear fits of measurements against the shift, labels and
disentanglement over the anatomy measurements (the phantom's ground truth is scored in latentct/score/scoring.py)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from latentct.data.slices import unit_to_hu
from latentct.score import anatomy


@torch.no_grad()
def sweep(G, directions, ks: list[int], eps: torch.Tensor, z: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Images (len(ks), len(eps), len(z), 1, H, W) of G(z + eps * direction k), in batched generator calls."""
    K, E, Z = len(ks), len(eps), len(z)
    k_flat = torch.tensor(ks).repeat_interleave(E * Z)
    e_flat = eps.repeat_interleave(Z).repeat(K)
    z_flat = z.repeat(K * E, 1)
    latents = z_flat + directions.shifts(k_flat, e_flat).to(z.dtype)
    device = next(G.parameters(), torch.zeros(0)).device
    out = torch.cat([G(part.to(device)).float().cpu() for part in latents.split(chunk)])
    return out.reshape(K, E, Z, *out.shape[1:])


def fit_lines(values: torch.Tensor, eps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """values (K, E, Z): per direction, the least-squares slope against eps and the R2, fitted per z sample
    (NaN-aware) and averaged over z."""
    K, E, Z = values.shape
    x = eps.double().view(1, E, 1).expand(K, E, Z)
    y = values.double()
    ok = torch.isfinite(y)
    n = ok.sum(1).clamp_min(1)
    xm = torch.where(ok, x, 0).sum(1) / n
    ym = torch.where(ok, y, 0).sum(1) / n
    dx = torch.where(ok, x - xm[:, None], 0)
    dy = torch.where(ok, y - ym[:, None], 0)
    sxx, sxy, syy = (dx * dx).sum(1), (dx * dy).sum(1), (dy * dy).sum(1)
    slope = sxy / sxx.clamp_min(1e-12)
    r2 = torch.where(syy > 1e-12, (sxy * sxy) / (sxx.clamp_min(1e-12) * syy.clamp_min(1e-12)), torch.zeros_like(syy))
    valid = ok.sum(1) >= 3
    slope, r2 = torch.where(valid, slope, torch.nan), torch.where(valid, r2, torch.nan)
    with warnings.catch_warnings():  # a measurement undefined for every sample (no lungs at all) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(slope.numpy(), axis=1), np.nanmean(r2.numpy(), axis=1)


def disentanglement(importance: np.ndarray) -> float:
    """1 - normalised entropy of the importance over measurements (DCI's disentanglement for one code)."""
    p = np.nan_to_num(np.abs(importance))
    if p.sum() <= 0:
        return 0.0
    p = p / p.sum()
    h = -(p[p > 0] * np.log(p[p > 0])).sum()
    return float(1 - h / math.log(len(p)))


def describe(images: torch.Tensor, eps: torch.Tensor, window, spacing: float, ks: list[int],
             spreads: dict[str, float] | None = None, pixel_units: bool = False) -> list[dict]:
    """Per direction: slope per unit shift and R2 of every measurement, the dominant one, each measurement's share
    of the direction's change and a label. A change is normalised by the measurement's spread across real slices
    (``spreads``, from anatomy.measure on them) or, without real slices, across the sweep's unshifted samples.
    The label names one measurement only where it holds more than 2/3 of the change with R2 >= 0.5; otherwise it
    names the mixture (on real CT there is no oracle: a mixture must read as one). ``pixel_units``: the pixel
    spacing is unknown, so lengths are in pixels and areas in pixels / 100, and the labels say so."""
    K, E, Z = images.shape[:3]
    hu = unit_to_hu(images.reshape(K * E * Z, *images.shape[3:]), window)
    values = {name: v.reshape(K, E, Z) for name, v in anatomy.measure(hu, spacing).items()}
    centre = int(torch.argmin(eps.abs()))
    span = float(eps.max() - eps.min())
    out = [{"direction": k, "slope": {}, "r2": {}, "effect": {}} for k in ks]
    for name, v in values.items():
        slope, r2 = fit_lines(v, eps)
        if spreads is not None and math.isfinite(spreads.get(name, math.nan)):
            spread = spreads[name]
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                spread = float(np.nanstd(v[:, centre].numpy()))  # natural variation across samples
        spread = max(_num(spread), anatomy.min_spread(name, spacing))
        for i in range(K):
            out[i]["slope"][name] = _num(slope[i])
            out[i]["r2"][name] = _num(r2[i])
            out[i]["effect"][name] = _num(abs(slope[i]) * span / spread)
    change = (images[:, [0, -1]] - images[:, centre:centre + 1]).abs().mean(dim=(1, 2, 3, 4, 5))
    for i, row in enumerate(out):
        score = {m: row["effect"][m] * row["r2"][m] * anatomy.PRIORITY[m] for m in values}
        dominant = max(score, key=lambda m: score[m])
        row["dominant"] = dominant
        row["score"] = score[dominant]
        row["shares"] = measurement_shares(row["effect"])
        row["label"] = label(row, pixel_units=pixel_units)
        row["disentanglement"] = disentanglement(np.array(list(score.values())))
        row["image_change"] = float(change[i])
    return out


def measurement_shares(effect: dict[str, float]) -> dict[str, float]:
    total = sum(effect.values())
    return {m: (e / total if total > 0 else 0.0) for m, e in effect.items()}


PIXEL_UNITS = {"mm": "px", "cm2": "px2/100"}  # the units of anatomy.MEASURES when the pixel spacing is unknown


def label(row: dict, single: float = 2 / 3, r2_min: float = 0.5, pixel_units: bool = False) -> str:
    """One measurement's name where it holds more than ``single`` of the change on a line; else the mixture."""
    top = max(row["shares"], key=lambda m: row["shares"][m])
    if row["shares"][top] > single and row["r2"][top] >= r2_min:
        name, unit = anatomy.MEASURES[top]
        unit = PIXEL_UNITS.get(unit, unit) if pixel_units else unit
        return f"{name} {row['slope'][top]:+.3g} {unit} per unit (R2 {row['r2'][top]:.2f})"
    parts = sorted(((s, m) for m, s in row["shares"].items() if s >= 0.1), reverse=True)[:3]
    if not parts:
        return "no measurement changes"
    return "mixture: " + ", ".join(f"{anatomy.MEASURES[m][0]} {s:.2f}" for s, m in parts)


def real_spreads(real: torch.Tensor, window, spacing: float) -> dict[str, float]:
    """Each measurement's spread across real slices (N, 1, S, S) in [-1, 1] of ``window``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {m: float(np.nanstd(v.numpy())) for m, v in anatomy.measure(unit_to_hu(real, window), spacing).items()}


STRONG = "a measurement with R2 >= 0.8 and effect x R2 x priority > 0.5"


def is_strong(row: dict) -> bool:
    """Whether a direction's dominant measurement moves clearly and along a line (``STRONG`` in words)."""
    return row["r2"][row["dominant"]] >= 0.8 and row["score"] > 0.5


def _num(value) -> float:
    value = float(value)
    return value if math.isfinite(value) else 0.0


def fold_axes(rows: list[dict], threshold: float = 0.9) -> list[dict]:
    """Directions ranked by effect, near-duplicates folded: two directions whose signed effect vectors over the
    anatomy measurements have |cosine| >= ``threshold`` (v and -v included) are one axis, shown once with its
    members. Each direction joins the strongest axis it matches; the strongest direction of an axis leads it."""
    names = list(rows[0]["effect"]) if rows else []
    vectors = {r["direction"]: np.array([np.sign(r["slope"][m]) * r["effect"][m] * r["r2"][m] for m in names])
               for r in rows}
    axes: list[dict] = []
    for row in sorted(rows, key=lambda r: -r["score"]):
        v = vectors[row["direction"]]
        for axis in axes:
            lead = vectors[axis["leader"]]
            denom = np.linalg.norm(v) * np.linalg.norm(lead)
            if denom > 0 and abs(float(v @ lead) / denom) >= threshold:
                axis["members"].append(row["direction"])
                break
        else:
            axes.append({"leader": row["direction"], "members": [row["direction"]], "label": row["label"],
                         "score": row["score"]})
    return axes


def realism(images: torch.Tensor, eps: torch.Tensor, real: torch.Tensor, tolerance: float = 0.1) -> list[dict]:
    """Per direction, how realistic its frames stay along the sweep: the sliced Wasserstein distance of the
    frames at each shift (all samples) to real slices, and the shift range whose frames stay within
    (1 + tolerance) x max(real-vs-real distance, distance of the unshifted frames)."""
    from latentct.train.metrics import sliced_wasserstein

    K, E, Z = images.shape[:3]
    real = real[: 2 * Z] if len(real) >= 2 * Z else real
    half = len(real) // 2
    floor = sliced_wasserstein(real[:half], real[half:2 * half])["swd"] if half >= 2 else float("nan")
    reference = real[:Z]
    centre = int(torch.argmin(eps.abs()))
    out = []
    for k in range(K):
        swd = [sliced_wasserstein(images[k, e], reference[: len(images[k, e])])["swd"] for e in range(E)]
        limit = (1 + tolerance) * max(floor if math.isfinite(floor) else 0.0, swd[centre])
        inside = [float(abs(eps[e])) for e in range(E) if swd[e] <= limit]
        ok_range = 0.0
        for e in sorted(range(E), key=lambda e: abs(float(eps[e]))):  # the contiguous range around 0
            if swd[e] > limit:
                break
            ok_range = abs(float(eps[e]))
        out.append({"swd": [round(s, 3) for s in swd], "floor": floor, "limit": limit,
                    "realistic_up_to": ok_range, "realistic_shifts": inside})
    return out
