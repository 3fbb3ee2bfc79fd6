"""Registry at fleet scale: create 1,000,000 models with their tenant tree in SQLite, then
resolve active stacks.

Figures: time and peak RSS to create the models through the registry's bulk path;
p50/p99 latency of ``active_stack(model id)`` lookups of random individuals, with a
quarter of all models holding an active version (version rows are inserted set-based,
as a populated registry would have them; the store is not involved); and the scheduler's
whole demand read (``load_demand``: models, tenants, usage) with 60% of the models holding
pending tokens, median of 3.
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import console, peak_rss_mib, percentile, table, write_results  # noqa: E402
from rich.progress import Progress  # noqa: E402

from fleet.registry import Registry  # noqa: E402
from fleet.registry._versions import VERSIONS  # noqa: E402

COMPANIES, TEAMS, PER_TEAM = 1_000, 10, 99  # 1,000 + 10,000 + 990,000 = 1,001,000 models


def tree():
    companies = [f"c{c}" for c in range(COMPANIES)]
    teams = [f"{c}/t{t}" for c in companies for t in range(TEAMS)]
    yield [(c, 1.0 + (i % 7)) for i, c in enumerate(companies)]
    yield [(t, 1.0) for t in teams]
    chunk = []
    for t in teams:
        chunk += [(f"{t}/p{p}", 1.0) for p in range(PER_TEAM)]
        if len(chunk) >= 100_000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-registry-"))
    reg = Registry.open_url(f"sqlite:///{tmp / 'fleet.db'}")
    total = COMPANIES * (1 + TEAMS + TEAMS * PER_TEAM)
    t0 = time.perf_counter()
    with Progress(console=console, transient=True) as prog:
        task = prog.add_task("creating models", total=total)
        for batch in tree():
            reg.add_tenants(batch, base_model="tiny", rank=8, alpha=16.0)
            prog.advance(task, len(batch))
    create_s = time.perf_counter() - t0
    create_peak = peak_rss_mib()
    assert reg.count_models() == total

    # A quarter of the models get an active version (set-based insert).
    rng = random.Random(0)
    ids = [m for batch in tree() for m, _ in batch]
    chosen = rng.sample(ids, total // 4)
    with reg.tx() as conn:
        for i in range(0, len(chosen), 50_000):
            conn.execute(
                VERSIONS.insert(),
                [
                    dict(
                        model_id=m,
                        version=1,
                        state="active",
                        sha256="0" * 64,
                        uri=f"file:///x/{m}/v1",
                        size_bytes=1,
                        rank=8,
                        alpha=16.0,
                        base_model="tiny",
                        parents=[],
                        watermark=0,
                        metrics={},
                        created_at=0.0,
                    )
                    for m in chosen[i : i + 50_000]
                ],
            )

    individuals = [m for m in ids if m.count("/") == 2]
    for m in rng.sample(individuals, 500):  # warm the statement cache and the page cache
        reg.active_stack(m)
    lat = []
    for m in rng.sample(individuals, 20_000):
        t = time.perf_counter()
        reg.active_stack(m)
        lat.append((time.perf_counter() - t) * 1000)
    # The scheduler's demand read over the same registry: 60% of the models have pending data.
    with reg.tx() as conn:
        conn.exec_driver_sql(
            "UPDATE models SET pending_tokens = 1 + abs(random()) % 5000, pending_since = 0 WHERE abs(random()) % 10 < 6"
        )
    from fleet.config import load_config
    from fleet.scheduler.demand import load_demand

    cfg = load_config(overrides={"data_dir": str(tmp)}, env={})
    demand = load_demand(cfg, reg)  # warm the page cache
    assert len(demand.model_ids) == total
    demand_times = []
    for _ in range(3):
        t = time.perf_counter()
        load_demand(cfg, reg)
        demand_times.append(time.perf_counter() - t)
    figures = {
        "models": total,
        "demand_query_1m_s": round(sorted(demand_times)[1], 2),
        "create_1m_models_s": round(create_s, 2),
        "create_peak_mib": round(create_peak, 1),
        "active_stack_lookup_p50_ms": round(percentile(lat, 50), 4),
        "active_stack_lookup_p99_ms": round(percentile(lat, 99), 4),
    }
    table(
        "registry (SQLite, 1,001,000 models)",
        [
            ("create models + tenant tree", f"{create_s:.1f} s", "≤ 60 s"),
            ("peak RSS while creating", f"{create_peak:.0f} MiB", ""),
            ("active_stack lookup p50", f"{figures['active_stack_lookup_p50_ms']:.3f} ms", ""),
            ("active_stack lookup p99", f"{figures['active_stack_lookup_p99_ms']:.3f} ms", "≤ 1 ms"),
            ("demand read, 10⁶ models (median of 3)", f"{figures['demand_query_1m_s']:.2f} s", "≤ 5 s"),
        ],
    )
    console.print(f"wrote {write_results('registry', figures)}")
    reg.close()


if __name__ == "__main__":
    main()
