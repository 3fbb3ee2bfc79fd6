"""Registry behaviour on SQLite and PostgreSQL (every test runs on both)."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from fleet.errors import (
    AuthError,
    ConflictError,
    InvalidIdError,
    NotFoundError,
    UnavailableError,
    ValidationError,
)
from fleet.registry import NewItem, PublishRequest, Registry
from fleet.registry._versions import VERSIONS
from fleet.store import LocalStore
from fleet.types import AdapterState, DriftState

BASE = "tiny"


def _org(reg: Registry) -> None:
    reg.add_tenants(
        [
            ("acme", 2.0),
            ("acme/search", 1.0),
            ("acme/search/dana", 1.0),
            ("acme/search/li", 1.0),
            ("beta", 1.0),
        ],
        base_model=BASE,
        rank=8,
        alpha=16.0,
    )


def _stage(store: LocalStore, model_id: str, payload: bytes = b"w"):
    return store.stage(model_id, b'{"r": 8}', payload + model_id.encode())


def _pub(reg, store, model_id, *, state=AdapterState.ACTIVE, watermark=0, run_id=None):
    return reg.publish_versions(
        store,
        [
            PublishRequest(
                model_id=model_id,
                staged=_stage(store, model_id),
                rank=8,
                alpha=16.0,
                base_model=BASE,
                state=state,
                watermark=watermark,
                run_id=run_id,
            )
        ],
    )


@pytest.fixture
def store(tmp_path):
    return LocalStore(tmp_path / "adapters")


def test_tenant_tree_and_models(registry):
    _org(registry)
    m = registry.get_model("acme/search/dana")
    assert (m.company_id, m.team_id, m.tier) == ("acme", "acme/search", "individual")
    assert registry.get_model("acme/search").team_id is None
    assert registry.children("acme") == ["acme/search"]
    assert registry.get_tenant("acme").shares == 2.0
    assert registry.count_models() == 5


def test_tenant_errors(registry):
    _org(registry)
    with pytest.raises(NotFoundError, match="parent tenant 'nope' does not exist"):
        registry.add_tenant("nope/team", base_model=BASE, rank=8, alpha=16)
    with pytest.raises(ConflictError, match="already exists"):
        registry.add_tenant("acme", base_model=BASE, rank=8, alpha=16)
    with pytest.raises(ValidationError, match="shares must be a positive number"):
        registry.add_tenant("gamma", base_model=BASE, rank=8, alpha=16, shares=-1)
    for bad in ["../x", "a/../../b", "Acme", "a/b/c/d", "", "-a", "a//b", "a/b/"]:
        with pytest.raises(InvalidIdError):
            registry.add_tenant(bad, base_model=BASE, rank=8, alpha=16)
    with pytest.raises(NotFoundError, match="unknown model 'acme/zzz'"):
        registry.get_model("acme/zzz")
    # A failed batch leaves nothing behind.
    with pytest.raises(NotFoundError):
        registry.add_tenants([("gamma", 1.0), ("gamma/a/b", 1.0)], base_model=BASE, rank=8, alpha=16)
    with pytest.raises(NotFoundError):
        registry.get_model("gamma")


def test_publish_resolve_promote_rollback(registry, store):
    _org(registry)
    assert registry.active_stack("acme/search/dana").served_by == "base"
    (c1,) = _pub(registry, store, "acme")
    stack = registry.active_stack("acme/search/dana")
    assert [e.key for e in stack.entries] == ["acme@v1"]  # falls back to the nearest ancestor
    assert stack.served_by == "acme@v1"
    _pub(registry, store, "acme/search/dana")
    (d2,) = _pub(registry, store, "acme/search/dana")
    stack = registry.active_stack("acme/search/dana")
    assert [e.key for e in stack.entries] == ["acme@v1", "acme/search/dana@v2"]
    assert registry.get_version("acme/search/dana", 1).state is AdapterState.RETIRED
    # files are where the layout says, and verify
    files = store.read_version(d2.uri, d2.sha256)
    assert d2.uri.endswith("acme/search/dana/v2")
    assert files.weights == b"wacme/search/dana"

    restored = registry.rollback("acme/search/dana", reason="drift")
    assert restored is not None and restored.version == 1
    assert registry.active_stack("acme/search/dana").served_by == "acme/search/dana@v1"
    v2 = registry.get_version("acme/search/dana", 2)
    assert v2.state is AdapterState.RETIRED and v2.rolled_back_at is not None and v2.reason == "drift"
    # rolling back again has no earlier version: the model falls back to its ancestors
    assert registry.rollback("acme/search/dana") is None
    assert registry.active_stack("acme/search/dana").served_by == "acme@v1"
    assert registry.get_model("acme/search/dana").active_version is None
    with pytest.raises(ConflictError, match="no active version"):
        registry.rollback("acme/search/dana")
    # promote a retired version explicitly
    registry.promote("acme/search/dana", 2)
    assert registry.active_stack("acme/search/dana").served_by == "acme/search/dana@v2"
    with pytest.raises(NotFoundError):
        registry.promote("acme/search/dana", 9)


def test_exactly_one_active_is_enforced_by_the_database(registry, store):
    _org(registry)
    _pub(registry, store, "beta")
    with pytest.raises(SAIntegrityError), registry.tx() as conn:
        conn.execute(
            insert(VERSIONS).values(
                model_id="beta",
                version=7,
                state="active",
                sha256="0" * 64,
                uri="x",
                size_bytes=1,
                rank=8,
                alpha=16.0,
                base_model=BASE,
                parents=[],
                watermark=0,
                metrics={},
                created_at=0.0,
            )
        )
    assert [v.version for v in registry.versions("beta")] == [1]


def test_rejected_and_candidate_versions(registry, store):
    _org(registry)
    (rej,) = _pub(registry, store, "beta", state=AdapterState.REJECTED)
    assert rej.state is AdapterState.REJECTED
    assert registry.active_stack("beta").served_by == "base"
    with pytest.raises(ConflictError, match="rejected"):
        registry.promote("beta", 1)
    _pub(registry, store, "beta", state=AdapterState.CANDIDATE)
    assert registry.active_stack("beta").served_by == "base"
    registry.promote("beta", 2)
    assert registry.active_stack("beta").served_by == "beta@v2"


def test_publication_is_all_or_nothing_and_idempotent(registry, store):
    _org(registry)

    class FailingStore(LocalStore):
        def commit(self, staged, version):
            if staged.model_id == "acme/search/li":
                raise OSError("disk full")
            return super().commit(staged, version)

    failing = FailingStore(store.root)
    reqs = [
        PublishRequest(model_id=m, staged=_stage(store, m), rank=8, alpha=16, base_model=BASE, run_id=42)
        for m in ("acme/search/dana", "acme/search/li")
    ]
    with pytest.raises(OSError):
        registry.publish_versions(failing, reqs)
    assert registry.versions("acme/search/dana") == []  # nothing half-published
    reqs = [
        PublishRequest(model_id=m, staged=_stage(store, m), rank=8, alpha=16, base_model=BASE, run_id=42)
        for m in ("acme/search/dana", "acme/search/li")
    ]
    assert len(registry.publish_versions(store, reqs)) == 2
    again = [
        PublishRequest(model_id=m, staged=_stage(store, m), rank=8, alpha=16, base_model=BASE, run_id=42)
        for m in ("acme/search/dana", "acme/search/li")
    ]
    assert registry.publish_versions(store, again) == []  # the same run never publishes twice
    assert [v.version for v in registry.versions("acme/search/li")] == [1]


def test_items_dedup_pending_and_watermark(registry, store):
    _org(registry)
    items = [NewItem("document", f"text {i}", 10 + i, f"{i:064x}") for i in range(5)]
    (c,) = registry.add_items({"acme/search/dana": items + items[:2]})
    assert (c.inserted, c.duplicates, c.tokens) == (5, 2, 60)
    (c,) = registry.add_items({"acme/search/dana": items[:3]})
    assert (c.inserted, c.duplicates) == (0, 3)
    m = registry.get_model("acme/search/dana")
    assert (m.pending_tokens, m.total_tokens, m.item_count) == (60, 60, 5)

    snap = registry.training_snapshot(["acme/search/dana"])["acme/search/dana"]
    assert len(snap.new_items) == 5 and snap.old_items == []
    # items arriving after the snapshot stay pending once the version is published
    registry.add_items({"acme/search/dana": [NewItem("feedback", "late", 7, "f" * 64)]})
    _pub(registry, store, "acme/search/dana", watermark=snap.snapshot_max_id)
    m = registry.get_model("acme/search/dana")
    assert m.watermark == snap.snapshot_max_id and m.pending_tokens == 7

    snap2 = registry.training_snapshot(["acme/search/dana"], replay_fraction=0.5)["acme/search/dana"]
    assert [it.text for it in snap2.new_items] == ["late"]
    assert len(snap2.old_items) == 1  # half of the data is replay
    with pytest.raises(NotFoundError):
        registry.add_items({"ghost": items})


def test_api_keys(registry):
    _org(registry)
    key = registry.create_key("acme", name="ci")
    assert registry.authenticate(key) == "acme"
    assert "acme" not in key and key.startswith("fleet_")
    for bad in [None, "", "nope", "fleet_x_y", key[:-1] + ("A" if key[-1] != "A" else "B")]:
        with pytest.raises(AuthError):
            registry.authenticate(bad)
    with pytest.raises(ValidationError, match="belong to companies"):
        registry.create_key("acme/search")
    with pytest.raises(NotFoundError):
        registry.create_key("nobody")
    prefix = key.split("_")[1]
    registry.revoke_key(prefix)
    with pytest.raises(AuthError):
        registry.authenticate(key)
    keys = registry.list_keys("acme")
    assert keys and all("sha" not in k for k in keys[0])


def test_usage_schedules_runs_summary(registry):
    _org(registry)
    now = 1_000_000.0
    registry.record_usage(
        [
            {"company_id": "acme", "gpu_seconds": 100.0, "recorded_at": now},
            {"company_id": "acme", "gpu_seconds": 100.0, "recorded_at": now - 3600},
            {"company_id": "beta", "gpu_seconds": 50.0, "recorded_at": now},
        ]
    )
    dec = registry.decayed_usage(now=now, half_life_s=3600)
    assert dec["acme"] == pytest.approx(150.0, rel=0.05)
    assert dec["beta"] == pytest.approx(50.0, rel=0.05)
    assert registry.usage_since(now - 10) == {"acme": 100.0, "beta": 50.0}
    assert registry.tier_schedule("team") is None
    assert registry.set_tier_schedule("team", {"lr": 0.01}, source="sweep 1") == 1
    assert registry.set_tier_schedule("team", {"lr": 0.02}) == 2
    assert registry.tier_schedule("team")["params"] == {"lr": 0.02}
    run = registry.create_run("pack-0-0", base_model=BASE, members=["acme"])
    from fleet.types import RunStatus

    registry.finish_run(run, RunStatus.SUCCEEDED, metrics={"steps": 3})
    assert registry.get_run(run).metrics == {"steps": 3}
    registry.set_drift_state("beta", DriftState.FROZEN)
    s = registry.summary()
    assert s["tiers"]["company"]["models"] == 2 and s["tiers"]["company"]["frozen"] == 1


def test_non_finite_metrics_are_stored_as_null(registry, store):
    """A diverged member's NaN loss is recorded (as null) with its version and run, on PostgreSQL too
    (its json type rejects NaN, which used to abort the whole publication)."""
    from fleet.types import RunStatus

    _org(registry)
    nan, inf = float("nan"), float("inf")
    run = registry.create_run("pack-0-0", base_model=BASE, members=["acme"])
    (v,) = registry.publish_versions(
        store,
        [
            PublishRequest(
                "acme", _stage(store, "acme"), 8, 16.0, BASE, state=AdapterState.REJECTED,
                metrics={"heldout_after": nan, "curve": [1.0, -inf], "nested": {"kl": inf}}, reason="diverged",
            )
        ],
    )  # fmt: skip
    assert registry.get_version("acme", v.version).metrics == {
        "heldout_after": None,
        "curve": [1.0, None],
        "nested": {"kl": None},
    }
    registry.finish_run(run, RunStatus.SUCCEEDED, metrics={"loss": nan, "steps": 3})
    assert registry.get_run(run).metrics == {"loss": None, "steps": 3}


def test_unreachable_database_names_the_endpoint():
    with pytest.raises(UnavailableError, match=r"127\.0\.0\.1:1/nowhere.*unreachable after 2 attempts"):
        Registry.open_url("postgresql://fleet:secret@127.0.0.1:1/nowhere", connect_attempts=2)
    try:
        Registry.open_url("postgresql://fleet:secret@127.0.0.1:1/nowhere", connect_attempts=1)
    except UnavailableError as exc:
        assert "secret" not in str(exc)


def _ingest_worker(args):
    url, worker, n = args
    reg = Registry.open_url(url)
    for i in range(n):
        reg.add_items(
            {"acme/search/dana": [NewItem("document", f"w{worker} i{i}", 3, f"{worker:032x}{i:032x}")]}
        )
    reg.close()


def test_concurrent_ingestion_loses_no_rows(registry_url):
    reg = Registry.open_url(registry_url)
    _org(reg)
    ctx = mp.get_context("spawn")
    with ctx.Pool(8) as pool:
        pool.map(_ingest_worker, [(registry_url, w, 15) for w in range(8)])
    m = reg.get_model("acme/search/dana")
    assert (m.item_count, m.total_tokens, m.pending_tokens) == (120, 360, 360)
    assert len(reg.items("acme/search/dana")) == 120
    reg.close()


def test_demand_columns_read_every_model_in_one_scan(registry, store):
    """The scheduler's view: tier codes, teams (a team model is its own team), pending tokens and
    their age, staleness, frozen models, decayed usage — on SQLite and PostgreSQL alike."""
    from fleet.scheduler.demand import TIER_CODE

    _org(registry)
    registry.add_items({"acme/search/dana": [NewItem("document", "x", 40, "a" * 64)]}, received_at=1000.0)
    _pub(registry, store, "acme/search/li")
    registry.set_drift_state("beta", DriftState.FROZEN)
    now = registry.now() + 100.0
    registry.record_model_usage({"acme": 8.0}, now=now - 10.0, half_life_s=10.0)
    cols = registry.demand_columns(now=now, half_life_s=10.0)
    row = {mid: i for i, mid in enumerate(cols["model_id"].tolist())}
    assert set(row) == {"acme", "acme/search", "acme/search/dana", "acme/search/li", "beta"}
    tier = {m: int(cols["tier"][i]) for m, i in row.items()}
    assert tier == {
        "acme": TIER_CODE["company"],
        "acme/search": TIER_CODE["team"],
        "beta": TIER_CODE["company"],
        "acme/search/dana": TIER_CODE["individual"],
        "acme/search/li": TIER_CODE["individual"],
    }
    team = {m: cols["team"][i] for m, i in row.items()}
    assert team == {
        "acme": "",
        "beta": "",
        "acme/search": "acme/search",
        "acme/search/dana": "acme/search",
        "acme/search/li": "acme/search",
    }
    assert [cols["company"][row[m]] for m in ("acme/search/li", "beta")] == ["acme", "beta"]
    assert cols["pending_tokens"][row["acme/search/dana"]] == 40
    assert cols["pending_tokens"][row["acme/search/li"]] == 0
    assert cols["pending_age_s"][row["acme/search/dana"]] == pytest.approx(now - 1000.0)
    assert cols["pending_age_s"][row["acme/search/li"]] == 0.0
    assert cols["since_last_s"][row["acme/search/dana"]] == float("inf")  # never trained
    assert 0.0 <= cols["since_last_s"][row["acme/search/li"]] <= 100.0 + 5.0
    assert cols["frozen"].tolist() == [m == "beta" for m in cols["model_id"].tolist()]
    assert cols["usage_gpu_s"][row["acme"]] == pytest.approx(4.0)  # one half-life later
    assert cols["rank"][row["acme"]] == 8
