"""The registry handle: engine, transactions and shared helpers."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from fleet.errors import NotFoundError
from fleet.registry import db
from fleet.registry.schema import Model
from fleet.types import validate_id

MODELS: Table = Model.__table__  # type: ignore[assignment]
CHUNK = 20_000  # rows per executemany batch in bulk paths


class RegistryCore:
    """Connection handling shared by the registry's parts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @property
    def url(self) -> str:
        return db.describe(self.engine.url)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, so writers queue instead of failing)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(fleet_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (one consistent snapshot under WAL / MVCC)."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    # -- helpers used by several parts --------------------------------------------------------
    @staticmethod
    def now() -> float:
        return time.time()

    def insert_ignoring(self, table: Table, index_elements: Sequence[str]):
        """An INSERT that skips rows conflicting on ``index_elements`` (dedup), for either dialect."""
        ins = postgresql.insert(table) if self.dialect == "postgresql" else sqlite.insert(table)
        return ins.on_conflict_do_nothing(index_elements=list(index_elements))

    def lock_models(self, conn: Connection, model_ids: Iterable[str], *, shared: bool = False) -> list[Any]:
        """Lock model rows (PostgreSQL row locks; SQLite's IMMEDIATE transaction already serializes).

        Locks are taken in id order so that two transactions never wait on each other in a cycle.
        """
        ids = sorted(set(model_ids))
        for mid in ids:
            validate_id(mid)
        if not ids:
            return []
        stmt = select(MODELS).where(MODELS.c.id.in_(ids)).order_by(MODELS.c.id)
        if self.dialect == "postgresql":
            stmt = stmt.with_for_update(read=shared)
        rows = conn.execute(stmt).all()
        found = {r.id for r in rows}
        missing = [m for m in ids if m not in found]
        if missing:
            raise NotFoundError(
                f"unknown model(s): {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}; "
                "`fleet tenants list` shows the models",
                model_ids=missing,
            )
        return rows


def chunks(rows: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(rows), size):
        yield rows[i : i + size]
