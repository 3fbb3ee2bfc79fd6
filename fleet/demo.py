"""``fleet demo`` (what ``make demo`` runs): the whole system on embedded defaults.

Steps: build the tiny offline base if it is missing → a synthetic organisation (companies,
teams, individuals, each with private facts only it has) → tenants and models → ingestion of
every model's documents and conversations → the fleet's status. Re-running it is safe:
existing tenants are kept and ingestion skips what is already stored.
"""

from __future__ import annotations

import time

from rich.console import Console

from fleet.config import FleetConfig
from fleet.context import Fleet


def run_demo(cfg: FleetConfig, *, individuals: int = 100, quick: bool = False, console: Console) -> dict:
    t0 = time.time()
    fl = Fleet(cfg)
    out: dict = {}
    console.rule("[bold]fleet demo")
    console.print(f"data directory {cfg.data_dir}")

    from fleet.base import ensure_base

    console.rule("1 · base model")
    path = ensure_base(cfg, progress=True)
    console.print(f"base {cfg.base.name} at {path}")

    console.rule("2 · synthetic organisation")
    from fleet.data.synth import synthetic_org

    org = synthetic_org(companies=3, teams_per_company=4, individuals=individuals, seed=0)
    existing = {m.id for m in fl.registry.list_models()}
    todo = [t for t in org.tenants if t.id not in existing]
    if todo:
        by_level: dict[int, list] = {}
        for t in todo:
            by_level.setdefault(t.id.count("/"), []).append(t)
        for _, tenants in sorted(by_level.items()):
            for t in tenants:
                fl.add_tenant(t.id, shares=float(t.shares))
    console.print(
        f"{len(org.companies)} companies, {len(org.teams)} teams, {len(org.individuals)} individuals "
        f"({len(todo)} new), {len(org.facts)} private facts"
    )

    console.rule("3 · ingest private context")
    ingestor = fl.ingestor()
    batches = {mid: [i.to_json() for i in org.items_of(mid)] for mid in org.model_ids}
    reports = ingestor.ingest_many(batches)
    inserted = sum(r.inserted for r in reports)
    dup = sum(r.duplicates for r in reports)
    promoted = sum(c.inserted for r in reports[:1] for c in r.promoted)
    console.print(
        f"{inserted} items ingested, {dup} duplicates skipped, {promoted} repeated queries promoted to parents"
    )
    out["ingested_items"] = inserted

    from fleet.status import collect_status, render_status

    console.rule("4 · fleet status")
    render_status(collect_status(fl), console)
    console.print(f"demo finished in {time.time() - t0:.0f} s")
    fl.close()
    return out
