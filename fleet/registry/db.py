"""Opening the registry database: URL handling, SQLite pragmas, retries, migrations."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.exc import InterfaceError as SAInterfaceError

from fleet.config import redact
from fleet.errors import ConfigError, UnavailableError

_MIGRATIONS = Path(__file__).parent / "migrations"
log = logging.getLogger(__name__)


def normalize_url(url: str) -> URL:
    """Parse a registry URL; ``postgresql://`` means the psycopg 3 driver fleet ships with."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(
            f"registry URL {redact(url)!r} is not a database URL; use sqlite:///path/fleet.db or "
            "postgresql://user@host:5432/db"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"registry URL {describe(parsed)!r}: only SQLite and PostgreSQL are supported")
    return parsed


def describe(url: URL) -> str:
    """The URL with any password hidden, for error messages and logs."""
    return url.render_as_string(hide_password=True)


def finite_json(value: Any) -> str:
    """JSON of a value with every NaN and ±Infinity as null: a diverged member's metrics are stored
    (PostgreSQL's json type rejects NaN, and a NaN would otherwise abort the whole transaction)."""
    return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def create_registry_engine(url: str, *, busy_timeout_ms: int, pool_size: int, echo: bool) -> Engine:
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            echo=echo,
            json_serializer=finite_json,
            connect_args={"timeout": busy_timeout_ms / 1000, "check_same_thread": False},
        )
        _sqlite_events(engine, busy_timeout_ms)
    else:
        engine = create_engine(
            parsed,
            echo=echo,
            json_serializer=finite_json,
            pool_size=pool_size,
            pool_pre_ping=True,
            connect_args={"connect_timeout": 5},
        )
    return engine


def _sqlite_events(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        # Take transaction control from the driver so that writers can BEGIN IMMEDIATE:
        # a deferred transaction that later upgrades to a write lock fails instead of waiting.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("fleet_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


def wait_until_reachable(engine: Engine, attempts: int) -> None:
    """Connect with bounded exponential backoff; name the endpoint when it stays unreachable."""
    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return
        except (OperationalError, SAInterfaceError) as exc:
            if attempt == attempts:
                raise UnavailableError(
                    f"registry database {describe(engine.url)} is unreachable after {attempts} attempts: "
                    f"{str(exc.orig).strip().splitlines()[0] if exc.orig else exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def _alembic_config(conn: Connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    cfg.attributes["connection"] = conn
    return cfg


def _head() -> str:
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)  # type: ignore[arg-type]
    return ScriptDirectory.from_config(cfg).get_current_head()


def _current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    """Serialize migrations between processes opening a fresh registry at the same time."""
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(7242001)"))
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(7242001)"))
                conn.commit()
        return
    database = engine.url.database
    if not database or database == ":memory:":
        yield
        return
    with open(f"{database}.migrate.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (no-op when it is current)."""
    head = _head()
    if _current(engine) == head:
        return
    from alembic import command

    logging.getLogger("alembic").setLevel(logging.WARNING)
    with _migration_lock(engine):
        if _current(engine) == head:
            return
        with engine.begin() as conn:
            command.upgrade(_alembic_config(conn), "head")
    log.info("registry %s migrated to %s", describe(engine.url), head)
