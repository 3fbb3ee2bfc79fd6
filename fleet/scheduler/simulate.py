"""The fleet simulator: the same ``plan()`` every cycle over a synthetic fleet and simulated time.

Each cycle: data arrives (``fleet.scheduler.synthetic``), the policy plans, every scheduled
member learns its budget's worth of its oldest pending tokens (the watermark moves), its
new version lands when its pack ends (``start_s + est_seconds`` into the cycle), usage is
charged and decayed, and waiting counters advance. Baselines run through the same loop with
the same fleet and the same arrivals (a separate random stream), so figures compare.

Report:

- **utilization**: busy GPU-seconds (pack start-up + tokens) over the training slices'
  GPU-seconds, mean over cycles;
- **fairness**: Jain's index of each company's GPU-seconds over its entitlement (the
  share-weighted max-min split of what was used, capped by what the company could have
  used: its arrived tokens, at most ``max_member_tokens`` per model per tier interval);
- **freshness** per tier: time from a data item's arrival to the landing of the first
  version that includes it, p50 and p99; items never learned by the end count with their
  age at the end (a lower bound, so a policy cannot look fresh by leaving data behind);
  frozen models are left out (they never train by design);
- **starved**: models with pending data left out for capacity ``aging_bound_cycles``
  cycles in a row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from fleet.scheduler.baselines import policy_named
from fleet.scheduler.inventory import synthetic_inventory
from fleet.scheduler.memory import BaseSpec
from fleet.scheduler.metrics import jain_vs_shares, percentiles
from fleet.scheduler.policy import PolicyConfig, advance_waiting
from fleet.scheduler.synthetic import synthetic_fleet
from fleet.types import TIERS

DAY_S = 86400.0


@dataclass(frozen=True)
class SimConfig:
    models: int = 10_000
    slices: int = 64
    hours: float = 24.0
    load: float = 1.5
    """Offered load: expected arriving tokens per cycle over the training slices' token capacity."""
    seed: int = 0
    base: str | None = "1b"
    """Base preset the memory model sizes packs for (``tiny``, ``1b``, ``8b``; None: the policy's own)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)


@dataclass
class SimReport:
    policy: str
    models: int
    slices: int
    hours: float
    cycles: int
    load: float
    utilization: float
    jain: float
    starved: int
    freshness_s: dict[str, dict[str, float]]  # tier → {"p50": s, "p99": s}
    scheduled_per_cycle: float
    wall_s: float
    series: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self, *, series: bool = False) -> dict[str, Any]:
        d = asdict(self)
        if not series:
            d.pop("series")
        return d


def simulate(
    config: SimConfig | None = None,
    policy: str = "fleet",
    *,
    progress: Callable[[int, int], None] | None = None,
) -> SimReport:
    cfg = config or SimConfig()
    plan_fn = policy_named(policy)
    pcfg = (
        cfg.policy
        if cfg.base is None
        else replace(cfg.policy, default_base=BaseSpec.preset(cfg.base, "default"))
    )
    inv = synthetic_inventory(cfg.slices)
    table = inv.table(pcfg.reserve_serving_fraction)
    cycle, tau = pcfg.cycle_s, pcfg.tokens_per_gpu_s
    capacity_tokens = float(table.speed[table.training].sum()) * cycle * tau
    fleet = synthetic_fleet(cfg.models, seed=cfg.seed).calibrated(cfg.load * capacity_tokens)
    n, n_comp = fleet.n_models, fleet.n_companies
    cycles = max(1, round(cfg.hours * 3600.0 / cycle))
    per_day = max(1, round(DAY_S / cycle))
    init = np.random.default_rng(cfg.seed + 2)
    arrivals_rng = np.random.default_rng(cfg.seed + 1)  # the same stream for every policy

    pending = np.zeros(n, np.int64)
    arrived = np.zeros(n, np.int64)
    learned = np.zeros(n, np.int64)
    last_version = -init.uniform(0.0, DAY_S, n)
    waiting = np.zeros(n, np.int32)
    oldest = np.full(n, np.inf)
    model_usage = np.zeros(n)
    company_usage = np.zeros(n_comp)
    used_total = np.zeros(n_comp)
    ring = np.zeros((n_comp, per_day))
    starved = np.zeros(n, bool)
    decay = float(np.exp2(-cycle / pcfg.usage_half_life_s))
    ev_model = np.zeros(0, np.int64)
    ev_t = np.zeros(0)
    ev_end = np.zeros(0, np.int64)
    done_lat: list[np.ndarray] = []
    done_tier: list[np.ndarray] = []
    series: dict[str, list[float]] = {
        k: []
        for k in (
            "hour",
            "utilization",
            "fresh_p50_s",
            "fresh_p99_s",
            "individual_p99_s",
            "backlog_tokens",
            "scheduled",
        )
    }
    start = time.perf_counter()
    for k in range(cycles):
        now = k * cycle
        idx, tok = fleet.arrivals(arrivals_rng)
        t_arr = now - arrivals_rng.random(len(idx)) * cycle
        pending[idx] += tok
        arrived[idx] += tok
        np.minimum.at(oldest, idx, t_arr)
        ev_model = np.concatenate((ev_model, idx))
        ev_t = np.concatenate((ev_t, t_arr))
        ev_end = np.concatenate((ev_end, arrived[idx]))

        demand = fleet.demand(
            pending_tokens=pending,
            since_last_s=np.maximum(now - last_version, 0.0),
            waiting_cycles=waiting,
            pending_age_s=np.where(pending > 0, now - np.minimum(oldest, now), 0.0),
            model_usage_gpu_s=model_usage,
            company_usage_gpu_s=company_usage,
            company_spent_gpu_s=ring.sum(axis=1),
        )
        plan = plan_fn(demand, inv, pcfg, now)
        a = plan.arrays
        mi, budget = a.member_index, a.member_budget
        learned[mi] += budget
        pending[mi] -= budget
        last_version[mi] = now + a.member_finish_s
        gpu = budget / tau
        model_usage *= decay
        model_usage[mi] += gpu
        company_usage = company_usage * decay + a.company_gpu_s
        used_total += a.company_gpu_s
        ring[:, k % per_day] = a.company_gpu_s
        waiting = advance_waiting(waiting, a.reason)
        starved |= waiting >= pcfg.aging_bound_cycles

        trained = np.zeros(n, bool)
        trained[mi] = True
        touched = trained[ev_model]
        done = touched & (learned[ev_model] >= ev_end)
        lat = last_version[ev_model[done]] - ev_t[done]
        tiers = fleet.tier[ev_model[done]]
        done_lat.append(lat)
        done_tier.append(tiers)
        keep = ~done
        ev_model, ev_t, ev_end = ev_model[keep], ev_t[keep], ev_end[keep]
        oldest[mi] = np.inf
        still = trained[ev_model]
        np.minimum.at(oldest, ev_model[still], ev_t[still])

        p50, p99 = percentiles(lat)
        series["hour"].append(now / 3600.0)
        series["utilization"].append(float(plan.summary["utilization"]))
        series["fresh_p50_s"].append(p50)
        series["fresh_p99_s"].append(p99)
        series["individual_p99_s"].append(percentiles(lat[tiers == 2], (99.0,))[0])
        series["backlog_tokens"].append(float(pending[~fleet.frozen].sum()))
        series["scheduled"].append(float(len(mi)))
        if progress is not None:
            progress(k + 1, cycles)
    wall = time.perf_counter() - start

    end_t = cycles * cycle
    live = ~fleet.frozen[ev_model]  # frozen models never train: not a freshness failure
    lat_all = np.concatenate(done_lat + [end_t - ev_t[live]])
    tier_all = np.concatenate(done_tier + [fleet.tier[ev_model[live]]])
    freshness = {}
    for code, name in enumerate(TIERS):
        p50, p99 = percentiles(lat_all[tier_all == code])
        freshness[name] = {"p50": p50, "p99": p99}
    p50, p99 = percentiles(lat_all)
    freshness["all"] = {"p50": p50, "p99": p99}

    runs_per_model = cycles * cycle / np.maximum(np.asarray(pcfg.tier_min_interval_s)[fleet.tier], cycle)
    could_use = np.minimum(arrived, runs_per_model * pcfg.member_cap) * ~fleet.frozen / tau
    demand_c = np.bincount(fleet.company, weights=could_use, minlength=n_comp)
    return SimReport(
        policy=policy,
        models=n,
        slices=cfg.slices,
        hours=cfg.hours,
        cycles=cycles,
        load=cfg.load,
        utilization=float(np.mean(series["utilization"])),
        jain=jain_vs_shares(used_total, fleet.company_shares, demand_c),
        starved=int(starved.sum()),
        freshness_s=freshness,
        scheduled_per_cycle=float(np.mean(series["scheduled"])),
        wall_s=wall,
        series=series,
    )


def plot_reports(reports: Sequence[SimReport], path: str) -> str:
    """A PNG of freshness (p50, p99 of the items learned each cycle) and utilization over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_u) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for i, r in enumerate(reports):
        color = f"C{i}"
        h = np.asarray(r.series["hour"])
        ax_f.plot(h, np.asarray(r.series["fresh_p50_s"]) / 60.0, color=color, ls="-", label=f"{r.policy} p50")
        ax_f.plot(
            h, np.asarray(r.series["fresh_p99_s"]) / 60.0, color=color, ls="--", label=f"{r.policy} p99"
        )
        ax_u.plot(h, 100.0 * np.asarray(r.series["utilization"]), color=color, label=r.policy)
    ax_f.set_ylabel("freshness (min)")
    ax_f.set_yscale("log")
    ax_f.set_title(f"{reports[0].models:,} models, {reports[0].slices} slices, load {reports[0].load:g}")
    ax_f.legend(fontsize=8, ncol=max(1, len(reports)))
    ax_u.set_ylabel("utilization (%)")
    ax_u.set_xlabel("simulated hour")
    ax_u.set_ylim(0, 105)
    ax_u.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
