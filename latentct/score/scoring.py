"""Scoring directions against known factors, one code path for a generator's directions and for the phantom's
known-answer sweeps (latentct/score/validate.py), so the scorer is validated by the figures it prints.

Input: factor readings ``values`` (K, E, Z, F) of K directions (or sweeps) at E shifts for Z samples, in units
of each factor's spread. Per direction and factor a line is fitted against the shift: its R2 says the response
is smooth, its *effect* (|slope| x shift span) says how much the factor moves.

What "recovered" means. Each factor has a noise floor: what the oracle reports as its effect when it did not
move (known-answer sweeps that hold it still, at the scorer's sample count). A direction's *share* of factor f
is its effect above f's floor over the sum of its effects above their floors. A (direction, factor) pair
*passes* at a threshold tau when the share is above tau (strictly: a 0.5 / 0.5 tie never passes twice), the
effect is at least twice the floor (a ratio alone would count a change of 0.01 SD) and the line R2 is at least
0.5. With tau >= 0.5 a direction passes for one factor at most, so the count is the number of factors with a
passing direction; where several pass for one factor, the one with the largest share stands for it (ties: the
larger effect) and the others are listed as "also". The headline is the count at tau = 2/3; the area is the
mean count over tau in [0.5, 1] relative to the supervised directions' own; both are read against a pooled
null of random directions scored on the same latents (p-values, not a threshold).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from latentct.data.phantom import FACTORS

TAUS = {"0.5": 0.5, "0.67": 2 / 3, "0.8": 0.8}  # the share a recovered factor needs; "0.67" is the headline
HEADLINE = "0.67"
R2_MIN = 0.5  # the line R2 a passing pair needs: the response follows the shift, not noise
TIE = 1e-9  # a share must beat tau by more than rounding: shares of two equal excesses are 0.5 +- 1e-16
AREA_TAUS = np.linspace(0.5, 1.0, 51)  # the area: mean recovered count over these tau


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
    """Per row: the factor with the largest effect, and the share of the row's effect on the other factors (the
    known-answer sweeps' raw leakage, before any noise floor)."""
    own = effect.argmax(1)
    total = effect.sum(1)
    leakage = np.where(total > 0, 1 - effect[np.arange(len(effect)), own] / np.maximum(total, 1e-12), 1.0)
    return own, leakage


def shares(effect: np.ndarray, floor: np.ndarray) -> np.ndarray:
    """(K, F): each direction's effect above each factor's noise floor, as a share of its total above the floors
    (a row of zeros where nothing rises above a floor)."""
    excess = np.clip(effect - floor[None, :], 0.0, None)
    total = excess.sum(1, keepdims=True)
    return np.divide(excess, total, out=np.zeros_like(excess), where=total > 0)


def passing(r2: np.ndarray, effect: np.ndarray, floor: np.ndarray, tau: float) -> np.ndarray:
    """(K, F) bool: share above tau, effect at least twice the floor, line R2 at least R2_MIN. "Above" is strict
    beyond rounding (TIE): two equal excesses give shares 0.5 +- 1e-16, and a tie must not pass for either."""
    return (shares(effect, floor) > tau + TIE) & (effect >= 2 * floor[None, :]) & (r2 >= R2_MIN)


def matches(r2: np.ndarray, effect: np.ndarray, floor: np.ndarray, tau: float, factors=FACTORS) -> list[dict]:
    """The recovered factors at tau: per factor with a passing direction, the one that stands for it (largest
    share, ties to the larger effect) and the others that also pass ("also")."""
    share, ok = shares(effect, floor), passing(r2, effect, floor, tau)
    out = []
    for f, name in enumerate(factors):
        ks = [int(k) for k in np.flatnonzero(ok[:, f])]
        if not ks:
            continue
        ks.sort(key=lambda k: (-share[k, f], -effect[k, f]))
        k = ks[0]
        out.append({"direction": k, "factor": name, "share": float(share[k, f]), "effect": float(effect[k, f]),
                    "r2": float(r2[k, f]), "also": ks[1:]})
    return out


def count_curve(r2: np.ndarray, effect: np.ndarray, floor: np.ndarray, taus=AREA_TAUS) -> np.ndarray:
    """Recovered factors at each tau: a factor counts when any direction passes for it."""
    return _counts(shares(effect, floor), (effect >= 2 * floor[None, :]) & (r2 >= R2_MIN), taus)


def _counts(share: np.ndarray, base: np.ndarray, taus) -> np.ndarray:
    return np.array([int(((share > tau + TIE) & base).any(0).sum()) for tau in taus])


def area(curve: np.ndarray, supervised_curve: np.ndarray | None) -> float | None:
    """Mean recovered count over tau in [0.5, 1] relative to the supervised directions' (None without them or
    where theirs is 0)."""
    if supervised_curve is None or float(np.mean(supervised_curve)) <= 0:
        return None
    return float(np.mean(curve) / np.mean(supervised_curve))


