"""Benchmark: the serving app under load, over 500 models, against the same load on the bare base.

A tiny Llama (vocab 264, hidden 256, 4 layers) with rank-8 adapters on all seven projections is
served by the real application (FastAPI ingress + model deployment on local Ray Serve). 64
clients in this process stream completions over HTTP on 127.0.0.1 (greedy, 32 new tokens), each
picking its model with Zipf popularity (s = 1) over 500 models: 10 companies, 40 teams, 450
individuals, every one with its own adapter, so most requests run a 3-level stack and the
adapter cache (256 slots) sees misses in the tail. The baseline is the same load over a mirror
organisation whose models have no adapter (every request answered by the base), through the same
app, in alternating rounds in the same process. Then the model deployment gets 2 replicas and one
is killed (``ray.kill``) a third of the way through a run: errors must stay at 1% or less and the
service must recover (Serve restarts the replica).

Served ÷ engine: in the same run, between the served windows, the engine alone (this process,
one thread, as the replica runs it) decodes the same kind of traffic: the same Zipf draw of
models and prompts, 64 requests in flight, each joining as another leaves, 32 tokens each. That
is the engine's own speed for the batch composition the service saw; ``served_vs_engine_ratio``
is what the service delivers of it.

The abuse run: a well-behaved company (8 clients, 32-token streams) is timed alone, then while
an abusive company, from a separate process at nice 19 (its own client work stands for other
machines), sends 64 MiB bodies, keeps 300 scoring requests (echo + logprobs over ~200-token
prompts) and 64 long streams (256 tokens) in flight, and floods the API with well-formed
unknown keys. Refused requests are retried after their ``Retry-After`` (up to 60 s), as the
official clients do. A prober times ``/healthz`` every 50 ms throughout.

Run: ``.venv/bin/python bench/serve.py`` (the recorded figures; about 10 minutes), or
``--duration 10`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray starts its workers at nice 15 by default; the engine alone and the clients run at nice 0.
# On a machine shared with other work that would hand the service a fraction of the CPU its
# engine gets alone: the service's processes run at normal priority here (as `fleet serve` does).
os.environ.setdefault("RAY_worker_niceness", "0")

from _abuse import run_abuser  # noqa: E402
from _common import console, percentile, table, write_results  # noqa: E402
from _load import EngineAlone, Load, free_port, run_load  # noqa: E402
from _tiny import tiny_llama  # noqa: E402

from fleet.base.tokenizer import build_tokenizer  # noqa: E402
from fleet.config import FleetConfig, load_config  # noqa: E402
from fleet.handles import Fleet  # noqa: E402
from fleet.serve.sample import publish_random  # noqa: E402

COMPANIES, TEAMS_PER_COMPANY = 10, 4


def org(prefix: str, n_models: int) -> list[str]:
    """Companies, then teams, then individuals spread over the teams: n_models ids in all."""
    companies = [f"{prefix}{c}" for c in range(COMPANIES)]
    teams = [f"{c}/t{t}" for c in companies for t in range(TEAMS_PER_COMPANY)]
    people = [f"{teams[i % len(teams)]}/p{i}" for i in range(n_models - len(companies) - len(teams))]
    return companies + teams + people


def setup(tmp: Path, n_models: int) -> tuple[FleetConfig, list[str], list[str], dict[str, str]]:
    cfg = load_config(
        overrides={
            "data_dir": str(tmp / "data"),
            # 512 slots hold every adapter: the service and the engine alone see the same resident set.
            "serve": {
                "port": free_port(),
                "rate_limit_rps": 100_000.0,
                "rate_limit_burst": 100_000,
                "adapter_slots": 512,
            },
        },
        env={},
    )
    base = tiny_llama(vocab=264, hidden=256, layers=4, heads=4, intermediate=688, max_positions=512)
    cfg.base_path.mkdir(parents=True)
    base.save_pretrained(cfg.base_path)
    build_tokenizer().save_pretrained(cfg.base_path)
    fl = Fleet(cfg)
    adapted, plain = org("co", n_models), org("base", n_models)
    for tree in (adapted, plain):
        by_depth: dict[int, list] = {}
        for m in tree:
            by_depth.setdefault(m.count("/"), []).append((m, 1.0))
        for depth in sorted(by_depth):
            fl.registry.add_tenants(
                by_depth[depth], base_model=cfg.base.name, rank=cfg.lora.rank, alpha=cfg.lora.alpha
            )
    publish_random(
        fl.registry, fl.store, base, adapted, base_model=cfg.base.name, rank=cfg.lora.rank,
        alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
    )  # fmt: skip
    companies = [m for m in adapted + plain if "/" not in m]
    keys = {c: fl.registry.create_key(c) for c in companies}
    fl.close()
    return cfg, adapted, plain, keys


def serve_processes() -> dict[str, int]:
    """PIDs of this cluster's Serve processes: the model replica, the ingress, the HTTP proxy."""
    import ray

    kinds = {"FleetModel": "replica", "FleetIngress": "ingress", "SERVE_PROXY_ACTOR": "proxy"}
    out = {}
    for a in ray.util.list_named_actors(all_namespaces=True):
        kind = next((v for k, v in kinds.items() if k in a["name"]), None)
        if kind is not None:
            actor = ray.get_actor(a["name"], namespace=a["namespace"])
            out[kind] = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def abuse_run(url: str, cfg: FleetConfig, adapted: list[str], keys: dict[str, str], seconds: float) -> dict:
    """A well-behaved company timed alone, then while another abuses the service; /healthz probed throughout."""
    victim = [m for m in adapted if m.split("/")[0] == "co0"]
    abuser = [m for m in adapted if m.split("/")[0] == "co1"]
    health: list[float] = []
    stop = threading.Event()

    def prober() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    http.get("/healthz").raise_for_status()
                    health.append(time.perf_counter() - t0)
                except httpx.HTTPError:
                    health.append(float("inf"))
                stop.wait(0.05)

    def victim_load(secs: float, seed: int) -> Load:
        return asyncio.run(
            run_load(url, victim, lambda m: keys["co0"], clients=8, seconds=secs, max_tokens=32, seed=seed)
        )

    victim_load(min(5.0, seconds / 4), seed=50)  # warm its adapters
    probe = threading.Thread(target=prober, daemon=True)
    probe.start()
    alone = victim_load(seconds, seed=51)
    health_alone = list(health)
    health.clear()
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ramp = 5.0
    proc = ctx.Process(
        target=run_abuser, args=(url, keys["co1"], abuser, cfg.serve.max_new_tokens, ramp + seconds + 5, out)
    )
    proc.start()
    assert out.get(timeout=300) == "started"
    time.sleep(ramp)  # the abuser's streams and scoring requests fill up
    health.clear()
    attacked = victim_load(seconds, seed=51)
    health_attacked = list(health)
    seen = out.get(timeout=300)
    proc.join(timeout=60)
    stop.set()
    probe.join(timeout=5)
    return {
        "victim_p99_alone_ms": percentile(alone.latencies, 99) * 1000,
        "victim_p99_under_abuse_ms": percentile(attacked.latencies, 99) * 1000,
        "victim_p50_alone_ms": percentile(alone.latencies, 50) * 1000,
        "victim_p50_under_abuse_ms": percentile(attacked.latencies, 50) * 1000,
        "victim_p99_ratio_under_abuse": percentile(attacked.latencies, 99) / percentile(alone.latencies, 99),
        "victim_errors": sum(attacked.errors.values()),
        "victim_requests_alone": alone.requests,
        "victim_requests_under_abuse": attacked.requests,
        "victim_tokens_per_s_alone": alone.tokens_per_s,
        "victim_tokens_per_s_under_abuse": attacked.tokens_per_s,
        "healthz_p99_ms_alone": percentile(health_alone, 99) * 1000,
        "healthz_p99_ms_under_abuse": percentile(health_attacked, 99) * 1000,
        "abuser_answers": seen,
    }


