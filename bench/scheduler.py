"""Scheduler: plan() for 10⁶ models over 512 mixed slices (median of 5, traced peak memory),
the simulator over 10⁶ models × 24 simulated hours, and fleet's policy against FIFO and
round-robin on the default synthetic fleet under overload (`fleet simulate`'s defaults).

Speed reference in the same process: FIFO through the same code (same eligibility, same
packing, one sort instead of the hierarchical fair share), so the ratio is what fairness,
urgency and aging cost on top of the cheapest order.
"""

from __future__ import annotations

import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np  # noqa: E402
from _common import table, write_results  # noqa: E402

from fleet.scheduler import BaseSpec, PolicyConfig, SimConfig, plan, plan_fifo, simulate, synthetic_inventory  # noqa: E402
from fleet.scheduler.synthetic import synthetic_fleet  # noqa: E402


def registry_figure(key: str):
    """A figure bench/registry.py measured on its 10⁶-model registry (None before it ran)."""
    import json

    path = Path(__file__).resolve().parent / "results" / "registry.json"
    return json.loads(path.read_text()).get(key) if path.exists() else None


N_PLAN = 1_000_000
SLICES = 512
DEFAULT_SIM = SimConfig(
    models=100_000, slices=32, hours=24.0, load=1.3, seed=0
)  # = `fleet simulate` defaults


def demand_1m():
    """A 10⁶-model demand: 60% with pending data (heavy-tailed), all tiers, mixed waiting/usage."""
    fleet = synthetic_fleet(N_PLAN, seed=0)
    rng = np.random.default_rng(1)
    has = rng.random(N_PLAN) < 0.6
    pending = np.where(has, (20_000 * (1 + rng.pareto(1.5, N_PLAN))).astype(np.int64), 0)
    return fleet.demand(
        pending_tokens=pending,
        since_last_s=rng.uniform(0, 2 * 86400, N_PLAN),
        waiting_cycles=rng.integers(0, 12, N_PLAN).astype(np.int32),
        pending_age_s=np.where(has, rng.uniform(0, 86400, N_PLAN), 0.0),
        model_usage_gpu_s=rng.exponential(5.0, N_PLAN),
        company_usage_gpu_s=rng.exponential(1000.0, fleet.n_companies),
    )


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    demand = demand_1m()
    inv = synthetic_inventory(SLICES)
    cfg = PolicyConfig(default_base=BaseSpec.preset("1b", "default"))
    first = plan(demand, inv, cfg, 0.0)  # warm-up (and the figures below)
    fleet_s = timed(lambda: plan(demand, inv, cfg, 0.0), 5)
    fifo_s = timed(lambda: plan_fifo(demand, inv, cfg, 0.0), 5)
    tracemalloc.start()
    plan(demand, inv, cfg, 0.0)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t = time.perf_counter()
    first.to_json(include_unscheduled=False)
    packs_json_s = time.perf_counter() - t

    t = time.perf_counter()
    big = simulate(SimConfig(models=N_PLAN, slices=SLICES, hours=24.0, load=1.3, seed=0), "fleet")
    sim_1m_s = time.perf_counter() - t

    runs = {p: simulate(DEFAULT_SIM, p) for p in ("fleet", "fifo", "round-robin")}
    fl, ff, rr = runs["fleet"], runs["fifo"], runs["round-robin"]
    fig = {
        "plan_1m_median_s": round(statistics.median(fleet_s), 4),
        "plan_1m_peak_mib": round(peak / 2**20, 1),
        "plan_1m_fifo_median_s": round(statistics.median(fifo_s), 4),
        "plan_1m_vs_fifo_ratio": round(statistics.median(fleet_s) / statistics.median(fifo_s), 2),
        "plan_1m_eligible": int(first.summary["eligible"]),
        "plan_1m_scheduled": int(first.summary["scheduled"]),
        "plan_1m_packs": int(first.summary["packs"]),
        "plan_1m_packs_json_s": round(packs_json_s, 3),
        "simulate_1m_24h_s": round(sim_1m_s, 2),
        "sim_1m_jain_fleet": round(big.jain, 4),
        "sim_1m_utilization_fleet": round(big.utilization, 4),
        "sim_1m_starved_fleet": big.starved,
        # The demand read needs a populated registry: bench/registry.py measures it.
        "demand_query_1m_s": registry_figure("demand_query_1m_s"),
        "sim_jain_fleet": round(fl.jain, 4),
        "sim_jain_fifo": round(ff.jain, 4),
        "sim_jain_round_robin": round(rr.jain, 4),
        "sim_starved_fleet": fl.starved,
        "sim_starved_fifo": ff.starved,
        "sim_individual_freshness_p99_fleet_s": round(fl.freshness_s["individual"]["p99"], 1),
        "sim_individual_freshness_p99_fifo_s": round(ff.freshness_s["individual"]["p99"], 1),
        "sim_individual_freshness_p99_round_robin_s": round(rr.freshness_s["individual"]["p99"], 1),
        "sim_individual_freshness_p50_fleet_s": round(fl.freshness_s["individual"]["p50"], 1),
        "sim_individual_freshness_p50_fifo_s": round(ff.freshness_s["individual"]["p50"], 1),
        "sim_utilization_fleet": round(fl.utilization, 4),
        "sim_utilization_fifo": round(ff.utilization, 4),
        "sim_default": f"{DEFAULT_SIM.models} models, {DEFAULT_SIM.slices} slices, {DEFAULT_SIM.hours:g} h, load {DEFAULT_SIM.load:g}",
    }
    write_results("scheduler", fig)
    table(
        "scheduler",
        [
            ("plan() 10⁶ models, 512 slices (median of 5)", f"{fig['plan_1m_median_s']:.3f} s", "≤ 1 s"),
            (
                "  same code, FIFO order (reference)",
                f"{fig['plan_1m_fifo_median_s']:.3f} s (×{fig['plan_1m_vs_fifo_ratio']})",
                "",
            ),
            ("plan() peak memory (traced)", f"{fig['plan_1m_peak_mib']:.0f} MiB", "≤ 2048 MiB"),
            ("simulate 10⁶ models × 144 cycles", f"{fig['simulate_1m_24h_s']:.1f} s", "≤ 120 s"),
            (
                "demand query 10⁶ models (bench/registry.py)",
                "run bench/registry.py"
                if fig["demand_query_1m_s"] is None
                else f"{fig['demand_query_1m_s']:.2f} s",
                "≤ 5 s",
            ),
            ("sim Jain vs shares: fleet / fifo", f"{fl.jain:.3f} / {ff.jain:.3f}", "fleet ≥ 0.95"),
            ("sim starved models: fleet / fifo", f"{fl.starved:,} / {ff.starved:,}", "fleet 0"),
            (
                "sim individual freshness p99: fleet / fifo",
                f"{fl.freshness_s['individual']['p99'] / 60:.0f} / {ff.freshness_s['individual']['p99'] / 60:.0f} min",
                "fleet < fifo",
            ),
            ("sim utilization: fleet", f"{100 * fl.utilization:.1f}%", "≥ 90%"),
        ],
    )


if __name__ == "__main__":
    main()
