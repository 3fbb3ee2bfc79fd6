"""The registry: tenants, models, adapter versions, context, keys, runs, drift history.

One SQL database (SQLite by default, PostgreSQL in production) opened through
SQLAlchemy 2; the schema is migrated by Alembic automatically on open.

    from fleet.registry import Registry
    reg = Registry.open(cfg)                  # or Registry.open_url("postgresql://…")
    reg.add_tenant("acme", base_model=…, rank=8, alpha=16)
    stack = reg.active_stack("acme/search/dana")
"""

from __future__ import annotations

from fleet.config import FleetConfig
from fleet.registry import db
from fleet.registry._context import ContextMixin, IngestCount, NewItem
from fleet.registry._demand import DemandMixin
from fleet.registry._drift import DriftMixin
from fleet.registry._keys import KeysMixin, key_prefix, well_formed_key
from fleet.registry._ops import OpsMixin
from fleet.registry._tenants import TenantsMixin
from fleet.registry._versions import PublishRequest, VersionsMixin
from fleet.registry.records import (
    ModelRecord,
    RunRecord,
    SnapshotItem,
    Stack,
    StackEntry,
    TenantRecord,
    TrainingSnapshot,
    VersionRecord,
)

__all__ = [
    "key_prefix",
    "well_formed_key",
    "IngestCount",
    "ModelRecord",
    "NewItem",
    "PublishRequest",
    "Registry",
    "RunRecord",
    "Stack",
    "StackEntry",
    "TenantRecord",
    "SnapshotItem",
    "TrainingSnapshot",
    "VersionRecord",
]


class Registry(TenantsMixin, VersionsMixin, ContextMixin, KeysMixin, OpsMixin, DemandMixin, DriftMixin):
    """A handle on the registry database. Cheap to share within a process; open one per process."""

    @classmethod
    def open_url(
        cls,
        url: str,
        *,
        busy_timeout_ms: int = 30_000,
        pool_size: int = 5,
        connect_attempts: int = 4,
        echo: bool = False,
        migrate: bool = True,
    ) -> Registry:
        engine = db.create_registry_engine(
            url, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size, echo=echo
        )
        db.wait_until_reachable(engine, connect_attempts)
        if migrate:
            db.migrate(engine)
        return cls(engine)

    @classmethod
    def open(cls, cfg: FleetConfig, *, migrate: bool = True) -> Registry:
        r = cfg.registry
        return cls.open_url(
            cfg.registry_url,
            busy_timeout_ms=r.busy_timeout_ms,
            pool_size=r.pool_size,
            connect_attempts=r.connect_attempts,
            echo=r.echo,
            migrate=migrate,
        )