def score_directions(r2: np.ndarray, effect: np.ndarray, floor: np.ndarray, factors=FACTORS) -> dict:
    """One method's table: recovered_at and matches per tau, the count curve over tau, and per direction its
    dominant factor and share (what the gallery shows)."""
    share = shares(effect, floor)
    at = {key: matches(r2, effect, floor, tau, factors) for key, tau in TAUS.items()}
    stands = {m["direction"]: m for m in at[HEADLINE]}
    lost = {k: m for m in at[HEADLINE] for k in m["also"]}
    directions = []
    for k in range(len(effect)):
        f = int(share[k].argmax()) if share[k].sum() > 0 else int(effect[k].argmax())
        row = {"direction": k, "dominant": factors[f], "share": float(share[k, f]), "effect": float(effect[k, f]),
               "r2": float(r2[k, f])}
        if k in stands:
            row["stands_for"] = factors[f]
        elif k in lost:
            row["also_for"], row["stood_for_by"] = lost[k]["factor"], lost[k]["direction"]
        else:  # why its largest share does not count
            row["fails"] = ("under twice the noise floor" if effect[k, f] < 2 * floor[f] else
                            f"line R2 {r2[k, f]:.2f}" if r2[k, f] < R2_MIN else f"share under {TAUS[HEADLINE]:.2f}")
        directions.append(row)
    return {"recovered_at": {key: len(v) for key, v in at.items()}, "recovered": len(at[HEADLINE]),
            "matches": at, "curve": count_curve(r2, effect, floor).tolist(), "directions": directions}


def direction_mark(row: dict) -> str:
    """How the gallery names a direction: the factor it stands for, one that another direction stands for, or
    its largest share, never "not clean" for a direction that passed."""
    if "stands_for" in row:
        return f"clean {row['stands_for']}, {row['share']:.2f}"
    if "also_for" in row:
        return f"clean {row['also_for']}, {row['share']:.2f} (also: k={row['stood_for_by']} stands for it)"
    fails = f" ({row['fails']})" if row.get("fails") else ""
    return f"mostly {row['dominant']}, share {row['share']:.2f}{fails}"


def p_value(observed: float, null: np.ndarray) -> float:
    """(1 + #null >= observed) / (1 + N): the chance that random directions do at least as well."""
    null = np.asarray(null, dtype=float)
    return float((1 + np.sum(null >= observed - 1e-12)) / (1 + len(null)))


def null_sets(pool_r2: np.ndarray, pool_effect: np.ndarray, floor: np.ndarray, count: int, sets: int,
              seed: int = 0) -> dict:
    """``sets`` random sets of ``count`` directions drawn (without replacement within a set) from one scored pool:
    their counts at each of TAUS and their count curves over AREA_TAUS, what chance alone recovers with that
    many directions."""
    rng = np.random.default_rng(seed)
    share = shares(pool_effect, floor)
    base = (pool_effect >= 2 * floor[None, :]) & (pool_r2 >= R2_MIN)
    taus = [*TAUS.values(), *AREA_TAUS]
    counts = np.zeros((sets, len(taus)), dtype=int)
    for s in range(sets):
        pick = rng.choice(len(pool_effect), size=min(count, len(pool_effect)), replace=False)
        counts[s] = _counts(share[pick], base[pick], taus)
    return {"at": {key: counts[:, i] for i, key in enumerate(TAUS)}, "curves": counts[:, len(TAUS):]}


def significance(table: dict, null: dict) -> dict:
    """p-values of one method's counts at each tau and of its area, against null sets of its own size. The
    area's p compares mean counts over tau: dividing both sides by the supervised row's mean would not change it,
    so it exists even where the area does not (no supervised row, or one that recovers nothing)."""
    out = {key: p_value(table["recovered_at"][key], null["at"][key]) for key in TAUS}
    out["auc"] = p_value(float(np.mean(table["curve"])), null["curves"].mean(1))
    return out


def verdict(p: float | None) -> str:
    """The printed word for an area p-value."""
    if p is None:
        return "no null"
    word = "above null" if p < 0.05 else "not above null"
    return f"{word}, borderline" if 0.01 <= p <= 0.2 else word


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


def across_seeds(tables: list[dict]) -> dict:
    """One method scored on several seeds (trained methods) or draws of report latents (seed-free methods):
    counts, area and p-values become their medians (a count may be a half on an even number), and the method is
    above the null when the area's p is below 0.05 on more than half of them (2 of 3). The per-direction fields
    (matches, curve, directions) stay those of the first seed, which ``matches_seed`` names."""
    def median(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        m = float(np.median(values))
        return int(m) if m.is_integer() else m

    first_of_seed = {}
    for t in tables:
        for s in t["per_seed"]:
            first_of_seed.setdefault(s["seed"], s)  # a seed counts once, its first entry, in the order they came
    per_seed = list(first_of_seed.values())
    first = tables[0]
    recovered_at = {key: median([s["recovered_at"][key] for s in per_seed]) for key in TAUS}
    p_value = None
    if all(s["p_value"] for s in per_seed):
        p_value = {key: median([s["p_value"][key] for s in per_seed]) for key in (*TAUS, "auc")}
    below = None if p_value is None else sum(s["p_value"]["auc"] < 0.05 for s in per_seed)
    above = None if below is None else below > len(per_seed) / 2
    word = "no null" if p_value is None else ("above null" if above else "not above null")
    if p_value is not None and 0.01 <= p_value["auc"] <= 0.2:
        word += ", borderline"
    return dict(first, recovered_at=recovered_at, recovered=recovered_at[HEADLINE],
                auc=median([s["auc"] for s in per_seed]), p_value=p_value, above_null=above, verdict=word,
                per_seed=per_seed, seeds_below_05=below, matches_seed=per_seed[0]["seed"])
