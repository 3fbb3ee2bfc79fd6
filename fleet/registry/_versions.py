"""Adapter versions: publication, promotion, rollback, stack resolution.

Every state change is one transaction that first locks the model row, and the
database itself enforces "exactly one active version per model" (a partial
unique index), so concurrent writers can never leave two active versions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import Connection, and_, bindparam, func, select, update

from fleet.errors import ConflictError, NotFoundError, ValidationError
from fleet.registry._core import MODELS, RegistryCore
from fleet.registry.records import Stack, StackEntry, VersionRecord
from fleet.registry.schema import AdapterVersion, ContextItem
from fleet.types import AdapterState, lineage, validate_id

VERSIONS = AdapterVersion.__table__
ITEMS = ContextItem.__table__


class StagedObject(Protocol):
    """What the adapter store hands over for publication (see fleet.store)."""

    model_id: str
    sha256: str
    size_bytes: int


class VersionStore(Protocol):
    def commit(self, staged: Any, version: int) -> str: ...


@dataclass
class PublishRequest:
    """One member's outcome of a training run, to publish (active/candidate) or record (rejected)."""

    model_id: str
    staged: Any
    rank: int
    alpha: float
    base_model: str
    state: AdapterState = AdapterState.ACTIVE
    parents: list[str] = field(default_factory=list)
    watermark: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    run_id: int | None = None


def _version_record(row) -> VersionRecord:
    return VersionRecord(
        model_id=row.model_id,
        version=row.version,
        state=AdapterState(row.state),
        sha256=row.sha256,
        uri=row.uri,
        size_bytes=row.size_bytes,
        rank=row.rank,
        alpha=row.alpha,
        base_model=row.base_model,
        parents=list(row.parents or []),
        watermark=row.watermark,
        metrics=dict(row.metrics or {}),
        reason=row.reason,
        run_id=row.run_id,
        created_at=row.created_at,
        activated_at=row.activated_at,
        retired_at=row.retired_at,
        rolled_back_at=row.rolled_back_at,
    )


def _pending_after(watermark_col, what=None):
    """Correlated subquery over a model's items after a watermark (default: their tokens)."""
    what = func.coalesce(func.sum(ITEMS.c.tokens), 0) if what is None else what
    return (
        select(what)
        .where(and_(ITEMS.c.model_id == MODELS.c.id, ITEMS.c.id > watermark_col))
        .scalar_subquery()
    )


# Set-based model update after a version becomes active (or the active one goes away).
_SET_ACTIVE = (
    update(MODELS)
    .where(MODELS.c.id == bindparam("mid"))
    .values(
        active_version=bindparam("ver"),
        watermark=bindparam("wm"),
        last_version_at=bindparam("at"),
        pending_tokens=_pending_after(bindparam("wm")),
        pending_since=_pending_after(bindparam("wm"), func.min(ITEMS.c.received_at)),
    )
)


