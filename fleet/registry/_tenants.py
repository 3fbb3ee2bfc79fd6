"""Tenants and their models."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import func, select, update

from fleet.errors import ConflictError, NotFoundError, ValidationError
from fleet.registry._core import MODELS, RegistryCore, chunks
from fleet.registry.records import ModelRecord, TenantRecord
from fleet.registry.schema import Tenant
from fleet.types import DriftState, Level, level_of, validate_id

TENANTS = Tenant.__table__


def _model_record(row) -> ModelRecord:
    return ModelRecord(
        id=row.id,
        company_id=row.company_id,
        team_id=row.team_id,
        tier=row.tier,
        base_model=row.base_model,
        lora_rank=row.lora_rank,
        lora_alpha=row.lora_alpha,
        drift_state=DriftState(row.drift_state),
        watermark=row.watermark,
        pending_tokens=row.pending_tokens,
        total_tokens=row.total_tokens,
        item_count=row.item_count,
        active_version=row.active_version,
        last_version_at=row.last_version_at,
        created_at=row.created_at,
    )


def _tenant_record(row) -> TenantRecord:
    return TenantRecord(
        id=row.id,
        parent_id=row.parent_id,
        level=Level(row.level),
        shares=row.shares,
        budget_gpu_s_per_day=row.budget_gpu_s_per_day,
        created_at=row.created_at,
    )


def _check_shares(tenant_id: str, shares: float) -> float:
    if not isinstance(shares, int | float) or not shares > 0 or shares != shares:
        raise ValidationError(f"tenant {tenant_id!r}: shares must be a positive number, got {shares!r}")
    return float(shares)


class TenantsMixin(RegistryCore):
    def add_tenant(
        self,
        tenant_id: str,
        *,
        base_model: str,
        rank: int,
        alpha: float,
        shares: float = 1.0,
        budget_gpu_s_per_day: float | None = None,
    ) -> ModelRecord:
        """Create a tenant node and its model (same id). The parent must exist."""
        self.add_tenants(
            [(tenant_id, shares)],
            base_model=base_model,
            rank=rank,
            alpha=alpha,
            budgets={tenant_id: budget_gpu_s_per_day} if budget_gpu_s_per_day else None,
        )
        return self.get_model(tenant_id)

    def add_tenants(
        self,
        tenants: Sequence[tuple[str, float]],
        *,
        base_model: str,
        rank: int,
        alpha: float,
        budgets: dict[str, float] | None = None,
    ) -> int:
        """Create many tenants and their models in one transaction (set-based).

        ``tenants`` is ``(id, shares)`` pairs; parents must exist already or come earlier in the
        list. Any existing id, bad id or missing parent rejects the whole batch.
        """
        ids = [validate_id(t) for t, _ in tenants]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ConflictError(f"tenant {dup!r} appears twice in the batch")
        now = self.now()
        budgets = budgets or {}
        tenant_rows, model_rows = [], []
        for tid, shares in tenants:
            segs = tid.split("/")
            level = level_of(tid)
            parent = "/".join(segs[:-1]) or None
            tenant_rows.append(
                {
                    "id": tid,
                    "parent_id": parent,
                    "level": level.value,
                    "shares": _check_shares(tid, shares),
                    "budget_gpu_s_per_day": budgets.get(tid),
                    "created_at": now,
                }
            )
            model_rows.append(
                {
                    "id": tid,
                    "company_id": segs[0],
                    "team_id": "/".join(segs[:2]) if len(segs) == 3 else None,
                    "tier": level.value,
                    "base_model": base_model,
                    "lora_rank": rank,
                    "lora_alpha": alpha,
                    "drift_state": DriftState.OK.value,
                    "watermark": 0,
                    "pending_tokens": 0,
                    "total_tokens": 0,
                    "item_count": 0,
                    "active_version": None,
                    "last_version_at": None,
                    "created_at": now,
                }
            )
        batch = set(ids)
        parents = {r["parent_id"] for r in tenant_rows if r["parent_id"] and r["parent_id"] not in batch}
        with self.tx() as conn:
            existing = set()
            for part in chunks(ids):
                existing |= set(conn.scalars(select(TENANTS.c.id).where(TENANTS.c.id.in_(part))))
            if existing:
                first = sorted(existing)[0]
                raise ConflictError(f"tenant {first!r} already exists", tenant_ids=sorted(existing)[:10])
            if parents:
                plist = sorted(parents)
                found = set()
                for part in chunks(plist):
                    found |= set(conn.scalars(select(TENANTS.c.id).where(TENANTS.c.id.in_(part))))
                missing = [p for p in plist if p not in found]
                if missing:
                    raise NotFoundError(
                        f"parent tenant {missing[0]!r} does not exist; create it first "
                        f"(`fleet tenants add {missing[0]}`)"
                    )
            # Tenants go in level order so foreign keys to parents in the same batch hold.
            tenant_rows.sort(key=lambda r: r["id"].count("/"))
            for part in chunks(tenant_rows):
                conn.execute(TENANTS.insert(), list(part))
            for part in chunks(model_rows):
                conn.execute(MODELS.insert(), list(part))
        return len(tenant_rows)

    def get_model(self, model_id: str) -> ModelRecord:
        validate_id(model_id)
        with self.read() as conn:
            row = conn.execute(select(MODELS).where(MODELS.c.id == model_id)).first()
        if row is None:
            raise NotFoundError(f"unknown model {model_id!r}; `fleet tenants list` shows the models")
        return _model_record(row)

    def get_models(self, model_ids: Sequence[str]) -> dict[str, ModelRecord]:
        """The models named (all must exist)."""
        ids = [validate_id(m) for m in model_ids]
        out: dict[str, ModelRecord] = {}
        with self.read() as conn:
            for part in chunks(sorted(set(ids))):
                for row in conn.execute(select(MODELS).where(MODELS.c.id.in_(part))):
                    out[row.id] = _model_record(row)
        missing = [m for m in ids if m not in out]
        if missing:
            raise NotFoundError(
                f"unknown model(s): {', '.join(missing[:5])}; `fleet tenants list` shows the models",
                model_ids=missing,
            )
        return out

    def list_models(self, *, tier: str | None = None, company: str | None = None) -> list[ModelRecord]:
        stmt = select(MODELS).order_by(MODELS.c.id)
        if tier:
            stmt = stmt.where(MODELS.c.tier == tier)
        if company:
            stmt = stmt.where(MODELS.c.company_id == validate_id(company))
        with self.read() as conn:
            return [_model_record(r) for r in conn.execute(stmt)]

    def list_tenants(self) -> list[TenantRecord]:
        with self.read() as conn:
            return [_tenant_record(r) for r in conn.execute(select(TENANTS).order_by(TENANTS.c.id))]

    def get_tenant(self, tenant_id: str) -> TenantRecord:
        validate_id(tenant_id)
        with self.read() as conn:
            row = conn.execute(select(TENANTS).where(TENANTS.c.id == tenant_id)).first()
        if row is None:
            raise NotFoundError(f"unknown tenant {tenant_id!r}; `fleet tenants list` shows the tenants")
        return _tenant_record(row)

    def children(self, tenant_id: str) -> list[str]:
        validate_id(tenant_id)
        with self.read() as conn:
            return list(
                conn.scalars(
                    select(TENANTS.c.id).where(TENANTS.c.parent_id == tenant_id).order_by(TENANTS.c.id)
                )
            )

    def set_drift_state(self, model_id: str, state: DriftState) -> None:
        with self.tx() as conn:
            self.lock_models(conn, [model_id])
            conn.execute(update(MODELS).where(MODELS.c.id == model_id).values(drift_state=state.value))

    def count_models(self) -> int:
        with self.read() as conn:
            return int(conn.scalar(select(func.count()).select_from(MODELS)) or 0)
