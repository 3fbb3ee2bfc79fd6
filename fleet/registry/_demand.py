"""The scheduler's view of the registry: demand columns in one set-based query, usage, aging."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import bindparam, select, update

from fleet.registry._core import MODELS, RegistryCore
from fleet.registry.schema import Tenant

TENANTS = Tenant.__table__

# The database does the per-row work it is fast at (codes, NULL sentinels); numpy takes the rows
# in one C-level conversion. A team model is in its own team.
_NULL = -1e300
_DEMAND_SQL = (
    "SELECT id, company_id, CASE WHEN tier = 'team' THEN id ELSE coalesce(team_id, '') END, "
    "CASE tier WHEN 'company' THEN 0 WHEN 'team' THEN 1 ELSE 2 END, base_model, pending_tokens, "
    f"coalesce(last_version_at, {_NULL}), drift_state = 'frozen', waiting_cycles, "
    f"coalesce(pending_since, {_NULL}), usage_gpu_s, coalesce(usage_at, {_NULL}), lora_rank FROM models"
)
_DEMAND_DTYPE = [
    ("model_id", "O"),
    ("company", "O"),
    ("team", "O"),
    ("tier", "i1"),
    ("base", "O"),
    ("pending_tokens", "i8"),
    ("last", "f8"),
    ("frozen", "?"),
    ("waiting_cycles", "i4"),
    ("since", "f8"),
    ("usage", "f8"),
    ("usage_at", "f8"),
    ("rank", "i2"),
]

_USAGE = (
    update(MODELS)
    .where(MODELS.c.id == bindparam("mid"))
    .values(usage_gpu_s=bindparam("usage"), usage_at=bindparam("at"))
)
_WAITING = update(MODELS).where(MODELS.c.id == bindparam("mid")).values(waiting_cycles=bindparam("w"))


class DemandMixin(RegistryCore):
    def demand_columns(self, *, now: float, half_life_s: float) -> dict[str, Any]:
        """Every model's demand as columns (what ``fleet.scheduler.Demand.from_columns`` takes).

        One scan of the models table through the driver's own cursor (no per-row objects of
        SQLAlchemy's), converted to a numpy record array in one call; the arithmetic (staleness,
        pending age, decayed usage) happens on the columns, not per row.
        """
        import numpy as np

        with self.read() as conn:
            cursor = conn.connection.dbapi_connection.cursor()
            try:
                cursor.execute(_DEMAND_SQL)
                rows = cursor.fetchall()
            finally:
                cursor.close()
        rec = np.array(rows, dtype=_DEMAND_DTYPE)
        del rows
        missing = lambda a: a < _NULL / 2  # noqa: E731 - the SQL's NULL sentinel
        last, since, at = rec["last"], rec["since"], rec["usage_at"]
        pending = rec["pending_tokens"].copy()
        return {
            "model_id": rec["model_id"].copy(),
            "company": rec["company"].copy(),
            "team": rec["team"].copy(),
            "tier": rec["tier"].copy(),
            "base": rec["base"].copy(),
            "pending_tokens": pending,
            "since_last_s": np.where(missing(last), np.inf, np.maximum(0.0, now - last)),
            "frozen": rec["frozen"].copy(),
            "waiting_cycles": rec["waiting_cycles"].copy(),
            "pending_age_s": np.where(missing(since) | (pending == 0), 0.0, np.maximum(0.0, now - since)),
            "usage_gpu_s": rec["usage"]
            * np.where(missing(at), 1.0, np.exp2(-np.maximum(0.0, now - at) / half_life_s)),
            "rank": rec["rank"].copy(),
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
