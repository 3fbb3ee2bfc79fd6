"""``fleet demo`` (what ``make demo`` runs): the whole system on embedded defaults.

build the base → a synthetic organisation (companies, teams, individuals, each with
private facts only it has) → ingest → cycle 1 (schedule, packed training, drift scan,
promotion) as a Ray job → new context arrives → cycle 2 (continual learning) → serve the
fleet locally and ask individuals' private questions over the OpenAI-compatible API,
beside the base's answers → ``fleet eval`` → drift report → clean shutdown.

Re-running it is safe: existing tenants are kept, ingestion skips what is stored, and the
cycles train whatever is pending.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleet.config import FleetConfig
from fleet.context import Fleet

DEMO_SEED = 0
DEMO_STEPS, DEMO_LR = 12, 6e-3
DEMO_INDIVIDUALS, DEMO_TEAMS_PER_COMPANY, DEMO_FOLLOW_UPS = 24, 2, 8
DEMO_KEY_NAME = "fleet-demo"  # the API keys `fleet demo` makes for itself (and revokes)


def demo_config(cfg: FleetConfig) -> FleetConfig:
    """The demo's settings on top of the operator's: a short cycle on this machine's CPUs."""
    cfg = cfg.model_copy(deep=True)
    if not cfg.scheduler.inventory:
        import os

        from fleet.config import SliceSpec

        # One slice with every core: on a small machine one pack at a time on all its threads beats
        # packs side by side that contend for the cores and each pay Ray Train's start-up.
        cfg.scheduler.inventory = [SliceSpec(profile="cpu", count=1)]
        cfg.train.cpus_per_worker = float(max(1, os.cpu_count() or 1))
        cfg.scheduler.reserve_serving_fraction = 0.0
    cfg.train.rows_per_member = 3  # measured: the same recall as 4 rows, a quarter less work
    for tier in cfg.tiers.values():
        tier.min_interval_s = 0.0  # the demo's second cycle follows the first at once
        # Half the tier's steps at twice the rate: the demo's two cycles fit in minutes on two CPUs.
        tier.schedule = tier.schedule.model_copy(
            update={"steps": DEMO_STEPS, "lr": DEMO_LR, "warmup_steps": min(tier.schedule.warmup_steps, 2)}
        )
    return cfg


def run_demo(
    cfg: FleetConfig, *, individuals: int = DEMO_INDIVIDUALS, quick: bool = False, console: Console
) -> dict:
    t0 = time.time()
    cfg = demo_config(cfg)
    fl = Fleet(cfg)
    out: dict = {}
    console.rule(Text("fleet demo", style="bold"))
    console.print(f"data directory {cfg.data_dir}")

    from fleet.base import ensure_base

    _rule(console, "1 · base model", t0)
    path = ensure_base(cfg, progress=True)
    console.print(f"base {cfg.base.name} at {path}")

    _rule(console, "2 · synthetic organisation", t0)
    from fleet.data.synth import synthetic_org

    org = synthetic_org(
        companies=3, teams_per_company=DEMO_TEAMS_PER_COMPANY, individuals=individuals, seed=DEMO_SEED
    )
    existing = {m.id for m in fl.registry.list_models()}
    new = [t for t in org.tenants if t.id not in existing]
    for t in sorted(new, key=lambda t: t.id.count("/")):
        fl.add_tenant(t.id, shares=float(t.shares))
    console.print(
        f"{len(org.companies)} companies, {len(org.teams)} teams, {len(org.individuals)} individuals "
        f"({len(new)} new), {len(org.facts)} private facts"
    )
    write_demo_facts(fl, org)

    _rule(console, "3 · ingest private context", t0)
    reports = fl.ingestor().ingest_many(
        {mid: [i.to_json() for i in org.items_of(mid)] for mid in org.model_ids}
    )
    promoted = sum(c.inserted for c in reports[-1].promoted) if reports else 0
    console.print(
        f"{sum(r.inserted for r in reports)} items ingested ({sum(r.tokens for r in reports):,} tokens), "
        f"{sum(r.duplicates for r in reports)} duplicates skipped, {promoted} repeated queries promoted to parents"
    )
    from fleet.status import collect_status, render_status

    render_status(collect_status(fl, serving=False), console)
    if quick:
        console.print(f"demo (quick) finished in {time.time() - t0:.0f} s")
        fl.close()
        return out

    from fleet.ops.control import run_loop

    _rule(console, "4 · cycle: schedule → packed training → drift scan → promotion (a Ray job)", t0)
    out["cycles"] = run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    _rule(console, "5 · new context arrives; the next cycle learns only what is new", t0)
    fresh = follow_up_items(org, k=DEMO_FOLLOW_UPS)
    fl.ingestor().ingest_many(fresh)
    console.print(f"{sum(len(v) for v in fresh.values())} new items for {len(fresh)} individuals")
    out["cycles"] += run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    _rule(console, "6 · serving: private questions over the OpenAI-compatible API", t0)
    out["serving"] = ask_over_http(fl, org, console)

    _rule(console, "7 · fleet eval", t0)
    from fleet.ops.evaluate import evaluate, read_facts, render

    res = evaluate(fl, read_facts(cfg.data_path / "demo" / "facts.jsonl"), models=24)
    render(res, console)
    out["eval"] = res
    (cfg.data_path / "demo" / "eval.json").write_text(json.dumps(res, indent=2))

    _rule(console, "8 · drift report", t0)
    from fleet.divergence.report import build_report, plot_report, render_report

    rep = build_report(fl)
    png = plot_report(rep, cfg.data_path / "demo" / "drift.png")
    render_report(rep, console)
    console.print(f"drift plot: {png}")

    _rule(console, "9 · status", t0)
    render_status(collect_status(fl), console)
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    console.print(f"demo finished in {time.time() - t0:.0f} s")
    fl.close()
    return out


