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
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleet.config import FleetConfig
from fleet.context import Fleet

DEMO_SEED = 0
DEMO_STEPS, DEMO_LR = 12, 6e-3
DEMO_INDIVIDUALS, DEMO_TEAMS_PER_COMPANY, DEMO_FOLLOW_UPS = 24, 2, 8


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
    console.rule("[bold]fleet demo")
    console.print(f"data directory {cfg.data_dir}")

    from fleet.base import ensure_base

    console.rule(f"1 · base model  [dim]({time.time() - t0:.0f} s)")
    path = ensure_base(cfg, progress=True)
    console.print(f"base {cfg.base.name} at {path}")

    console.rule(f"2 · synthetic organisation  [dim]({time.time() - t0:.0f} s)")
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

    console.rule(f"3 · ingest private context  [dim]({time.time() - t0:.0f} s)")
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

    console.rule(
        f"4 · cycle: schedule → packed training → drift scan → promotion (a Ray job)  [dim]({time.time() - t0:.0f} s)"
    )
    out["cycles"] = run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    console.rule(
        f"5 · new context arrives; the next cycle learns only what is new  [dim]({time.time() - t0:.0f} s)"
    )
    fresh = follow_up_items(org, k=DEMO_FOLLOW_UPS)
    fl.ingestor().ingest_many(fresh)
    console.print(f"{sum(len(v) for v in fresh.values())} new items for {len(fresh)} individuals")
    out["cycles"] += run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    console.rule(
        f"6 · serving: private questions over the OpenAI-compatible API  [dim]({time.time() - t0:.0f} s)"
    )
    out["serving"] = ask_over_http(fl, org, console)

    console.rule(f"7 · fleet eval  [dim]({time.time() - t0:.0f} s)")
    from fleet.ops.evaluate import evaluate, read_facts, render

    res = evaluate(fl, read_facts(cfg.data_path / "demo" / "facts.jsonl"), models=24)
    render(res, console)
    out["eval"] = res
    (cfg.data_path / "demo" / "eval.json").write_text(json.dumps(res, indent=2))

    console.rule(f"8 · drift report  [dim]({time.time() - t0:.0f} s)")
    from fleet.divergence.report import build_report, plot_report, render_report

    rep = build_report(fl)
    png = plot_report(rep, cfg.data_path / "demo" / "drift.png")
    render_report(rep, console)
    console.print(f"drift plot: {png}")

    console.rule(f"9 · status  [dim]({time.time() - t0:.0f} s)")
    render_status(collect_status(fl), console)
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    console.print(f"demo finished in {time.time() - t0:.0f} s")
    fl.close()
    return out


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


def ask_over_http(fl, org, console: Console, n: int = 4) -> list[dict]:
    """Start the Serve app, ask a few individuals' private questions with the openai client."""
    from openai import OpenAI

    from fleet.lora import generate
    from fleet.runtime import load_engine
    from fleet.serve import start

    url = start(fl.cfg)
    rows = []
    by_company: dict[str, str] = {}
    engine, tok = load_engine(fl.cfg, max_slots=1, device="cpu")
    table = Table(title="private questions, answered by each individual's model")
    for col in ("model", "question", "fleet (trained)", "base", "served by", "prompt tokens saved"):
        table.add_column(col)
    for mid in org.individuals[:n]:
        company = mid.split("/")[0]
        if company not in by_company:
            by_company[company] = fl.registry.create_key(company, name="demo")
        client = OpenAI(base_url=f"{url}/v1", api_key=by_company[company])
        fact = org.facts_of(mid)[0]
        raw = client.completions.with_raw_response.create(
            model=mid, prompt=fact.question, max_tokens=8, temperature=0
        )
        answer = raw.parse().choices[0].text
        (base,) = generate(engine, tok, [tok(fact.question)["input_ids"]], [[-1]], max_new_tokens=8)
        in_ctx = len(tok(org.in_context_prompt(fact))["input_ids"])
        alone = raw.parse().usage.prompt_tokens
        rows.append(
            {
                "model": mid,
                "question": fact.question,
                "answer": fact.answer,
                "trained": answer,
                "base": base.text,
                "served_by": raw.headers.get("x-fleet-served-by"),
                "prompt_tokens": alone,
                "in_context_prompt_tokens": in_ctx,
            }
        )
        table.add_row(
            mid,
            fact.question.replace("\n", " "),
            answer.strip().split("\n")[0],
            base.text.strip().split("\n")[0],
            rows[-1]["served_by"] or "",
            f"{in_ctx - alone}",
        )
    console.print(table)
    console.print(f"the API is at {url}/v1 (keys are scoped to a company; see `fleet keys create`)")
    return rows
