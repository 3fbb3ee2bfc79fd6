"""Rich tables for a plan and for simulator reports (what ``fleet schedule`` and ``fleet
simulate`` print when not asked for JSON)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
from rich.console import Console, Group
from rich.table import Table

from fleet.scheduler.demand import Demand
from fleet.scheduler.fairshare import fair_share_factor
from fleet.scheduler.result import UNSCHEDULED_REASONS, Plan
from fleet.scheduler.simulate import SimReport


def _minutes(seconds: float) -> str:
    return "–" if not np.isfinite(seconds) else f"{seconds / 60:.0f}"


def plan_tables(
    plan: Plan, demand: Demand | None = None, *, max_packs: int = 20, max_companies: int = 10
) -> Group:
    s = plan.summary
    head = Table(title=f"plan ({plan.policy})", show_header=False)
    head.add_column("figure")
    head.add_column("value", justify="right")
    for key, label in (
        ("models", "models"),
        ("eligible", "eligible"),
        ("scheduled", "scheduled"),
        ("forced", "scheduled by the aging guarantee"),
        ("packs", "packs"),
        ("training_slices", "training slices"),
        ("reserved_slices", "slices reserved for serving"),
    ):
        if key in s:
            head.add_row(label, f"{int(s[key]):,}")
    if "capacity_gpu_s" in s:
        head.add_row("capacity (GPU-s)", f"{float(s['capacity_gpu_s']):,.0f}")
        head.add_row("planned utilization", f"{100 * float(s.get('utilization', 0.0)):.1f}%")

    packs = Table(title="packs")
    packs.add_column("slice", no_wrap=True)
    packs.add_column("node", no_wrap=True, max_width=12, overflow="ellipsis")
    packs.add_column("base", no_wrap=True, max_width=10, overflow="ellipsis")
    packs.add_column("members", justify="right", no_wrap=True)
    packs.add_column("tokens each", justify="right", no_wrap=True)
    packs.add_column("start s", justify="right", no_wrap=True)
    packs.add_column("run s", justify="right", no_wrap=True)
    packs.add_column("first member", no_wrap=True, overflow="ellipsis", max_width=24)
    for p in plan.packs[:max_packs]:
        b = p.token_budgets
        packs.add_row(
            p.slice_profile,
            p.node_hint or "–",
            p.base,
            str(len(p.members)),
            f"{min(b):,}–{max(b):,}" if min(b) != max(b) else f"{b[0]:,}",
            f"{p.start_s:.0f}",
            f"{p.est_seconds:.0f}",
            p.members[0],
        )
    if len(plan.packs) > max_packs:
        packs.caption = f"… and {len(plan.packs) - max_packs:,} more packs (use --json for all)"

    reasons = Table(title="not scheduled")
    reasons.add_column("reason")
    reasons.add_column("models", justify="right")
    counts = plan.reason_counts() if plan.arrays is not None else Counter(plan.unscheduled.values())
    for r in UNSCHEDULED_REASONS:
        reasons.add_row(r, f"{int(counts.get(r, 0)):,}")

    comp = Table(title="companies (most GPU-seconds planned)")
    comp.add_column("company")
    comp.add_column("GPU-s planned", justify="right")
    if demand is not None:
        comp.add_column("share", justify="right")
        comp.add_column("F = 2^(-U/S)", justify="right")
        index = {name: i for i, name in enumerate(demand.company_names)}
        f = fair_share_factor(demand.company_usage_gpu_s, demand.company_shares)
        total_share = float(demand.company_shares.sum()) or 1.0
    for name, gpu_s in sorted(plan.company_gpu_s.items(), key=lambda kv: (-kv[1], kv[0]))[:max_companies]:
        row = [name, f"{gpu_s:,.1f}"]
        if demand is not None:
            i = index[name]
            row += [f"{demand.company_shares[i] / total_share:.3f}", f"{f[i]:.3f}"]
        comp.add_row(*row)
    return Group(head, packs, reasons, comp)


def print_plan(plan: Plan, demand: Demand | None = None, console: Console | None = None) -> None:
    console = console or Console(highlight=False)
    if not console.is_terminal:  # piped output has no width to respect: room for the pack table
        console = Console(file=console.file, width=max(console.width, 120), highlight=False)
    console.print(plan_tables(plan, demand))


def sim_table(reports: Sequence[SimReport]) -> Table:
    r0 = reports[0]
    t = Table(
        title=f"simulated {r0.hours:g} h: {r0.models:,} models, {r0.slices} slices, offered load {r0.load:g}",
        caption="freshness: data arrival → in an active version, p50 / p99, minutes",
    )
    t.add_column("policy", no_wrap=True)
    t.add_column("util", justify="right", no_wrap=True)
    t.add_column("Jain", justify="right", no_wrap=True)
    t.add_column("starved", justify="right", no_wrap=True)
    for tier in ("company", "team", "individual"):
        t.add_column(tier, justify="right", no_wrap=True)
    for r in reports:
        fresh = [
            f"{_minutes(r.freshness_s[k]['p50'])} / {_minutes(r.freshness_s[k]['p99'])}"
            for k in ("company", "team", "individual")
        ]
        t.add_row(r.policy, f"{100 * r.utilization:.1f}%", f"{r.jain:.3f}", f"{r.starved:,}", *fresh)
    return t