def _rule(console: Console, title: str, t0: float) -> None:
    console.rule(Text.assemble(title, (f"  ({time.time() - t0:.0f} s)", "dim")))


def write_demo_facts(fl, org) -> Path:
    """The organisation's facts as ``fleet eval`` reads them (model, question, answer, source)."""
    from fleet.ops.evaluate import FactCase, write_facts

    path = fl.cfg.data_path / "demo" / "facts.jsonl"
    write_facts(
        path, [FactCase(f.owner, f.question, f.answer, org.source_document(f.owner)) for f in org.facts]
    )
    return path


def follow_up_items(org, *, k: int) -> dict[str, list[dict]]:
    """A note that arrives later for ``k`` individuals: a reminder of one of their facts, reworded."""
    out = {}
    for mid in org.individuals[:k]:
        f = org.facts_of(mid)[0]
        out[mid] = [{"kind": "feedback", "text": f"Update, still true today: {f.statement}"}]
    return out


@contextmanager
def demo_keys(registry, companies: Iterable[str]) -> Iterator[dict[str, str]]:
    """API keys for the demo's own requests, one per company, revoked when the demo is done with
    them; demo keys an earlier run could not revoke (it was killed) are revoked first. Keys of
    other names are never touched."""
    for k in registry.list_keys():
        if k["name"] == DEMO_KEY_NAME and not k["revoked_at"]:
            registry.revoke_key(k["prefix"])
    keys: dict[str, str] = {}
    try:
        for company in sorted(set(companies)):
            keys[company] = registry.create_key(company, name=DEMO_KEY_NAME)
        yield keys
    finally:
        for key in keys.values():
            registry.revoke_key(key.split("_")[1])


def ask_over_http(fl, org, console: Console, n: int = 4) -> list[dict]:
    """Start the Serve app, ask a few individuals' private questions with the openai client."""
    from openai import OpenAI

    from fleet.runtime import load_engine
    from fleet.serve import start

    url = start(fl.cfg)
    engine, tok = load_engine(fl.cfg, max_slots=1, device="cpu")
    table = Table(title="private questions, answered by each individual's model")
    for col in ("model", "question", "fleet (trained)", "base", "served by", "prompt tokens saved"):
        table.add_column(col)
    asked = org.individuals[:n]
    with demo_keys(fl.registry, [mid.split("/")[0] for mid in asked]) as keys:
        rows = [
            _ask(OpenAI(base_url=f"{url}/v1", api_key=keys[mid.split("/")[0]]), engine, tok, org, mid)
            for mid in asked
        ]
    for r in rows:
        table.add_row(
            r["model"],
            r["question"].replace("\n", " "),
            r["trained"].strip().split("\n")[0],
            r["base"].strip().split("\n")[0],
            r["served_by"] or "",
            f"{r['in_context_prompt_tokens'] - r['prompt_tokens']}",
        )
    console.print(table)
    console.print(f"the API is at {url}/v1 (keys are scoped to a company; see `fleet keys create`)")
    return rows


def _ask(client, engine, tok, org, mid: str) -> dict:
    """One individual's private question over the API, beside the base's answer."""
    from fleet.lora import generate

    fact = org.facts_of(mid)[0]
    raw = client.completions.with_raw_response.create(
        model=mid, prompt=fact.question, max_tokens=8, temperature=0
    )
    (base,) = generate(engine, tok, [tok(fact.question)["input_ids"]], [[-1]], max_new_tokens=8)
    return {
        "model": mid,
        "question": fact.question,
        "answer": fact.answer,
        "trained": raw.parse().choices[0].text,
        "base": base.text,
        "served_by": raw.headers.get("x-fleet-served-by"),
        "prompt_tokens": raw.parse().usage.prompt_tokens,
        "in_context_prompt_tokens": len(tok(org.in_context_prompt(fact))["input_ids"]),
    }
