"""The control loop's Ray metrics (exported by Ray's Prometheus endpoint, beside serving's and
drift's): scheduler queue depth, GPU-seconds by tier, fairness across companies, training runs
and members, cycles. Tags are bounded — tier, status, outcome — never a model or company id.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fleet._metrics import Spec, make_metrics
from fleet.types import TIERS

_SECONDS = [1, 5, 15, 30, 60, 120, 300, 600, 1200, 3600, 7200]
ALLOWED_TAGS = frozenset({"tier", "reason", "status", "outcome", "action"})

# fmt: off
SPECS: tuple[Spec, ...] = (
    Spec("gauge", "fleet_scheduler_queue_depth", "Models with pending data left unscheduled by the last plan, by tier and reason.", ("tier", "reason")),
    Spec("gauge", "fleet_scheduler_scheduled_models", "Models the last plan scheduled, by tier.", ("tier",)),
    Spec("gauge", "fleet_scheduler_fairness_jain", "Jain's index of companies' decayed usage relative to their shares (1 = fair).", ()),
    Spec("counter", "fleet_train_gpu_seconds", "GPU-seconds (full-H100 equivalents) used by training, by tier.", ("tier",)),
    Spec("counter", "fleet_train_runs", "Training runs finished, by status.", ("status",)),
    Spec("counter", "fleet_train_members", "Models trained, by tier and outcome (published, rejected).", ("tier", "outcome")),
    Spec("counter", "fleet_train_tokens", "Tokens trained on, by tier.", ("tier",)),
    Spec("histogram", "fleet_train_run_seconds", "Wall time of a pack's run.", (), tuple(_SECONDS)),
    Spec("counter", "fleet_cycles", "Control-loop cycles finished, by status.", ("status",)),
    Spec("histogram", "fleet_cycle_seconds", "Wall time of a cycle.", (), tuple(_SECONDS)),
    Spec("counter", "fleet_cycle_drift_actions", "Drift actions taken after training, by kind.", ("action",)),
)
# fmt: on
_metrics: dict[str, Any] = {}


def _m() -> dict[str, Any]:
    if not _metrics:
        _metrics.update(make_metrics(SPECS, ALLOWED_TAGS))
    return _metrics


def jain(usage: dict[str, float], shares: dict[str, float]) -> float:
    """Jain's fairness index of usage/share over companies that used anything (1 when none did)."""
    x = [usage[c] / shares[c] for c in usage if shares.get(c, 0) > 0 and usage[c] > 0]
    if not x:
        return 1.0
    return (sum(x) ** 2) / (len(x) * sum(v * v for v in x))


def record_plan(demand, result) -> None:
    """Queue depth and scheduled models by tier, from the plan's decision arrays."""
    import numpy as np

    from fleet.scheduler.result import REASONS, SCHEDULED

    if result.arrays is None or not demand.n_models:
        return
    m = _m()
    reason = result.arrays.reason
    pending = demand.pending_tokens > 0
    for code, tier in enumerate(TIERS):
        in_tier = demand.tier == code
        m["fleet_scheduler_scheduled_models"].set(
            float(np.count_nonzero(in_tier & (reason == SCHEDULED))), tags={"tier": tier}
        )
        for rc, name in enumerate(REASONS):
            if rc == SCHEDULED:
                continue
            n = float(np.count_nonzero(in_tier & pending & (reason == rc)))
            m["fleet_scheduler_queue_depth"].set(n, tags={"tier": tier, "reason": name})


def record_fairness(registry, cfg, now: float) -> float:
    usage = registry.decayed_usage(now=now, half_life_s=cfg.scheduler.usage_half_life_s)
    companies, _ = registry.demand_tenants()
    value = jain(usage, {c: float(v["share"]) for c, v in companies.items()})
    _m()["fleet_scheduler_fairness_jain"].set(value)
    return value


def record_training(outcomes: Sequence[Any], gpu_s_by_tier: dict[str, float]) -> None:
    m = _m()
    for tier, s in gpu_s_by_tier.items():
        if s > 0 and math.isfinite(s):
            m["fleet_train_gpu_seconds"].inc(s, tags={"tier": tier})
    for o in outcomes:
        m["fleet_train_runs"].inc(1, tags={"status": "failed" if o.error else "succeeded"})
        if o.seconds:
            m["fleet_train_run_seconds"].observe(o.seconds)
        for mo in o.members:
            m["fleet_train_members"].inc(
                1, tags={"tier": mo.tier, "outcome": "published" if mo.published else "rejected"}
            )
            tok = mo.metrics.get("tokens", 0)
            if tok:
                m["fleet_train_tokens"].inc(tok, tags={"tier": mo.tier})


def record_cycle(status: str, seconds: float, summary: dict[str, Any]) -> None:
    m = _m()
    m["fleet_cycles"].inc(1, tags={"status": status})
    m["fleet_cycle_seconds"].observe(seconds)
    for action in ("warned", "frozen", "rolled_back"):
        n = int(summary.get(action) or 0)
        if n:
            m["fleet_cycle_drift_actions"].inc(n, tags={"action": action})
