"""Scoring directions against known factors, one code path for a generator's directions and for the phantom's
known-answer sweeps (latentct/score/validate.py), so the scorer is validated by the figures it prints.

Input: factor readings ``values`` (K, E, Z, F) of K directions (or sweeps) at E shifts for Z samples, in units
of each factor's spread. Per direction and factor a line is fitted against the shift: its R2 says the response
is smooth, its *effect* (|slope| x shift span) says how much the factor moves. R2 alone does not separate
methods (random directions reach about 0.8): what does is *leakage*, the share of a direction's effect that
lands on factors other than its own.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from latentct.data.phantom import FACTORS


def line_effects(values: torch.Tensor, eps: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(K, F) R2 and effect (|slope| x span of eps) of each factor against each direction's shift, fitted per
    sample and averaged over samples."""
    from latentct.score.report import fit_lines

    span = float(eps.max() - eps.min())
    K, F = values.shape[0], values.shape[-1]
    r2, effect = np.zeros((K, F)), np.zeros((K, F))
    for f in range(F):
        slope, fit = fit_lines(values[..., f], eps)
        r2[:, f] = np.nan_to_num(fit)
        effect[:, f] = np.nan_to_num(np.abs(slope) * span)
    return r2, effect


def attribution(effect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the factor with the largest effect, and the share of the row's effect on the other factors."""
    own = effect.argmax(1)
    total = effect.sum(1)
    leakage = np.where(total > 0, 1 - effect[np.arange(len(effect)), own] / np.maximum(total, 1e-12), 1.0)
    return own, leakage


def _per_factor(limit, factor: str) -> float:
    """A threshold given for all factors (a number) or per factor (a dict)."""
    return float(limit[factor]) if isinstance(limit, dict) else float(limit)


def describe_limits(r2_min, leakage_max) -> str:
    """The thresholds in words: one pair for all factors, or per factor."""
    if not isinstance(r2_min, dict) and not isinstance(leakage_max, dict):
        return f"R2 >= {r2_min:.2f} and leakage <= {leakage_max:.2f}"
    return "; ".join(f"{f}: R2 >= {_per_factor(r2_min, f):.2f}, leakage <= {_per_factor(leakage_max, f):.2f}"
                     for f in FACTORS)


def match_factors(r2: np.ndarray, effect: np.ndarray, r2_min, leakage_max, factors=FACTORS) -> dict:
    """Directions (rows) matched one-to-one to factors (columns) by the Hungarian method on R2 x effect.
    Per factor: the matched direction, its R2, effect and leakage (share of its effect on other factors), and
    whether it counts as recovered (R2 >= r2_min and leakage <= leakage_max; each a number or per factor).
    Every direction's own dominant factor and leakage are given too, for the gallery: a direction is shown as
    a factor only where recovered."""
    rows, cols = linear_sum_assignment(-(r2 * effect))
    dominant, leak = attribution(effect)
    per = {}
    for k, f in zip(rows, cols):
        total = effect[k].sum()
        leakage = float((total - effect[k, f]) / total) if total > 0 else 1.0
        name = factors[f]
        ok = bool(r2[k, f] >= _per_factor(r2_min, name) and leakage <= _per_factor(leakage_max, name))
        per[factors[f]] = {"direction": int(k), "r2": float(r2[k, f]), "effect": float(effect[k, f]),
                           "leakage": leakage, "recovered": ok}
    return {"factors": per, "recovered": sum(v["recovered"] for v in per.values()),
            "mean_matched_r2": float(np.mean([v["r2"] for v in per.values()])) if per else 0.0,
            "directions": [{"direction": k, "largest": factors[int(dominant[k])], "leakage": float(leak[k])}
                           for k in range(len(effect))]}


def recovered_curve(r2: np.ndarray, effect: np.ndarray, r2_min, thresholds=None) -> list[tuple]:
    """Recovered factors as a function of one leakage threshold for all factors (the matching does not depend
    on it); r2_min as in match_factors."""
    thresholds = np.linspace(0, 1, 21) if thresholds is None else thresholds
    table = match_factors(r2, effect, r2_min, 1.0)
    return [(float(t), sum(v["r2"] >= _per_factor(r2_min, f) and v["leakage"] <= t
                           for f, v in table["factors"].items())) for t in thresholds]


def effect_dci(effect: np.ndarray, floor: np.ndarray | None = None) -> dict:
    """Disentanglement and completeness by DCI's formulas (Eastwood & Williams 2018; weights as in
    disentanglement_lib) on importance = effect minus the oracle's noise floor per factor. These are *effect*
    DCI: read off the direction x factor effect matrix, not Eastwood & Williams' predictive DCI."""
    importance = np.clip(effect - (0 if floor is None else floor[None, :]), 0, None)
    K, F = importance.shape
    total = importance.sum()
    if total <= 0:
        return {"disentanglement": 0.0, "completeness": 0.0}
    p_rows = importance / np.maximum(importance.sum(1, keepdims=True), 1e-12)
    d_rows = 1 - _entropy(p_rows, F)
    rho = importance.sum(1) / total
    p_cols = importance / np.maximum(importance.sum(0, keepdims=True), 1e-12)
    c_cols = 1 - _entropy(p_cols.T, K)
    weight = importance.sum(0) / total
    return {"disentanglement": float((rho * d_rows).sum()), "completeness": float((weight * c_cols).sum())}


def _entropy(p: np.ndarray, base: int) -> np.ndarray:
    """Row entropies of distributions p (rows sum to 1 or 0) in log base ``base``."""
    if base <= 1:
        return np.zeros(len(p))
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)
    return terms.sum(1) / math.log(base)


def null_summary(recovered: list[int], disentanglement: list[float]) -> dict:
    """Mean, standard deviation and 95th percentile of the random-direction null."""
    out = {"sets": len(recovered)}
    for name, values in (("recovered", recovered), ("disentanglement", disentanglement)):
        arr = np.asarray(values, dtype=float)
        out[name] = {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0,
                     "p95": float(np.percentile(arr, 95))}
    return out
