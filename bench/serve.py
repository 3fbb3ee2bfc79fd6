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

Run: ``.venv/bin/python bench/serve.py`` (the recorded figures; about 6 minutes), or
``--duration 10`` for a quick look.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from _common import console, percentile, table, write_results  # noqa: E402
from _tiny import tiny_llama  # noqa: E402

from fleet.base.tokenizer import build_tokenizer  # noqa: E402
from fleet.config import FleetConfig, load_config  # noqa: E402
from fleet.context import Fleet  # noqa: E402
from fleet.serve.sample import publish_random  # noqa: E402

COMPANIES, TEAMS_PER_COMPANY = 10, 4
WORDS = "fleet model adapter serve batch token tenant company team person stack slot cache ray".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def org(prefix: str, n_models: int) -> list[str]:
    """Companies, then teams, then individuals spread over the teams: n_models ids in all."""
    companies = [f"{prefix}{c}" for c in range(COMPANIES)]
    teams = [f"{c}/t{t}" for c in companies for t in range(TEAMS_PER_COMPANY)]
    people = [f"{teams[i % len(teams)]}/p{i}" for i in range(n_models - len(companies) - len(teams))]
    return companies + teams + people


@dataclass
class Load:
    """What the clients measured in one window."""

    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    ok: int = 0
    errors: dict[int, int] = field(default_factory=dict)
    seconds: float = 0.0

    def add(self, other: Load) -> None:
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.tokens += other.tokens
        self.ok += other.ok
        self.seconds += other.seconds
        for k, v in other.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v

    @property
    def requests(self) -> int:
        return self.ok + sum(self.errors.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def errors_5xx(self) -> int:
        return sum(v for k, v in self.errors.items() if k >= 500)


async def one_request(
    http: httpx.AsyncClient, key: str, model: str, prompt: str, max_tokens: int, load: Load
):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    ttft, tokens, status = None, 0, 200
    try:
        async with http.stream(
            "POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as r:
            if r.status_code != 200:
                await r.aread()
                status = r.status_code
            else:
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        status = 500 if event["error"]["type"] == "server_error" else 503
                        break
                    if event.get("usage"):
                        tokens = event["usage"]["completion_tokens"]
                    elif event["choices"] and event["choices"][0]["text"] and ttft is None:
                        ttft = time.perf_counter() - t0
    except httpx.HTTPError:
        status = 599  # connection-level failure
    if status == 200:
        load.ok += 1
        load.tokens += tokens
        load.latencies.append(time.perf_counter() - t0)
        if ttft is not None:
            load.ttfts.append(ttft)
    else:
        load.errors[status] = load.errors.get(status, 0) + 1


async def run_load(
    url: str,
    models: list[str],
    keys: dict[str, str],
    *,
    clients: int,
    seconds: float,
    max_tokens: int,
    seed: int,
) -> Load:
    """``clients`` concurrent clients, each sending one request after another for ``seconds``."""
    ranks = np.arange(1, len(models) + 1, dtype=float)
    weights = 1.0 / ranks  # Zipf, s = 1: the most popular model gets 1/H(500) ≈ 15% of requests
    order = list(models)
    random.Random(seed).shuffle(order)  # popularity independent of the tree position
    probs = weights / weights.sum()
    load = Load()
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)

    async def client(i: int, http: httpx.AsyncClient) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        words = random.Random(seed * 1000 + i)
        while time.perf_counter() < deadline:
            model = order[int(rng.choice(len(order), p=probs))]
            prompt = " ".join(words.choice(WORDS) for _ in range(words.randint(3, 8)))
            await one_request(http, keys[model.split("/")[0]], model, prompt, max_tokens, load)

    t0 = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as http:
        await asyncio.gather(*(client(i, http) for i in range(clients)))
    load.seconds = time.perf_counter() - t0
    return load


def setup(tmp: Path, n_models: int) -> tuple[FleetConfig, list[str], list[str], dict[str, str]]:
    cfg = load_config(
        overrides={
            "data_dir": str(tmp / "data"),
            "serve": {"port": free_port(), "rate_limit_rps": 100_000.0, "rate_limit_burst": 100_000},
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
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    url = start(cfg)
    console.print(f"serving at {url}")

    def load(models: list[str], seconds: float, seed: int) -> Load:
        return asyncio.run(
            run_load(
                url,
                models,
                keys,
                clients=args.clients,
                seconds=seconds,
                max_tokens=args.max_tokens,
                seed=seed,
            )
        )

    # Warm both paths (imports, first loads, the popular adapters) before measuring.
    load(adapted, min(10.0, args.duration / 3), seed=99)
    load(plain, min(5.0, args.duration / 6), seed=98)
    fleet, base = Load(), Load()
    window = args.duration / args.rounds
    for r in range(args.rounds):
        fleet.add(load(adapted, window, seed=r))
        base.add(load(plain, window, seed=r))
        console.print(
            f"round {r + 1}: fleet {fleet.tokens_per_s:.0f} tok/s, base {base.tokens_per_s:.0f} tok/s (cumulative)"
        )
    stats = serve.get_deployment_handle("FleetModel", cfg.serve.app_name).stats.remote().result()
    console.print(
        f"replica: submit→first token p50 {stats['first_token_p50_s'] * 1000:.0f} ms, "
        f"p99 {stats['first_token_p99_s'] * 1000:.0f} ms; {stats['steps']} steps, engine busy {stats['engine_s']:.1f}s"
    )

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
            ("replica killed: error rate", f"{kill_rate:.2%} ({failed}/{killed.requests})", "≤ 1%"),
            ("replica killed: recovered", f"{recovered} ({figures['replica_kill_recovery_s']:.1f}s)", "yes"),
        ],
    )
    if not args.no_record:
        path = write_results("serve", figures)
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
