"""Fleet-level figures of merit: Jain's fairness against shares, freshness percentiles."""

from __future__ import annotations

import numpy as np


def water_fill(total: float, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Weighted max-min fair split of ``total``: x_c = min(cap_c, λ·w_c) with Σx = total
    (or x = caps when they sum to less). Weights ≤ 0 get nothing."""
    w = np.where(weights > 0, weights, 0.0)
    caps = np.where(w > 0, np.maximum(caps, 0.0), 0.0)
    if caps.sum() <= total:
        return caps.copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        level = np.where(w > 0, caps / w, np.inf)  # λ at which each company saturates
    order = np.argsort(level, kind="stable")
    lv, wv, cv = level[order], w[order], caps[order]
    sat = np.concatenate(([0.0], np.cumsum(cv)))  # Σ caps of the p first saturated
    w_rest = np.concatenate((np.cumsum(wv[::-1])[::-1], [0.0]))  # Σ weights from p on
    # total at λ = lv[p]: sat[p] + lv[p]·w_rest[p]; find the first p where it exceeds total
    at = sat[:-1] + np.where(np.isfinite(lv), lv, 0.0) * w_rest[:-1]
    at[~np.isfinite(lv)] = np.inf
    p = int(np.searchsorted(at, total, side="right"))
    lam = (total - sat[p]) / w_rest[p] if w_rest[p] > 0 else 0.0
    return np.minimum(caps, lam * w)


def jain(x: np.ndarray) -> float:
    """Jain's index (Σx)² / (n·Σx²): 1 when all equal, 1/n when one takes everything."""
    x = np.asarray(x, dtype=np.float64)
    if len(x) == 0 or not np.any(x > 0):
        return 1.0
    return float(x.sum() ** 2 / (len(x) * np.square(x).sum()))


def jain_vs_shares(usage: np.ndarray, shares: np.ndarray, demand: np.ndarray) -> float:
    """Jain's index of usage relative to each company's entitlement: the weighted max-min
    fair split of the capacity actually used, by shares, capped by what each company could
    use (its demand). Companies entitled to nothing (no share or no demand) are left out."""
    ent = water_fill(float(usage.sum()), shares, demand)
    keep = ent > 1e-9 * max(float(ent.max(initial=0.0)), 1e-300)
    return jain(usage[keep] / ent[keep])


def percentiles(values: np.ndarray, qs: tuple[float, ...] = (50.0, 99.0)) -> list[float]:
    if len(values) == 0:
        return [float("nan")] * len(qs)
    return [float(v) for v in np.percentile(values, qs)]
