"""Learning value: recall from held-out questions alone, against honest baselines, without forgetting.

For each base (the real SmolLM2-135M-Instruct, and the tiny base as a second table) a fresh fleet
gets the casebook organisation (``fleet.data.casebook``: companies × teams × individuals, facts of
every level, repeated-query, two-hop and updated facts, personal answers), ingests it, runs a
cycle (scheduling, packed training with the base's own augmentation, drift gate, promotion) as a
cycle (as ``fleet cycle`` runs it), ingests the later documents (updates), runs a second cycle, and ``fleet eval`` asks every
fact's held-out question forms through each member's stack, beside the base alone, the base with
the oracle source, BM25 top-1/3/5 over the member's visible context and the whole visible context.

Figures (``bench/results/learning.json``; the top-level keys are the real base's where it ran):
``recall_heldout``, ``recall_bm25_top3``, ``recall_full_context``, ``token_ratio_vs_full_context``,
``token_ratio_vs_bm25_top3``, ``general_dnll_nats``, ``general_answers_kept``, ``leak_rate``,
``leak_trials``, ``kv_bytes_vs_adapter_bytes``, ``wall_s``, and per base ``bases.<base>``, with
recall per level and per kind.

On two cores SmolLM2 trains at 30-50 tokens/s: the default real-base organisation is one company,
one team of four (the demo's); ``--companies 3 --teams 2 --individuals 4`` is the full 24-person
organisation (hours on two cores, minutes on a GPU).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, table, write_results  # noqa: E402

KEYS = (
    "recall_heldout",
    "recall_bm25_top3",
    "recall_full_context",
    "token_ratio_vs_full_context",
    "token_ratio_vs_bm25_top3",
    "general_dnll_nats",
    "general_answers_kept",
    "leak_rate",
    "leak_trials",
    "leak_upper95",
    "kv_bytes_vs_adapter_bytes",
    "base_general_nll",
    "general_kl_nats",
    "general_base_correct",
    "general_lost",
)


def run_base(
    base: str, data: Path, companies: int, teams: int, individuals: int, eval_only: bool = False
) -> dict:
    from fleet.config import load_config
    from fleet.demo import demo_config, real_world, write_demo_facts
    from fleet.handles import Fleet
    from fleet.ops.evaluate import evaluate, read_facts, render

    cfg = demo_config(load_config(overrides={"data_dir": str(data)}, env={}), base)
    t0 = time.perf_counter()
    if eval_only:
        pass  # the data directory of an earlier run: measure again what it trained
    elif base == "tiny":
        from fleet.base import ensure_base

        ensure_base(cfg, progress=True)
    else:
        from fleet.base.importing import import_base

        import_base("smollm2", Path(cfg.base.path), progress=True)
    fl = Fleet(cfg)
    world = real_world(companies, teams, individuals)
    facts_path = write_demo_facts(fl, world.facts)
    console.print(f"[bold]{base}[/bold]: {world.summary}")
    if not eval_only:
        train(fl, world)
    train_s = time.perf_counter() - t0
    res = evaluate(fl, read_facts(facts_path), progress=console.print)

    render(res, console)
    cycles = fl.registry.list_cycles(limit=100)
    wall = time.perf_counter() - t0
    import ray

    if ray.is_initialized():
        ray.shutdown()
    fl.close()
    trained = res["methods"]["trained"]
    return {
        **{k: res[k] for k in KEYS},
        "models": res["models"],
        "facts": res["facts"],
        "questions": res["questions"],
        "individuals": sum(1 for t, _ in world.tenants if t.count("/") == 2),
        "companies": companies,
        "recall_ci95": trained["ci95"],
        "recall_by_level": {g: round(m["rate"], 4) for g, m in trained["by_level"].items()},
        "recall_by_kind": {g: round(m["rate"], 4) for g, m in trained["by_kind"].items()},
        "methods": {
            n: {"rate": m["rate"], "ci95": m["ci95"], "prompt_tokens": round(m["prompt_tokens"], 1)}
            for n, m in res["methods"].items()
        },
        "leakage": res["leakage"],
        "cycles_trained": sum(1 for c in cycles if c["status"] == "succeeded"),
        "train_s": None if eval_only else round(train_s, 1),
        "eval_s": round(wall - train_s, 1),
        "wall_s": round(wall, 1),
    }


def train(fl, world) -> None:
    """The organisation's tenants and items, then two cycles as `fleet cycle` runs them here (plan,
    packed training, drift gate, publication, scan: the path of `fleet run`'s jobs, without a job
    per cycle), the later documents (updates) ingested between them."""
    from fleet.ops.cycle import cycle_once

    for t, shares in sorted(world.tenants, key=lambda t: t[0].count("/")):
        fl.add_tenant(t, shares=shares)
    fl.ingestor().ingest_many(world.items)
    cycle_once(fl, console=console)
    fl.ingestor().ingest_many(world.later)
    cycle_once(fl, console=console)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", choices=("tiny", "smollm2", "both"), default="both")
    ap.add_argument("--companies", type=int, help="companies (default: 3 tiny, 1 smollm2)")
    ap.add_argument("--teams", type=int, help="teams per company (default: 2 tiny, 1 smollm2)")
    ap.add_argument("--individuals", type=int, default=4, help="individuals per team (at least 4)")
    ap.add_argument("--data-dir", help="data directory (default: a fresh temporary one)")
    ap.add_argument("--eval-only", action="store_true", help="measure again what --data-dir's run trained")
    args = ap.parse_args()

    root = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="fleet-learning-"))
    figures: dict = {}
    bases = ("tiny", "smollm2") if args.base == "both" else (args.base,)
    for base in bases:
        full = base == "tiny"
        companies = args.companies or (3 if full else 1)
        teams = args.teams or (2 if full else 1)
        out = run_base(base, root / base, companies, teams, args.individuals, eval_only=args.eval_only)
        figures.setdefault("bases", {})[base] = out
        targets = base == "smollm2"
        table(
            f"learning value on the {base} base: {out['individuals']} individuals over {companies} "
            f"companies, {out['facts']} facts, {out['questions']} held-out questions",
            [
                ("recall, held-out questions alone", f"{out['recall_heldout']:.3f}", "≥ 0.90" if targets else ""),
                ("recall, base + BM25 top-3", f"{out['recall_bm25_top3']:.3f}", "≤ trained" if targets else ""),
                (
                    "recall, base + whole visible context",
                    "does not fit" if out["recall_full_context"] is None else f"{out['recall_full_context']:.3f}",
                    "",
                ),
                ("prompt tokens, whole context ÷ trained", f"{out['token_ratio_vs_full_context']:.1f}×", "≥ 50×" if targets else ""),
                ("prompt tokens, BM25 top-3 ÷ trained", f"{out['token_ratio_vs_bm25_top3']:.1f}×", ""),
                ("ΔNLL on general text, nats/token", f"{out['general_dnll_nats']:+.4f}", "≤ 0.05" if targets else ""),
                ("base's correct general answers kept", f"{out['general_answers_kept']:.1%}", "≥ 95%" if targets else ""),
                (
                    "leak rate (95% upper bound)",
                    f"{out['leak_rate']:.3f} of {out['leak_trials']} (≤ {out['leak_upper95']:.3f})",
                    "0",
                ),
                ("KV cache of visible context ÷ adapter bytes", f"{out['kv_bytes_vs_adapter_bytes']:.2f}×", ""),
                *[(f"recall, {g} facts", f"{r:.3f}", "") for g, r in out["recall_by_level"].items()],
                *[(f"recall, {g}", f"{r:.3f}", "") for g, r in out["recall_by_kind"].items()],
                ("wall time (import/build, 2 cycles, eval)", f"{out['wall_s']:.0f} s", ""),
            ],
        )  # fmt: skip
    # Each base's figures as measured: a run of one base keeps the other's from an earlier run.
    import json

    from _common import RESULTS

    earlier = RESULTS / "learning.json"
    if earlier.exists():
        figures["bases"] = {**json.loads(earlier.read_text()).get("bases", {}), **figures["bases"]}
    headline = figures["bases"].get("smollm2") or figures["bases"][bases[0]]
    figures.update({k: headline[k] for k in (*KEYS, "wall_s")})
    figures["headline_base"] = "smollm2" if "smollm2" in figures["bases"] else bases[0]
    console.print(f"wrote {write_results('learning', figures)}")


if __name__ == "__main__":
    main()
