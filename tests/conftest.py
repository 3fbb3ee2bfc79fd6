"""Shared fixtures: registries on SQLite and PostgreSQL, a real S3 server (moto), a config.

PostgreSQL tests use the server on 127.0.0.1:5432 (trust auth, database `test`): each
test gets a fresh database that is dropped afterwards. Where no server runs they are
skipped with a message saying so. S3 tests talk to moto's stand-alone server, started as a
separate process on a free loopback port: a real HTTP server speaking the S3 API.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault(
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
)  # as fleet's own Ray processes use (train.controller_poll_s)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _var in ("FLEET_CONFIG", "FLEET_DATA_DIR", "FLEET_DB_URL", "FLEET_STORE_URI"):
    os.environ.pop(_var, None)

PG_ADMIN = os.environ.get("FLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_available() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:  # pragma: no cover - depends on the machine
        return f"no PostgreSQL server at {PG_ADMIN} ({type(exc).__name__}: {str(exc).strip()[:120]})"


_PG_SKIP = _pg_available()


@pytest.fixture
def pg_url():
    """A fresh, empty PostgreSQL database for one test (dropped afterwards)."""
    if _PG_SKIP:
        pytest.skip(_PG_SKIP)
    import psycopg

    name = f"fleet_t_{uuid.uuid4().hex[:12]}"
    admin = PG_ADMIN.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = PG_ADMIN.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def registry_url(request, tmp_path):
    """The registry URL for each supported database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def registry(registry_url):
    from fleet.registry import Registry

    reg = Registry.open_url(registry_url)
    yield reg
    reg.close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's stand-alone S3 server on a free 127.0.0.1 port, as its own process."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            time.sleep(0.1)
    else:  # pragma: no cover
        proc.kill()
        pytest.fail("moto_server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def s3_uri(s3_endpoint):
    """A new empty bucket on the moto server; returns the store URI for it."""
    import boto3

    bucket = f"fleet-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/adapters"


@pytest.fixture
def fleet_config(tmp_path, monkeypatch):
    """A config whose data directory is a temporary one."""
    from fleet.config import load_config

    monkeypatch.chdir(tmp_path)
    return load_config(overrides={"data_dir": str(tmp_path / "fleet-data")}, env={})


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """fleet's tiny offline base, built once per test session (the real build, ≤60 s).

    ``FLEET_TEST_BASE=/path`` reuses an already built base (handy when iterating locally).
    """
    from fleet.base import build_tiny_base

    if os.environ.get("FLEET_TEST_BASE"):
        return Path(os.environ["FLEET_TEST_BASE"])
    return build_tiny_base(tmp_path_factory.mktemp("base") / "tiny", seed=0, progress=False)


def make_config(tmp_path: Path, base: Path, **overrides):
    """A config over a temporary data dir and the session's tiny base."""
    from fleet.config import load_config
    from fleet.demo import TINY_MAX_GENERAL_DNLL

    raw = {"data_dir": str(tmp_path / "fleet-data"), "base": {"path": str(base)}}
    # The tiny base's general text is its own pre-training text (see fleet.demo); tests that
    # set their own tiers set their own caps.
    raw["tiers"] = {
        t: {"drift": {"max_general_dnll": TINY_MAX_GENERAL_DNLL}} for t in ("company", "team", "individual")
    }
    for key, value in overrides.items():
        if key == "tiers":  # per tier, over the caps above
            for tier, fields in value.items():
                raw["tiers"].setdefault(tier, {}).update(fields)
        elif isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    return load_config(overrides=raw, env={})


@pytest.fixture(scope="module")
def ray_local():
    """A real local Ray, once per test module."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    yield ray
    ray.shutdown()
