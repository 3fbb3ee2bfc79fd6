"""Hierarchical fair share, urgency and aging: the order in which eligible models are admitted.

The tree is company → team → model. A company's own model sits in a node of its own beside
the teams (share ``company_model_share``); team and individual models sit in their team.

**Fair-share factor.** Slurm's classic factor is F = 2^(−U/S), with U a node's share of the
(decayed) usage and S its share of the entitlement. Ordering by F descending is ordering by
U/S ascending. fleet evaluates it *after* the allocations this plan has already made: the
i-th model of a company in the company's own order has

    V_c(i) = (U_c + Σ_{j ≤ i in c} g_j) / S_c,        F_c(i) = 2^(−V_c(i)/V̄)

where g_j is model j's planned GPU-seconds. Admitting models in increasing V_c is weighted
fair queueing over companies with their decayed usage as the starting point: every company
is served up to the same usage-per-share level λ (water filling), a company that cannot use
its share leaves it to the others (borrowing of idle capacity), and a company that used more
than its share in the last half-lives waits until the others have caught up.

The same rule orders teams inside a company, V_t(i) = (U_t + Σ_{j ≤ i in t} g_j) / S_t, and
models inside a team (or the company node) by their own virtual finish

    k(i) = (u_i + g_i) / (w_tier · w_i · urgency_i)
    urgency_i = (1 + log2(1 + pending_i / urgency_tokens))
              · (1 + min(since_last_i, H) / H)            H = staleness_horizon_s
              · (1 + waiting_i + age_i / cycle_s)         gradual aging

(waiting_i: cycles passed over; age_i: age of its oldest pending data), so within a team,
models with more data, staler versions and older data go first, and no model's history
is forgotten (u_i is its own decayed usage).

**Age factor.** Fair share alone makes a company that sends more data than its share pays
for wait ever longer under sustained overload. As in Slurm's multifactor priority, the
global order is by P = F_c(i) + w_age·A_i with A_i = min(age of model i's oldest pending
data / max_age, 1) (``age_weight``, ``max_age_s``): data that has waited long enough
overtakes fresher data of companies below their share. w_age = 0 orders by fair share alone;
the simulator shows the trade (fairness against tail freshness) as w_age varies.

**Breadth.** Under overload no model takes more per run than lets all of its company's
candidates run once within half the aging bound on the company's entitled capacity (its
share of this cycle's GPU-seconds, water-filled against demand): a per-company water level
q_c with Σ_{i∈c} min(d_i, q_c) ≤ ½·B·E_c. Fair share then rotates through a throttled
company's backlog itself, instead of the aging rule having to force it.

**Aging guarantee.** Each model with pending data has a deadline d_i = B − waiting_i
(B = ``aging_bound_cycles``). With M models schedulable per cycle, the earliest-deadline
rule must schedule now n = max(N(≤1), max_k [N(≤k) − (k−1)·M]) models (N(≤k): models due
within k cycles), else some deadline is missed later even if every future cycle is full.
Those n (earliest deadlines first) are *forced*: admitted before everything else, with at
most ``aging_member_tokens`` (guaranteed progress, not their whole backlog), and charged to
their company like any other model. Budgets are hard: a forced model of a company beyond its
budget is not admitted (reason ``budget``).

Everything here is sorting on 16-bit digits (numpy's radix sort) and cumulative sums, so
the order of 10⁶ models costs a few tens of milliseconds per level.
"""

from __future__ import annotations

import numpy as np


def stable_order(
    key: np.ndarray | None = None, group: np.ndarray | None = None, perm: np.ndarray | None = None
) -> np.ndarray:
    """Indices sorting by (group, key), stable with respect to ``perm`` (default: index order).

    ``key`` must be ≥ 0 (compared as float32, ~7 significant digits; equal keys keep their
    order); ``group`` must be a non-negative integer array. LSD radix sort on 16-bit digits.
    """
    n = len(key) if key is not None else len(group)  # type: ignore[arg-type]
    order = np.arange(n) if perm is None else perm
    digits: list[np.ndarray] = []
    if key is not None:
        bits = np.ascontiguousarray(key, dtype=np.float32).view(np.uint32)  # monotone for x ≥ 0
        digits += [(bits & 0xFFFF).astype(np.uint16), (bits >> 16).astype(np.uint16)]
    if group is not None:
        g = np.asarray(group)
        digits.append((g & 0xFFFF).astype(np.uint16))
        if n and int(g.max()) > 0xFFFF:
            digits.append((g >> 16).astype(np.uint16))
    for d in digits:  # least significant first
        order = order[np.argsort(d[order], kind="stable")]
    return order


