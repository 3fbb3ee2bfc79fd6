"""Operational records: training runs, cycles, usage, tier schedules, drift history, status."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select, update

from fleet.errors import NotFoundError
from fleet.registry._core import MODELS, RegistryCore
from fleet.registry._versions import VERSIONS
from fleet.registry.records import RunRecord
from fleet.registry.schema import (
    Cycle,
    DivergenceSample,
    DriftActionRow,
    TierSchedule,
    TrainingRun,
    Usage,
)
from fleet.types import TIERS, RunStatus

RUNS = TrainingRun.__table__
CYCLES = Cycle.__table__
USAGE = Usage.__table__
SAMPLES = DivergenceSample.__table__
ACTIONS = DriftActionRow.__table__
SCHEDULES = TierSchedule.__table__


def _run_record(r) -> RunRecord:
    return RunRecord(
        id=r.id,
        name=r.name,
        cycle_id=r.cycle_id,
        status=r.status,
        base_model=r.base_model,
        slice_profile=r.slice_profile,
        members=list(r.members or []),
        metrics=dict(r.metrics or {}),
        error=r.error,
        started_at=r.started_at,
        finished_at=r.finished_at,
    )


class OpsMixin(RegistryCore):
    # -- training runs ------------------------------------------------------------------------
    def create_run(
        self,
        name: str,
        *,
        base_model: str,
        members: Sequence[str],
        cycle_id: int | None = None,
        slice_profile: str | None = None,
    ) -> int:
        """The run of this name (created, or reopened when a run of the same name is resumed).

        Run names are unique (``pack-<cycle>-<n>``): a resumed run keeps its id, which is what
        makes its publication idempotent.
        """
        with self.tx() as conn:
            existing = conn.scalar(select(RUNS.c.id).where(RUNS.c.name == name).order_by(RUNS.c.id).limit(1))
            if existing is not None:
                conn.execute(
                    update(RUNS)
                    .where(RUNS.c.id == existing)
                    .values(status=RunStatus.RUNNING.value, error=None)
                )
                return int(existing)
            res = conn.execute(
                RUNS.insert().values(
                    name=name,
                    cycle_id=cycle_id,
                    status=RunStatus.RUNNING.value,
                    base_model=base_model,
                    slice_profile=slice_profile,
                    members=list(members),
                    metrics={},
                    started_at=self.now(),
                )
            )
            return int(res.inserted_primary_key[0])

    def finish_run(
        self, run_id: int, status: RunStatus, *, metrics: dict | None = None, error: str | None = None
    ) -> None:
        with self.tx() as conn:
            conn.execute(
                update(RUNS)
                .where(RUNS.c.id == run_id)
                .values(status=status.value, metrics=metrics or {}, error=error, finished_at=self.now())
            )

    def get_run(self, run_id: int) -> RunRecord:
        with self.read() as conn:
            row = conn.execute(select(RUNS).where(RUNS.c.id == run_id)).first()
        if row is None:
            raise NotFoundError(f"no training run {run_id}")
        return _run_record(row)

    def list_runs(self, *, cycle_id: int | None = None, limit: int = 50) -> list[RunRecord]:
        stmt = select(RUNS).order_by(RUNS.c.id.desc()).limit(limit)
        if cycle_id is not None:
            stmt = stmt.where(RUNS.c.cycle_id == cycle_id)
        with self.read() as conn:
            return [_run_record(r) for r in conn.execute(stmt)]

    # -- cycles ------------------------------------------------------------------------------
    def start_cycle(self) -> int:
        with self.tx() as conn:
            now = self.now()
            res = conn.execute(
                CYCLES.insert().values(
                    status=RunStatus.RUNNING.value, summary={}, started_at=now, heartbeat_at=now
                )
            )
            return int(res.inserted_primary_key[0])

    def beat_cycle(self, cycle_id: int, at: float | None = None) -> None:
        """A running cycle says it is alive (``at``: when; default now)."""
        with self.tx() as conn:
            conn.execute(
                update(CYCLES)
                .where(CYCLES.c.id == cycle_id)
                .values(heartbeat_at=self.now() if at is None else at)
            )

    def finish_cycle(self, cycle_id: int, status: RunStatus, summary: dict[str, Any]) -> None:
        with self.tx() as conn:
            conn.execute(
                update(CYCLES)
                .where(CYCLES.c.id == cycle_id)
                .values(status=status.value, summary=summary, finished_at=self.now())
            )

    def get_cycle(self, cycle_id: int) -> dict[str, Any]:
        with self.read() as conn:
            row = conn.execute(select(CYCLES).where(CYCLES.c.id == cycle_id)).first()
        if row is None:
            raise NotFoundError(f"no cycle {cycle_id}")
        return dict(row._mapping)

    def update_cycle(self, cycle_id: int, summary: dict[str, Any]) -> None:
        """Replace a running cycle's summary (e.g. with its plan, before its job starts)."""
        with self.tx() as conn:
            conn.execute(update(CYCLES).where(CYCLES.c.id == cycle_id).values(summary=summary))

    def list_cycles(self, limit: int = 10) -> list[dict[str, Any]]:
        with self.read() as conn:
            rows = conn.execute(select(CYCLES).order_by(CYCLES.c.id.desc()).limit(limit)).all()
        return [dict(r._mapping) for r in rows]

    # -- usage (fair share, budgets) -----------------------------------------------------------
    def record_usage(self, rows: Sequence[dict[str, Any]]) -> None:
        """Rows of ``company_id, gpu_seconds`` (and optionally ``tier``, ``run_id``)."""
        if not rows:
            return
        now = self.now()
        with self.tx() as conn:
            conn.execute(
                USAGE.insert(),
                [
                    {
                        "company_id": r["company_id"],
                        "tier": r.get("tier"),
                        "gpu_seconds": float(r["gpu_seconds"]),
                        "run_id": r.get("run_id"),
                        "recorded_at": r.get("recorded_at", now),
                    }
                    for r in rows
                ],
            )

    def decayed_usage(
        self, *, now: float, half_life_s: float, window_half_lives: float = 10.0
    ) -> dict[str, float]:
        """GPU-seconds per company, each record decayed by 2^(-age/half_life)."""
        since = now - window_half_lives * half_life_s
        bucket = max(60.0, half_life_s / 100.0)  # decay per time bucket, not per row
        with self.read() as conn:
            rows = conn.execute(
                select(
                    USAGE.c.company_id,
                    func.floor(USAGE.c.recorded_at / bucket).label("b"),
                    func.sum(USAGE.c.gpu_seconds).label("s"),
                )
                .where(USAGE.c.recorded_at >= since)
                .group_by(USAGE.c.company_id, "b")
            ).all()
        out: dict[str, float] = {}
        for r in rows:
            age = max(0.0, now - (float(r.b) + 0.5) * bucket)
            out[r.company_id] = out.get(r.company_id, 0.0) + float(r.s) * math.pow(2.0, -age / half_life_s)
        return out

    def usage_since(self, since: float) -> dict[str, float]:
        """Raw GPU-seconds per company since a time (for daily budgets)."""
        with self.read() as conn:
            rows = conn.execute(
                select(USAGE.c.company_id, func.sum(USAGE.c.gpu_seconds))
                .where(USAGE.c.recorded_at >= since)
                .group_by(USAGE.c.company_id)
            ).all()
        return {c: float(s) for c, s in rows}

    # -- tier schedules ----------------------------------------------------------------------
    def set_tier_schedule(self, tier: str, params: dict[str, Any], *, source: str | None = None) -> int:
        """Store a new version of a tier's learning schedule; returns its version number."""
        with self.tx() as conn:
            latest = conn.scalar(select(func.max(SCHEDULES.c.version)).where(SCHEDULES.c.tier == tier)) or 0
            conn.execute(
                SCHEDULES.insert().values(
                    tier=tier, version=latest + 1, params=params, source=source, created_at=self.now()
                )
            )
            return latest + 1

    def tier_schedule(self, tier: str) -> dict[str, Any] | None:
        """The newest stored schedule of a tier (``version``, ``params``, ``source``), or None."""
        with self.read() as conn:
            row = conn.execute(
                select(SCHEDULES)
                .where(SCHEDULES.c.tier == tier)
                .order_by(SCHEDULES.c.version.desc())
                .limit(1)
            ).first()
        return dict(row._mapping) if row else None

    # -- drift history -----------------------------------------------------------------------
    def add_divergence_samples(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        now = self.now()
        with self.tx() as conn:
            conn.execute(SAMPLES.insert(), [{"metrics": {}, "created_at": now, **r} for r in rows])

    def add_drift_actions(self, rows: Sequence[dict[str, Any]]) -> None:
        if not rows:
            return
        now = self.now()
        with self.tx() as conn:
            conn.execute(ACTIONS.insert(), [{"created_at": now, **r} for r in rows])

    # -- fleet summary ---------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Per tier: models, with an active version, frozen, pending tokens; versions by state."""
        with self.read() as conn:
            per_tier = conn.execute(
                select(
                    MODELS.c.tier,
                    func.count(),
                    func.count(MODELS.c.active_version),
                    func.sum(MODELS.c.pending_tokens),
                    func.sum(MODELS.c.total_tokens),
                    func.sum(MODELS.c.item_count),
                ).group_by(MODELS.c.tier)
            ).all()
            frozen = dict(
                conn.execute(
                    select(MODELS.c.tier, func.count())
                    .where(MODELS.c.drift_state == "frozen")
                    .group_by(MODELS.c.tier)
                ).all()
            )
            states = dict(
                conn.execute(select(VERSIONS.c.state, func.count()).group_by(VERSIONS.c.state)).all()
            )
        tiers = {
            t: {"models": 0, "active": 0, "frozen": 0, "pending_tokens": 0, "tokens": 0, "items": 0}
            for t in TIERS
        }
        for tier, n, active, pending, total, items in per_tier:
            tiers[tier] = {
                "models": int(n),
                "active": int(active),
                "frozen": int(frozen.get(tier, 0)),
                "pending_tokens": int(pending or 0),
                "tokens": int(total or 0),
                "items": int(items or 0),
            }
        return {"tiers": tiers, "versions": {k: int(v) for k, v in states.items()}}
