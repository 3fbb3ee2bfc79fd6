"""fleet's Grafana dashboard, built from the metric names the code defines.

Ray exports application metrics with a ``ray_`` prefix (counters with ``_total``); the
dashboard sits beside Ray's own dashboards (same Prometheus data source). Each panel answers one
operator question (listed in the README's Monitoring section).
"""

from __future__ import annotations

import json
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panel(
    pid: int,
    title: str,
    question: str,
    exprs: list[tuple[str, str]],
    *,
    unit: str = "short",
    x: int = 0,
    y: int = 0,
    w: int = 12,
    h: int = 8,
    kind: str = "timeseries",
) -> dict[str, Any]:
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": question,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + i), "expr": expr, "legendFormat": legend, "datasource": DATASOURCE}
            for i, (expr, legend) in enumerate(exprs)
        ],
    }


def _row(pid: int, title: str, y: int) -> dict[str, Any]:
    return {
        "id": pid,
        "type": "row",
        "title": title,
        "collapsed": False,
        "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
    }


def q(expr: str) -> str:
    return expr.replace("$rate", "[$__rate_interval]")


# (section, [(title, question, [(expr, legend)], unit)])
PANELS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]], str]]]] = [
    (
        "Serving",
        [
            (
                "Requests by status",
                "Is the API answering, and with which errors?",
                [(q("sum by (status) (rate(ray_fleet_serve_requests_total$rate))"), "{{status}}")],
                "reqps",
            ),
            (
                "Latency p50 / p99",
                "How long do requests take, per tier?",
                [
                    (
                        q(
                            "histogram_quantile(0.5, sum by (le, tier) (rate(ray_fleet_serve_latency_ms_bucket$rate)))"
                        ),
                        "p50 {{tier}}",
                    ),
                    (
                        q(
                            "histogram_quantile(0.99, sum by (le, tier) (rate(ray_fleet_serve_latency_ms_bucket$rate)))"
                        ),
                        "p99 {{tier}}",
                    ),
                ],
                "ms",
            ),
            (
                "Time to first token p99",
                "How long until streaming starts?",
                [
                    (
                        q(
                            "histogram_quantile(0.99, sum by (le) (rate(ray_fleet_serve_ttft_ms_bucket$rate)))"
                        ),
                        "p99",
                    )
                ],
                "ms",
            ),
            (
                "Tokens per second",
                "How much are we generating, per tier?",
                [
                    (
                        q("sum by (tier) (rate(ray_fleet_serve_completion_tokens_total$rate))"),
                        "completion {{tier}}",
                    ),
                    (q("sum by (tier) (rate(ray_fleet_serve_prompt_tokens_total$rate))"), "prompt {{tier}}"),
                ],
                "short",
            ),
            (
                "Adapter cache hit ratio",
                "Do replicas hold the adapters they are asked for (routing works)?",
                [
                    (
                        q(
                            "sum(rate(ray_fleet_serve_adapter_cache_hits_total$rate)) / (sum(rate(ray_fleet_serve_adapter_cache_hits_total$rate)) + sum(rate(ray_fleet_serve_adapter_cache_misses_total$rate)))"
                        ),
                        "hit ratio",
                    )
                ],
                "percentunit",
            ),
            (
                "Adapter loads, evictions, fallbacks",
                "Is the cache thrashing, or are stored objects corrupt or missing?",
                [
                    (
                        q("sum by (status) (rate(ray_fleet_serve_adapter_loads_total$rate))"),
                        "load {{status}}",
                    ),
                    (q("sum(rate(ray_fleet_serve_adapter_evictions_total$rate))"), "evictions"),
                    (
                        q("sum by (status) (rate(ray_fleet_serve_adapter_fallbacks_total$rate))"),
                        "fallback to {{status}}",
                    ),
                ],
                "ops",
            ),
            (
                "Decode batch size",
                "How many models share each decode step?",
                [
                    (
                        q(
                            "histogram_quantile(0.5, sum by (le) (rate(ray_fleet_serve_batch_size_bucket$rate)))"
                        ),
                        "p50 rows",
                    ),
                    (
                        q(
                            "histogram_quantile(0.95, sum by (le) (rate(ray_fleet_serve_batch_size_bucket$rate)))"
                        ),
                        "p95 rows",
                    ),
                ],
                "short",
            ),
        ],
    ),
    (
        "Scheduler and training",
        [
            (
                "Queue depth by tier and reason",
                "How many models with new data wait, and why (capacity, budget, interval)?",
                [("sum by (tier, reason) (ray_fleet_scheduler_queue_depth)", "{{tier}} {{reason}}")],
                "short",
            ),
            (
                "Models scheduled per cycle",
                "How many models does each plan train, per tier?",
                [("sum by (tier) (ray_fleet_scheduler_scheduled_models)", "{{tier}}")],
                "short",
            ),
            (
                "Fairness across companies (Jain)",
                "Do companies get GPU time in proportion to their shares?",
                [("ray_fleet_scheduler_fairness_jain", "Jain's index")],
                "percentunit",
            ),
            (
                "GPU-seconds by tier",
                "Where does training capacity go?",
                [(q("sum by (tier) (rate(ray_fleet_train_gpu_seconds_total$rate))"), "{{tier}}")],
                "short",
            ),
            (
                "Models published / rejected",
                "Does training produce versions that pass the gates?",
                [
                    (
                        q("sum by (tier, outcome) (increase(ray_fleet_train_members_total$rate))"),
                        "{{tier}} {{outcome}}",
                    )
                ],
                "short",
            ),
            (
                "Training runs and their duration",
                "Do packs finish, and how long do they take?",
                [
                    (q("sum by (status) (increase(ray_fleet_train_runs_total$rate))"), "runs {{status}}"),
                    (
                        q(
                            "histogram_quantile(0.9, sum by (le) (rate(ray_fleet_train_run_seconds_bucket$rate)))"
                        ),
                        "p90 run seconds",
                    ),
                ],
                "short",
            ),
            (
                "Cycles",
                "Is the control loop running, and how long is a cycle?",
                [
                    (q("sum by (status) (increase(ray_fleet_cycles_total$rate))"), "cycles {{status}}"),
                    (
                        q("histogram_quantile(0.9, sum by (le) (rate(ray_fleet_cycle_seconds_bucket$rate)))"),
                        "p90 cycle seconds",
                    ),
                ],
                "short",
            ),
        ],
    ),
    (
        "Drift",
        [
            (
                "KL to the base, p50 / p99 by tier",
                "How far do models drift from the base?",
                [
                    (
                        q(
                            'histogram_quantile(0.5, sum by (le, tier) (rate(ray_fleet_drift_kl_bucket{relation="base"}$rate)))'
                        ),
                        "p50 {{tier}}",
                    ),
                    (
                        q(
                            'histogram_quantile(0.99, sum by (le, tier) (rate(ray_fleet_drift_kl_bucket{relation="base"}$rate)))'
                        ),
                        "p99 {{tier}}",
                    ),
                ],
                "short",
            ),
            (
                "Relative weight change p99 by tier",
                "How large are the adapters relative to the base weights?",
                [
                    (
                        q(
                            "histogram_quantile(0.99, sum by (le, tier) (rate(ray_fleet_drift_rel_weight_norm_bucket$rate)))"
                        ),
                        "p99 {{tier}}",
                    )
                ],
                "short",
            ),
            (
                "Top-1 agreement with the base p1 by tier",
                "Do models still agree with the base on general text?",
                [
                    (
                        q(
                            'histogram_quantile(0.01, sum by (le, tier) (rate(ray_fleet_drift_top1_agreement_bucket{relation="base"}$rate)))'
                        ),
                        "p1 {{tier}}",
                    )
                ],
                "percentunit",
            ),
            (
                "Drift actions",
                "Is the monitor warning, freezing or rolling back models?",
                [
                    (q("sum by (action) (increase(ray_fleet_drift_actions_total$rate))"), "{{action}}"),
                    (
                        q("sum by (action) (increase(ray_fleet_cycle_drift_actions_total$rate))"),
                        "after training: {{action}}",
                    ),
                ],
                "short",
            ),
        ],
    ),
]


def build_dashboard() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    y, pid = 0, 1
    for section, items in PANELS:
        panels.append(_row(pid, section, y))
        pid += 1
        y += 1
        for i, (title, question, exprs, unit) in enumerate(items):
            panels.append(_panel(pid, title, question, exprs, unit=unit, x=12 * (i % 2), y=y + 8 * (i // 2)))
            pid += 1
        y += 8 * ((len(items) + 1) // 2)
    return {
        "uid": "fleet-overview",
        "title": "fleet",
        "tags": ["fleet", "ray"],
        "timezone": "utc",
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {
            "list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"}
            ]
        },
        "panels": panels,
    }


def metric_names() -> set[str]:
    """Every fleet metric a panel queries (without Ray's prefix and suffixes)."""
    import re

    names = set()
    for _, items in PANELS:
        for _, _, exprs, _ in items:
            for expr, _ in exprs:
                for m in re.findall(r"ray_(fleet_[a-z0-9_]+)", expr):
                    names.add(re.sub(r"_(total|bucket|sum|count)$", "", m))
    return names


def render_json() -> str:
    return json.dumps(build_dashboard(), indent=2) + "\n"