def group_cumsum(values: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Inclusive cumulative sum restarting at each run of equal ``group`` (groups contiguous)."""
    if len(values) == 0:
        return values.astype(np.float64)
    cs = np.cumsum(values, dtype=np.float64)
    start = np.empty(len(values), dtype=bool)
    start[0] = True
    np.not_equal(group[1:], group[:-1], out=start[1:])
    offset = (cs - values)[start]
    return cs - offset[np.cumsum(start) - 1]


def aging_forced(waiting: np.ndarray, bound: int, per_cycle: int) -> np.ndarray:
    """The models the earliest-deadline rule must schedule this cycle (see the module docstring)."""
    n = len(waiting)
    forced = np.zeros(n, dtype=bool)
    if n == 0:
        return forced
    deadline = np.clip(bound - waiting.astype(np.int64), 1, bound)
    due = np.cumsum(np.bincount(deadline, minlength=bound + 1)[1:])  # N(≤k), k = 1..B
    need = due - np.arange(bound, dtype=np.int64) * max(per_cycle, 1)
    n_now = int(max(need.max(), due[0]))
    if n_now <= 0:
        return forced
    k = int(np.searchsorted(due, n_now)) + 1  # deadlines < k are all forced, then some with deadline k
    forced = deadline < k
    extra = n_now - int(forced.sum())
    if extra > 0:
        forced[np.flatnonzero(deadline == k)[:extra]] = True
    return forced


def group_water_level(values: np.ndarray, group: np.ndarray, total: np.ndarray, iters: int = 4) -> np.ndarray:
    """Per group g, a level q_g with Σ_{i∈g} min(values_i, q_g) ≤ total_g (inf where all fit).

    Fixed-point iteration q ← (total − Σ_{v<q} v) / #{v ≥ q} from q = total / n: it rises
    monotonically toward the exact water level and stays below it, so a few steps give a
    level that is safe (never above) at O(n) per step, with no sort.
    """
    n_groups = len(total)
    v = values.astype(np.float64)
    count = np.bincount(group, minlength=n_groups).astype(np.float64)
    whole = np.bincount(group, weights=v, minlength=n_groups)
    fits = whole <= total
    q = np.divide(total, count, out=np.full(n_groups, np.inf), where=count > 0)
    for _ in range(iters):
        small = v < q[group]
        s_small = np.bincount(group, weights=np.where(small, v, 0.0), minlength=n_groups)
        n_big = count - np.bincount(group, weights=small, minlength=n_groups)
        q_next = np.divide(total - s_small, n_big, out=np.full(n_groups, np.inf), where=n_big > 0)
        q = np.maximum(q, q_next)
    q[fits] = np.inf
    return q


def urgency(
    tier_weight: np.ndarray,
    weight: np.ndarray,
    pending: np.ndarray,
    since_last_s: np.ndarray,
    waiting: np.ndarray,
    urgency_tokens: float,
    horizon_s: float,
) -> np.ndarray:
    stale = np.minimum(since_last_s, horizon_s) / horizon_s
    return (
        tier_weight
        * weight
        * (1.0 + np.log2(1.0 + pending / urgency_tokens))
        * (1.0 + stale)
        * (1.0 + waiting)
    )


def fair_share_order(
    *,
    company: np.ndarray,
    node: np.ndarray,
    gpu_s: np.ndarray,
    model_usage: np.ndarray,
    urgency_: np.ndarray,
    forced: np.ndarray,
    node_usage: np.ndarray,
    node_share: np.ndarray,
    company_usage: np.ndarray,
    company_share: np.ndarray,
    company_budget_left: np.ndarray,
    age: np.ndarray | None = None,
    age_weight: float = 0.0,
    level_ref: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Admission order of the candidates, and whether each (in that order) is within its
    company's budget. All per-candidate arrays have equal length; ``node``/``company``
    index ``node_*``/``company_*``.

    Within a company the order is the company's own order (forced first, then V_t), so a
    company's cumulative GPU-seconds along the global order is the ``cum`` used for V_c and
    for the budget test.
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        k1 = (model_usage + gpu_s) / urgency_
        k1[forced] = 0.0
        o1 = stable_order(k1, node)
        n1 = node[o1]
        v_t = (node_usage[n1] + group_cumsum(gpu_s[o1], n1)) / node_share[n1]
        v_t[forced[o1]] = 0.0
        o2 = o1[stable_order(v_t, company[o1])]
        c2 = company[o2]
        cum = group_cumsum(gpu_s[o2], c2)
        v_c = (company_usage[c2] + cum) / company_share[c2]
        v_c[forced[o2]] = 0.0
    if age is None or age_weight <= 0:
        in_budget = cum <= company_budget_left[c2] * (1 + 1e-12)
        p3 = stable_order(v_c)
        return o2[p3], in_budget[p3]
    # multifactor priority: P = F + w_age·A, F = 2^(−V_c/V_ref) ∈ (0, 1], A ∈ [0, 1]
    prio = np.exp2(-v_c / level_ref) + age_weight * age[o2]
    prio[forced[o2]] = 2.0 + age_weight
    order = o2[stable_order(2.0 + age_weight - prio)]
    # the age term may reorder a company's models: its budget prefix follows the final order
    c3 = company[order]
    by_company = stable_order(group=c3)
    cum3 = group_cumsum(gpu_s[order][by_company], c3[by_company])
    in_budget = np.empty(len(order), dtype=bool)
    in_budget[by_company] = cum3 <= company_budget_left[c3[by_company]] * (1 + 1e-12)
    return order, in_budget


def fair_share_factor(usage: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Slurm's F = 2^(−U/S) per company, U and S normalized to sum 1 (for reports)."""
    u = usage / usage.sum() if usage.sum() > 0 else np.zeros_like(usage)
    s = shares / shares.sum() if shares.sum() > 0 else np.zeros_like(shares)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(s > 0, np.exp2(-u / np.where(s > 0, s, 1)), 0.0)
