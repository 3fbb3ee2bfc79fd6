"""The scheduler's view of the registry: demand columns in one set-based query, usage, aging."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import bindparam, select, update

from fleet.registry._core import MODELS, RegistryCore
from fleet.registry.schema import Tenant

TENANTS = Tenant.__table__

_DEMAND_SQL = (
    "SELECT id, company_id, team_id, tier, base_model, pending_tokens, last_version_at, drift_state, "
    "waiting_cycles, pending_since, usage_gpu_s, usage_at, lora_rank FROM models"
)

_USAGE = (
    update(MODELS)
    .where(MODELS.c.id == bindparam("mid"))
    .values(usage_gpu_s=bindparam("usage"), usage_at=bindparam("at"))
)
_WAITING = update(MODELS).where(MODELS.c.id == bindparam("mid")).values(waiting_cycles=bindparam("w"))


class DemandMixin(RegistryCore):
    def demand_columns(self, *, now: float, half_life_s: float) -> dict[str, Any]:
        """Every model's demand as columns (what ``fleet.scheduler.Demand.from_columns`` takes).

        One scan of the models table; the arithmetic (staleness, pending age, decayed usage)
        happens on the columns with numpy, not per row.
        """
        import numpy as np

        with self.read() as conn:
            # Plain DB-API tuples: a million Row objects would cost more than the scan itself.
            rows = conn.exec_driver_sql(_DEMAND_SQL).fetchall()
        keys = (
            "model_id",
            "company",
            "team",
            "tier",
            "base",
            "pending_tokens",
            "since_last_s",
            "frozen",
            "waiting_cycles",
            "pending_age_s",
            "usage_gpu_s",
            "rank",
        )
        if not rows:
            return {k: [] for k in keys}
        (ids, company, team, tier, base, pending, last, drift, waiting, since, usage, usage_at, rank) = zip(
            *rows, strict=True
        )
        f64 = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=np.float64)  # noqa: E731
        pending_a = np.array(pending, dtype=np.int64)
        last_a, since_a, at_a = f64(last), f64(since), f64(usage_at)
        since_last = np.where(np.isnan(last_a), np.inf, np.maximum(0.0, now - last_a))
        age = np.where(np.isnan(since_a) | (pending_a == 0), 0.0, np.maximum(0.0, now - since_a))
        decay = np.where(np.isnan(at_a), 1.0, np.exp2(-np.maximum(0.0, now - at_a) / half_life_s))
        tier_a = np.array(tier, dtype=object)
        team_a = np.array(team, dtype=object)
        is_team = tier_a == "team"
        team_a[is_team] = np.array(ids, dtype=object)[is_team]  # a team model is in its own team
        return {
            "model_id": np.array(ids, dtype=object),
            "company": np.array(company, dtype=object),
            "team": team_a,
            "tier": tier_a,
            "base": np.array(base, dtype=object),
            "pending_tokens": pending_a,
            "since_last_s": since_last,
            "frozen": np.array(drift, dtype=object) == "frozen",
            "waiting_cycles": np.array(waiting, dtype=np.int32),
            "pending_age_s": age,
            "usage_gpu_s": np.array(usage, dtype=np.float64) * decay,
            "rank": np.array(rank, dtype=np.int16),
        }

    def demand_tenants(self) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Companies (shares, budget) and teams (shares) for the fair-share tree."""
        with self.read() as conn:
            rows = conn.execute(
                select(TENANTS.c.id, TENANTS.c.level, TENANTS.c.shares, TENANTS.c.budget_gpu_s_per_day).where(
                    TENANTS.c.level.in_(("company", "team"))
                )
            ).all()
        companies = {
            r.id: {"share": r.shares, "budget_gpu_s_per_day": r.budget_gpu_s_per_day}
            for r in rows
            if r.level == "company"
        }
        teams = {r.id: {"share": r.shares} for r in rows if r.level == "team"}
        return companies, teams

    def record_model_usage(self, usage: dict[str, float], *, now: float, half_life_s: float) -> None:
        """Add GPU-seconds to models' decayed usage (set-based)."""
        if not usage:
            return
        ln2 = math.log(2.0) / half_life_s
        with self.tx() as conn:
            cur = {
                r.id: (r.usage_gpu_s, r.usage_at)
                for r in conn.execute(
                    select(MODELS.c.id, MODELS.c.usage_gpu_s, MODELS.c.usage_at).where(
                        MODELS.c.id.in_(sorted(usage))
                    )
                )
            }
            rows = []
            for mid, add in usage.items():
                u, at = cur.get(mid, (0.0, None))
                decayed = u * math.exp(-ln2 * max(0.0, now - at)) if at else u
                rows.append({"mid": mid, "usage": decayed + float(add), "at": now})
            conn.execute(_USAGE, rows)

    def set_waiting_cycles(self, changes: dict[str, int]) -> None:
        """Persist the scheduler's aging counters for the models whose counter changed."""
        if not changes:
            return
        with self.tx() as conn:
            conn.execute(_WAITING, [{"mid": m, "w": int(w)} for m, w in changes.items()])
