"""Packing: admitted models → packs on slices, sized by memory, balanced in tokens.

Per base model, the admitted members are sorted by desired tokens (largest first) and laid
along the slices' remaining capacity (GPU-seconds, largest slice first; scaled down in
proportion when there is room to spare, so that all slices finish together): member i goes
to the slice whose stretch of the capacity line holds the middle of member i's stretch. Each
slice's members are cut, in that order, into packs whose memory (``fleet.scheduler.memory``)
fits the slice; the packs run one after another. If a slice's members want more tokens than
its time allows after the per-pack overhead, their budgets are cut to a common water level
q (budget = min(desired, q)), so the largest members are trimmed alike.

Why this shape: members of one pack are neighbours in the size order, so their budgets are
close and they finish together (the packed loop steps all members in lockstep); large
members land on large slices; the whole stage is a sort, a cumulative sum and one
``searchsorted`` plus a short loop over slices, whatever the number of models.

Capacity is in normalized GPU-seconds (seconds × slice speed, a full H100 = 1.0), so
``tokens / tokens_per_gpu_s`` is the same GPU-seconds on every slice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class SliceState:
    """The training slices of one plan and what is left of their cycle."""

    rows: np.ndarray  # (S,) rows of the slice table
    speed: np.ndarray  # (S,) relative speed
    usable_bytes: np.ndarray  # (S,) memory a pack may plan
    remaining: np.ndarray  # (S,) GPU-seconds left this cycle (updated)
    clock: np.ndarray  # (S,) seconds already planned on the slice (updated)

    @classmethod
    def fresh(
        cls, rows: np.ndarray, speed: np.ndarray, usable_bytes: np.ndarray, cycle_s: float
    ) -> SliceState:
        return cls(rows, speed, usable_bytes, speed * cycle_s, np.zeros(len(rows)))


@dataclass
class PackList:
    """Packs as they are planned (one entry per pack)."""

    slice: list[int] = field(default_factory=list)  # index into SliceState
    base: list[int] = field(default_factory=list)
    start_s: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    members: list[np.ndarray] = field(default_factory=list)  # member ids given by the caller
    budgets: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class PackParams:
    tokens_per_gpu_s: float
    pack_overhead_s: float
    min_member_tokens: int
    max_pack_members: int


def water_level(d: np.ndarray, total: float) -> np.ndarray:
    """Budgets min(d, q) with Σ = ``total`` (floored to whole tokens); d itself if it fits."""
    if d.sum() <= total:
        return d.copy()
    s = np.sort(d)
    k = len(s)
    below = np.concatenate(([0], np.cumsum(s)[:-1]))  # Σ of the p smallest
    at_level = below + s * (k - np.arange(k))  # Σ min(d, s[p])
    p = int(np.searchsorted(at_level, total, side="right"))
    q = (total - below[p]) / (k - p)  # the k - p largest are cut to q
    return np.minimum(d, np.floor(q)).astype(np.int64)


def _max_members(cap: float, ov: float, min_gpu: float, m: int) -> int:
    """Most members a slice with ``cap`` GPU-s can take at the minimum budget, in packs of ≤ m."""
    if cap <= ov + min_gpu:
        return 0
    p_star = cap / (m * min_gpu + ov)
    best = 0
    for p in {max(1, math.floor(p_star)), max(1, math.ceil(p_star))}:
        best = max(best, min(p * m, math.floor((cap - p * ov) / min_gpu)))
    return best


def pack_base(
    state: SliceState,
    share: np.ndarray,
    members: np.ndarray,
    desired: np.ndarray,
    mem_bytes: np.ndarray,
    priority: np.ndarray,
    base_id: int,
    base_bytes: float,
    params: PackParams,
    out: PackList,
) -> np.ndarray:
    """Pack the members of one base onto the slices; returns the members that did not fit.

    ``share`` (S,) is the fraction of each slice's remaining time this base may use (0 where
    the base does not fit); ``priority`` orders members for dropping (lower = keep).
    """
    if len(members) == 0:
        return members[:0]
    tau = params.tokens_per_gpu_s
    order = np.lexsort((priority, -desired))
    members, desired, mem_bytes, priority = members[order], desired[order], mem_bytes[order], priority[order]
    cap = state.remaining * share
    fit_bytes = state.usable_bytes - base_bytes
    m = np.clip(
        np.floor(np.maximum(fit_bytes, 0) / max(float(mem_bytes.max()), 1.0)), 0, params.max_pack_members
    ).astype(np.int64)
    ov = params.pack_overhead_s * state.speed  # GPU-s one pack's start-up costs on each slice
    min_gpu = params.min_member_tokens / tau
    usable = np.flatnonzero((m >= 1) & (cap > ov + min_gpu))
    if len(usable) == 0:
        return members
    usable = usable[np.lexsort((usable, -cap[usable]))]  # largest capacity first
    ov_member = params.pack_overhead_s * state.speed[usable].sum() / m[usable].sum()
    room = float(cap[usable].sum())
    dropped: list[np.ndarray] = []
    if desired.sum() / tau + len(members) * ov_member > room:
        # Over-subscribed (forced models beyond capacity, or an optimistic estimate): cut the
        # budgets to one water level *before* laying them out, so that the excess is shared
        # by all instead of piling onto the last slice; drop the least urgent only if even
        # minimum budgets do not fit.
        k_fit = int(room / (min_gpu + ov_member))
        if len(members) > k_fit:
            keep = np.sort(np.argsort(priority, kind="stable")[:k_fit])
            gone = np.setdiff1d(np.arange(len(members)), keep)
            dropped.append(members[gone])
            members, desired, mem_bytes, priority = (
                members[keep],
                desired[keep],
                mem_bytes[keep],
                priority[keep],
            )
            if len(members) == 0:
                return np.concatenate(dropped)
        desired = np.maximum(water_level(desired, (room - len(members) * ov_member) * tau), 1)
        order = np.lexsort((priority, -desired))
        members, desired, mem_bytes, priority = (
            members[order],
            desired[order],
            mem_bytes[order],
            priority[order],
        )
    cost = desired / tau + ov_member
    mid = np.cumsum(cost) - cost / 2
    # With room to spare, lay the work out in proportion to the slices' capacity: every slice
    # then finishes at about the same time (the earliest the last member can), not the first
    # slices late and the rest idle.
    layout = cap[usable] * min(1.0, float(cost.sum()) / room)
    where = np.minimum(np.searchsorted(np.cumsum(layout), mid, side="right"), len(usable) - 1)
    bounds = np.searchsorted(where, np.arange(len(usable) + 1), side="left")
    for u in range(len(usable)):
        a, e = int(bounds[u]), int(bounds[u + 1])
        if a == e:
            continue
        j = int(usable[u])
        seg_m, seg_d, seg_b, seg_p = members[a:e], desired[a:e], mem_bytes[a:e], priority[a:e]
        kmax = _max_members(float(cap[j]), float(ov[j]), min_gpu, int(m[j]))
        if len(seg_m) > kmax:  # too many for the time left even at the minimum budget: drop the least urgent
            keep = np.sort(np.argsort(seg_p, kind="stable")[:kmax])
            gone = np.setdiff1d(np.arange(len(seg_m)), keep)
            dropped.append(seg_m[gone])
            seg_m, seg_d, seg_b = seg_m[keep], seg_d[keep], seg_b[keep]
            if len(seg_m) == 0:
                continue
        cuts = _split_by_memory(seg_b, float(fit_bytes[j]), params.max_pack_members)
        n_packs = len(cuts) - 1
        avail_tokens = (cap[j] - n_packs * ov[j]) * tau
        budgets = water_level(seg_d, avail_tokens)
        rate = tau * state.speed[j]
        for p in range(n_packs):
            lo, hi = cuts[p], cuts[p + 1]
            seconds = params.pack_overhead_s + float(budgets[lo:hi].sum()) / rate
            out.slice.append(j)
            out.base.append(base_id)
            out.start_s.append(float(state.clock[j]))
            out.seconds.append(seconds)
            out.members.append(seg_m[lo:hi])
            out.budgets.append(budgets[lo:hi])
            state.clock[j] += seconds
        state.remaining[j] -= n_packs * ov[j] + float(budgets.sum()) / tau
    return np.concatenate(dropped) if dropped else members[:0]


def _split_by_memory(mem_bytes: np.ndarray, fit_bytes: float, max_members: int) -> list[int]:
    """Cut points of consecutive packs whose members' bytes fit ``fit_bytes``."""
    cum = np.cumsum(mem_bytes)
    cuts, start, k = [0], 0, len(mem_bytes)
    while start < k:
        before = float(cum[start - 1]) if start else 0.0
        end = int(np.searchsorted(cum, before + fit_bytes, side="right"))
        end = max(start + 1, min(end, start + max_members))
        cuts.append(end)
        start = end
    return cuts