class VersionsMixin(RegistryCore):
    def publish_versions(
        self, store: VersionStore, requests: Sequence[PublishRequest]
    ) -> list[VersionRecord]:
        """Publish a run's outcomes in ONE transaction.

        Each request's staged object is committed to its final key ``<model>/v<n>/`` inside the
        transaction; a failure anywhere rolls everything back (objects already copied are
        unreferenced and harmless). With ``run_id`` set, a member that already has a version from
        that run is skipped, so a retried publication never publishes a member twice.
        """
        if not requests:
            return []
        ids = [validate_id(r.model_id) for r in requests]
        if len(set(ids)) != len(ids):
            raise ValidationError("a publication names the same model twice")
        for r in requests:
            if r.state not in (AdapterState.ACTIVE, AdapterState.CANDIDATE, AdapterState.REJECTED):
                raise ValidationError(f"cannot publish a version as {r.state.value}")
            if r.staged.model_id != r.model_id:
                raise ValidationError(f"staged object of {r.staged.model_id!r} published for {r.model_id!r}")
        now = self.now()
        out: list[VersionRecord] = []
        with self.tx() as conn:
            self.lock_models(conn, ids)
            run_ids = {r.run_id for r in requests if r.run_id is not None}
            done: set[str] = set()
            if run_ids:
                done = set(
                    conn.scalars(
                        select(VERSIONS.c.model_id).where(
                            VERSIONS.c.model_id.in_(ids), VERSIONS.c.run_id.in_(sorted(run_ids))
                        )
                    )
                )
            todo = [r for r in requests if r.model_id not in done]
            latest = dict(
                conn.execute(
                    select(VERSIONS.c.model_id, func.max(VERSIONS.c.version))
                    .where(VERSIONS.c.model_id.in_(ids))
                    .group_by(VERSIONS.c.model_id)
                ).all()
            )
            rows = []
            for r in todo:
                n = int(latest.get(r.model_id) or 0) + 1
                uri = store.commit(r.staged, n)
                active = r.state.servable
                rows.append(
                    {
                        "model_id": r.model_id,
                        "version": n,
                        "state": r.state.value,
                        "sha256": r.staged.sha256,
                        "uri": uri,
                        "size_bytes": r.staged.size_bytes,
                        "rank": r.rank,
                        "alpha": r.alpha,
                        "base_model": r.base_model,
                        "parents": list(r.parents),
                        "watermark": r.watermark,
                        "metrics": dict(r.metrics),
                        "reason": r.reason,
                        "run_id": r.run_id,
                        "created_at": now,
                        "activated_at": now if active else None,
                        "retired_at": None,
                        "rolled_back_at": None,
                    }
                )
            activating = [row["model_id"] for row in rows if row["state"] == AdapterState.ACTIVE.value]
            if activating:
                # Retire first: the partial unique index allows one active row per model.
                conn.execute(
                    update(VERSIONS)
                    .where(VERSIONS.c.model_id.in_(activating), VERSIONS.c.state == AdapterState.ACTIVE.value)
                    .values(state=AdapterState.RETIRED.value, retired_at=now)
                )
            if rows:
                conn.execute(VERSIONS.insert(), rows)
            updates = [
                {"mid": row["model_id"], "ver": row["version"], "wm": row["watermark"], "at": now}
                for row in rows
                if row["state"] == AdapterState.ACTIVE.value
            ]
            if updates:
                conn.execute(_SET_ACTIVE, updates)
            for row in rows:
                out.append(_version_record(_Row(row)))
        return out

    def promote(self, model_id: str, version: int) -> VersionRecord:
        """Make ``version`` the active one (the current active retires), in one transaction."""
        validate_id(model_id)
        now = self.now()
        with self.tx() as conn:
            self.lock_models(conn, [model_id])
            target = self._version_row(conn, model_id, version)
            state = AdapterState(target.state)
            if state.servable:  # already the one that serves
                return _version_record(target)
            if not state.can_become_active:
                raise ConflictError(
                    f"{model_id}@v{version} is {state.value}; only candidate or retired versions can be promoted"
                )
            self._activate(conn, model_id, target, now)
            return _version_record(self._version_row(conn, model_id, version))

    def rollback(
        self, model_id: str, reason: str = "rolled back by operator", *, expected_version: int | None = None
    ) -> VersionRecord | None:
        """Retire the active version and restore the previously active one, in one transaction.

        Returns the restored version, or None when there was no earlier version (the model then
        falls back to its nearest ancestor's adapter, or the base). With ``expected_version``, the
        rollback happens only if that version is still the active one (ConflictError otherwise), so
        two monitors judging the same version never roll back twice.
        """
        validate_id(model_id)
        now = self.now()
        with self.tx() as conn:
            self.lock_models(conn, [model_id])
            current = conn.execute(
                select(VERSIONS).where(
                    VERSIONS.c.model_id == model_id, VERSIONS.c.state == AdapterState.ACTIVE.value
                )
            ).first()
            if current is None:
                raise ConflictError(f"model {model_id!r} has no active version to roll back")
            if expected_version is not None and current.version != expected_version:
                raise ConflictError(
                    f"{model_id}@v{expected_version} is no longer active (v{current.version} is); not rolled back"
                )
            previous = conn.execute(
                select(VERSIONS)
                .where(
                    VERSIONS.c.model_id == model_id,
                    VERSIONS.c.state == AdapterState.RETIRED.value,
                    VERSIONS.c.activated_at.is_not(None),
                    VERSIONS.c.rolled_back_at.is_(None),
                    VERSIONS.c.version < current.version,
                )
                .order_by(VERSIONS.c.activated_at.desc(), VERSIONS.c.version.desc())
                .limit(1)
            ).first()
            conn.execute(
                update(VERSIONS)
                .where(VERSIONS.c.id == current.id)
                .values(state=AdapterState.RETIRED.value, retired_at=now, rolled_back_at=now, reason=reason)
            )
            if previous is None:
                conn.execute(_SET_ACTIVE, [{"mid": model_id, "ver": None, "wm": 0, "at": now}])
                return None
            self._activate(conn, model_id, previous, now)
            return _version_record(self._version_row(conn, model_id, previous.version))

    def _activate(self, conn: Connection, model_id: str, target, now: float) -> None:
        conn.execute(
            update(VERSIONS)
            .where(VERSIONS.c.model_id == model_id, VERSIONS.c.state == AdapterState.ACTIVE.value)
            .values(state=AdapterState.RETIRED.value, retired_at=now)
        )
        conn.execute(
            update(VERSIONS)
            .where(VERSIONS.c.id == target.id)
            .values(state=AdapterState.ACTIVE.value, activated_at=now, retired_at=None)
        )
        conn.execute(
            _SET_ACTIVE, [{"mid": model_id, "ver": target.version, "wm": target.watermark, "at": now}]
        )

    def _version_row(self, conn: Connection, model_id: str, version: int):
        row = conn.execute(
            select(VERSIONS).where(VERSIONS.c.model_id == model_id, VERSIONS.c.version == int(version))
        ).first()
        if row is None:
            raise NotFoundError(f"model {model_id!r} has no version v{version}")
        return row

    def get_version(self, model_id: str, version: int) -> VersionRecord:
        validate_id(model_id)
        with self.read() as conn:
            return _version_record(self._version_row(conn, model_id, version))

    def versions(self, model_id: str) -> list[VersionRecord]:
        validate_id(model_id)
        with self.read() as conn:
            rows = conn.execute(
                select(VERSIONS).where(VERSIONS.c.model_id == model_id).order_by(VERSIONS.c.version)
            ).all()
        return [_version_record(r) for r in rows]

    def version_uris(self) -> set[str]:
        """The store URI of every version row, in any state (what the store must keep)."""
        with self.read() as conn:
            return set(conn.scalars(select(VERSIONS.c.uri).distinct()))

    def active_version(self, model_id: str) -> VersionRecord | None:
        validate_id(model_id)
        with self.read() as conn:
            row = conn.execute(
                select(VERSIONS).where(
                    VERSIONS.c.model_id == model_id, VERSIONS.c.state == AdapterState.ACTIVE.value
                )
            ).first()
        return _version_record(row) if row else None

    def active_stack(self, model_id: str) -> Stack:
        """The model's lineage resolved to active versions, company first, in one query."""
        return self.active_stacks([model_id])[model_id]

    def active_stacks(self, model_ids: Sequence[str]) -> dict[str, Stack]:
        """Resolve many models' stacks in one round trip."""
        wanted = {m: lineage(m) for m in model_ids}
        every = sorted({x for lin in wanted.values() for x in lin})
        with self.read() as conn:
            rows = conn.execute(_STACK_QUERY, {"ids": every}).all()
        by_id = {r.id: r for r in rows}
        out: dict[str, Stack] = {}
        for mid, lin in wanted.items():
            if mid not in by_id:
                raise NotFoundError(f"unknown model {mid!r}; `fleet tenants list` shows the models")
            entries = tuple(
                StackEntry(x, r.version, r.sha256, r.uri, r.rank, r.alpha)
                for x in lin
                if (r := by_id.get(x)) is not None and r.version is not None
            )
            out[mid] = Stack(model_id=mid, base_model=by_id[mid].base_model, entries=entries)
        return out


_STACK_QUERY = (
    select(
        MODELS.c.id,
        MODELS.c.base_model,
        VERSIONS.c.version,
        VERSIONS.c.sha256,
        VERSIONS.c.uri,
        VERSIONS.c.rank,
        VERSIONS.c.alpha,
    )
    .select_from(
        MODELS.outerjoin(
            VERSIONS,
            and_(VERSIONS.c.model_id == MODELS.c.id, VERSIONS.c.state == AdapterState.ACTIVE.value),
        )
    )
    .where(MODELS.c.id.in_(bindparam("ids", expanding=True)))
)


class _Row:
    """Attribute access over a dict, to share the record builder with fetched rows."""

    def __init__(self, d: dict[str, Any]) -> None:
        self.__dict__.update(d)
