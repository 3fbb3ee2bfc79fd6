"""``fleet status``: what operators look at first."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from fleet.types import TIERS


def collect_status(fl) -> dict[str, Any]:
    reg = fl.registry
    summary = reg.summary()
    out: dict[str, Any] = {
        "registry": reg.url,
        "store": fl.store.uri,
        "base_model": fl.base_name,
        "tiers": summary["tiers"],
        "versions": summary["versions"],
        "schedules": {t: _schedule(reg, t) for t in TIERS},
        "cycles": [
            {
                "id": c["id"],
                "status": c["status"],
                "duration_s": (c["finished_at"] - c["started_at"]) if c["finished_at"] else None,
                **{k: c["summary"].get(k) for k in ("packs", "trained", "published", "rejected", "rolled_back")},
            }
            for c in reg.list_cycles(limit=5)
        ],
    }
    return out


def _schedule(reg, tier: str) -> dict[str, Any] | None:
    s = reg.tier_schedule(tier)
    return {"version": s["version"], "params": s["params"], "source": s["source"]} if s else None


def render_status(st: dict[str, Any], console: Console) -> None:
    table = Table(title="fleet models", caption=f"registry {st['registry']} · store {st['store']}")
    for col in ("tier", "models", "with active version", "frozen", "items", "tokens", "pending tokens"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    totals = [0] * 6
    for tier in TIERS:
        t = st["tiers"][tier]
        vals = [t["models"], t["active"], t["frozen"], t["items"], t["tokens"], t["pending_tokens"]]
        totals = [a + b for a, b in zip(totals, vals, strict=True)]
        table.add_row(tier, *(f"{v:,}" for v in vals))
    table.add_row("all", *(f"{v:,}" for v in totals), style="bold")
    console.print(table)
    v = st["versions"]
    console.print(
        "versions: "
        + ", ".join(f"{k} {v.get(k, 0):,}" for k in ("active", "candidate", "retired", "rejected"))
    )
    sched = [f"{t} v{s['version']}" for t, s in st["schedules"].items() if s]
    if sched:
        console.print("learning schedules from sweeps: " + ", ".join(sched))
    if st["cycles"]:
        ct = Table(title="recent cycles")
        for col in ("cycle", "status", "duration", "packs", "trained", "published", "rejected", "rolled back"):
            ct.add_column(col, justify="right")
        for c in st["cycles"]:
            d = f"{c['duration_s']:.0f}s" if c["duration_s"] is not None else "-"
            ct.add_row(
                str(c["id"]), c["status"], d,
                *(str(c.get(k) if c.get(k) is not None else "-") for k in ("packs", "trained", "published", "rejected", "rolled_back")),
            )
        console.print(ct)