def model_replicas() -> list:
    import ray

    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if "FleetModel" in a["name"]]
    return [ray.get_actor(a["name"], namespace=a["namespace"]) for a in names]


def running_model_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get("fleet")
    if app is None or "FleetModel" not in app.deployments:
        return 0
    return int(app.deployments["FleetModel"].replica_states.get("RUNNING", 0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per condition (default 60)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--models", type=int, default=500)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2, help="alternating fleet/base windows per condition")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/results/serve.json")
    args = ap.parse_args()

    import ray
    from ray import serve

    from fleet.serve.app import build, start

    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-serve-"))
    console.print(f"building the base and {args.models} adapted + {args.models} plain models in {tmp}")
    cfg, adapted, plain, keys = setup(tmp, args.models)
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    url = start(cfg)
    console.print(f"serving at {url}")

    def load(models: list[str], seconds: float, seed: int) -> Load:
        return asyncio.run(
            run_load(
                url,
                models,
                lambda m: keys[m.split("/")[0]],
                clients=args.clients,
                seconds=seconds,
                max_tokens=args.max_tokens,
                seed=seed,
            )
        )

    # Warm both paths (imports, first loads, the popular adapters) before measuring.
    load(adapted, min(10.0, args.duration / 3), seed=99)
    load(plain, min(5.0, args.duration / 6), seed=98)
    alone = EngineAlone(cfg, adapted)
    fleet, base = Load(), Load()
    offline: list[float] = []
    alone_cpu, alone_tokens = 0.0, 0.0
    window = args.duration / args.rounds
    handle = serve.get_deployment_handle("FleetModel", cfg.serve.app_name)
    busy = 0.0
    pids = serve_processes()
    cpu = {k: 0.0 for k in ("engine", "replica", "ingress", "proxy", "clients")}
    for r in range(args.rounds):
        st0 = handle.stats.remote().result()
        proc0 = {k: cpu_seconds(pid) for k, pid in pids.items()}
        mine0 = time.process_time()
        fleet.add(load(adapted, window, seed=r))
        st1 = handle.stats.remote().result()
        busy += st1["engine_s"] - st0["engine_s"]
        cpu["engine"] += st1["engine_cpu_s"] - st0["engine_cpu_s"]
        for k, pid in pids.items():
            cpu[k] += cpu_seconds(pid) - proc0[k]
        cpu["clients"] += time.process_time() - mine0
        base.add(load(plain, window, seed=r))
        cpu0 = time.process_time()
        offline.append(
            alone.tokens_per_s(rows=args.clients, seconds=window / 2, max_tokens=args.max_tokens, seed=r)
        )
        alone_cpu += time.process_time() - cpu0
        alone_tokens += offline[-1] * window / 2
        console.print(
            f"round {r + 1}: fleet {fleet.tokens_per_s:.0f} tok/s, base {base.tokens_per_s:.0f} tok/s, "
            f"engine alone {offline[-1]:.0f} tok/s"
        )
    stats = handle.stats.remote().result()
    console.print(
        f"replica: submit→first token p50 {stats['first_token_p50_s'] * 1000:.0f} ms, "
        f"p99 {stats['first_token_p99_s'] * 1000:.0f} ms; {stats['steps']} steps, engine busy {stats['engine_s']:.1f}s"
    )
    engine_tps = sum(offline) / len(offline)
    cpu["replica"] -= cpu["engine"]  # the replica's other threads: event loop, Ray, text, streams
    per_token = {k: 1000 * v / max(1, fleet.tokens) for k, v in cpu.items()}
    per_token["engine_alone"] = 1000 * alone_cpu / max(1.0, alone_tokens)
    console.print("CPU ms per served token: " + ", ".join(f"{k} {v:.2f}" for k, v in per_token.items()))
    console.print("abuse run: a well-behaved company alone, then under attack by another")
    abuse = abuse_run(url, cfg, adapted, keys, seconds=args.duration / 2)
    console.print(f"abuser's answers: {abuse['abuser_answers']}")

    # Two replicas, one killed a third of the way through.
    cfg2 = cfg.model_copy(deep=True)
    cfg2.serve.replicas = cfg2.serve.max_replicas = 2
    serve.run(build({"config_json": cfg2.model_dump(mode="json")}), name=cfg.serve.app_name, route_prefix="/")
    while running_model_replicas() < 2:
        time.sleep(0.5)
    load(adapted, min(10.0, args.duration / 3), seed=97)  # warm the new replicas
    kill_at = args.duration / 3
    events: dict[str, float] = {}

    def killer() -> None:
        time.sleep(kill_at)
        victims = model_replicas()
        events["killed_at"] = time.perf_counter()
        ray.kill(victims[0], no_restart=True)
        while running_model_replicas() >= 2:  # the controller notices the death
            time.sleep(0.2)
        while running_model_replicas() < 2:  # and starts a replacement
            time.sleep(0.5)
        events["recovered_at"] = time.perf_counter()

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    killed = load(adapted, args.duration, seed=7)
    thread.join(timeout=120)
    after = load(adapted, min(5.0, args.duration / 6), seed=8)  # the service answers again
    serve.shutdown()
    ray.shutdown()

    failed = sum(killed.errors.values())
    kill_rate = failed / killed.requests if killed.requests else 1.0
    recovered = "recovered_at" in events and after.ok > 0 and not after.errors
    figures = {
        "served_vs_engine_ratio": fleet.tokens_per_s / engine_tps,
        "engine_offline_tokens_per_s": engine_tps,
        "replica_engine_busy_fraction": busy / fleet.seconds,
        "cpu_ms_per_token": per_token,
        **abuse,
        "load_average": list(os.getloadavg()),
        "throughput_ratio_vs_base": fleet.tokens_per_s / base.tokens_per_s,
        "p50_latency_ms": percentile(fleet.latencies, 50) * 1000,
        "p99_latency_ms": percentile(fleet.latencies, 99) * 1000,
        "ttft_p50_ms": percentile(fleet.ttfts, 50) * 1000,
        "ttft_p99_ms": percentile(fleet.ttfts, 99) * 1000,
        "errors_5xx": fleet.errors_5xx + base.errors_5xx,
        "replica_kill_error_rate": kill_rate,
        "replica_kill_requests": killed.requests,
        "replica_kill_errors": failed,
        "replica_kill_recovered": recovered,
        "replica_kill_recovery_s": events.get("recovered_at", float("nan")) - events.get("killed_at", float("nan")),
        "fleet_tokens_per_s": fleet.tokens_per_s,
        "base_tokens_per_s": base.tokens_per_s,
        "fleet_requests": fleet.requests,
        "base_requests": base.requests,
        "base_p50_latency_ms": percentile(base.latencies, 50) * 1000,
        "base_p99_latency_ms": percentile(base.latencies, 99) * 1000,
        "base_ttft_p99_ms": percentile(base.ttfts, 99) * 1000,
        "adapter_cache_hit_rate": stats["hits"] / max(1, stats["hits"] + stats["misses"]),
        "adapter_loads": stats["loads"],
        "adapter_evictions": stats["evictions"],
        "max_batch_rows": stats["max_rows_seen"],
        "replica_first_token_p99_ms": stats["first_token_p99_s"] * 1000,
        "replica_steps": stats["steps"],
        "replica_engine_s": stats["engine_s"],
        "config": {
            "clients": args.clients, "models": args.models, "duration_s": args.duration, "rounds": args.rounds,
            "max_tokens": args.max_tokens, "adapter_slots": cfg.serve.adapter_slots, "zipf_s": 1.0,
            "base": "tiny llama vocab 264 hidden 256 layers 4", "rank": cfg.lora.rank, "stream": True,
        },
    }  # fmt: skip
    table(
        f"serving: {args.clients} clients, {args.models} models (Zipf), {args.max_tokens} tokens, {args.duration:g}s",
        [
            (
                "served ÷ engine alone (tokens/s)",
                f"{figures['served_vs_engine_ratio']:.2f}× ({engine_tps:.0f} alone)",
                "≥ 0.8×",
            ),
            ("throughput vs base (tokens/s)", f"{figures['throughput_ratio_vs_base']:.2f}×", "≥ 0.5×"),
            ("fleet / base tokens per s", f"{fleet.tokens_per_s:.0f} / {base.tokens_per_s:.0f}", ""),
            (
                "latency p50 / p99",
                f"{figures['p50_latency_ms']:.0f} / {figures['p99_latency_ms']:.0f} ms",
                "",
            ),
            (
                "time to first token p50 / p99",
                f"{figures['ttft_p50_ms']:.0f} / {figures['ttft_p99_ms']:.0f} ms",
                "",
            ),
            ("5xx errors", str(figures["errors_5xx"]), "0"),
            ("adapter cache hit rate", f"{figures['adapter_cache_hit_rate']:.1%}", ""),
            ("victim p99 under abuse ÷ alone", f"{abuse['victim_p99_ratio_under_abuse']:.2f}×", "≤ 2×"),
            ("victim errors under abuse", str(abuse["victim_errors"]), "0"),
            ("/healthz p99 under abuse", f"{abuse['healthz_p99_ms_under_abuse']:.0f} ms", "≤ 100 ms"),
            ("replica killed: error rate", f"{kill_rate:.2%} ({failed}/{killed.requests})", "≤ 1%"),
            ("replica killed: recovered", f"{recovered} ({figures['replica_kill_recovery_s']:.1f}s)", "yes"),
        ],
    )
    if not args.no_record:
        path = write_results("serve", figures)
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
