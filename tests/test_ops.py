"""The control loop end to end on local Ray: a cycle, a cycle killed mid-training and rerun,
a Tune sweep whose winner training then uses, and `fleet eval` on untrained vs trained."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import free_port, make_config

from fleet.data.synth import synthetic_org
from fleet.demo import TINY_MAX_GENERAL_DNLL
from fleet.handles import Fleet
from fleet.types import AdapterState

STEPS = 20


@pytest.fixture(scope="module")
def org():
    return synthetic_org(companies=2, teams_per_company=1, individuals=4, facts_per_model=2, seed=5)


@pytest.fixture(scope="module")
def fl(tmp_path_factory, tiny_base, org):
    tmp = tmp_path_factory.mktemp("ops")
    cfg = make_config(
        tmp,
        tiny_base,
        scheduler={"inventory": [{"profile": "cpu", "count": 2}], "reserve_serving_fraction": 0.0},
        # The tiny base's general text is its own pre-training text: the real-base forgetting cap
        # would freeze every model here (as fleet demo does, TINY_MAX_GENERAL_DNLL).
        tiers={
            t: {"min_interval_s": 0.0, "drift": {"max_general_dnll": TINY_MAX_GENERAL_DNLL}}
            for t in ("company", "team", "individual")
        },
        sweep={"report_every": 2},
        train={"checkpoint_every": 5},
    )
    fleet = Fleet(cfg)
    for t in org.tenants:
        fleet.add_tenant(t.id, shares=float(t.shares))
    fleet.ingestor().ingest_many({m: [i.to_json() for i in org.items_of(m)] for m in org.model_ids})
    yield fleet
    fleet.close()


METRICS: dict[str, int] = {}


@pytest.fixture(scope="module")
def ray_dashboard(fl):
    """A local Ray with its dashboard (Jobs API) and Prometheus export on known ports."""
    import os

    import ray

    from fleet._ray import ray_env

    os.environ.update(ray_env(fl.cfg))
    METRICS["port"] = free_port()
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=free_port(),
        namespace=fl.cfg.ray.namespace,
        log_to_driver=False,
        _metrics_export_port=METRICS["port"],
        _system_config={"metrics_report_interval_ms": 1000},
        runtime_env={"env_vars": ray_env(fl.cfg)},
    )
    url = ctx.dashboard_url
    yield url if url.startswith("http") else f"http://{url}"
    ray.shutdown()


@pytest.fixture(scope="module")
def facts(fl, org):
    return org.fact_cases()


@pytest.fixture(scope="module")
def untrained_eval(fl, facts):
    from fleet.ops.evaluate import evaluate

    return evaluate(fl, facts, models=4)


def test_killed_cycle_then_rerun_publishes_every_member_once(fl, org, ray_dashboard, untrained_eval):
    from fleet._ray import job_client, wait_job
    from fleet.ops.cycle import run_cycle, submit_cycle
    from fleet.status import collect_status

    client = job_client(fl.cfg, ray_dashboard)
    cycle_id, name, meta = submit_cycle(fl, client, config_path=None, steps=STEPS)
    assert meta["models"] == len(org.model_ids) and meta["packs"] >= 1
    info = client.get_job_info(name)
    assert info.metadata["cycle_id"] == str(cycle_id)
    runs_dir = Path(fl.cfg.runs_path)
    # Wait until a pack has checkpointed mid-run, then kill the cycle (the deadline only bounds a
    # failure: a busy machine takes minutes to start a Train worker).
    deadline = time.time() + 900
    while time.time() < deadline:
        if list(runs_dir.glob(f"pack-{cycle_id}-*/checkpoint_*")):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"cycle job {name} never started training: {client.get_job_logs(name)[-2000:]}")
    client.stop_job(name)
    assert wait_job(client, name, timeout_s=600) in ("STOPPED", "FAILED")
    half = {m: len(fl.registry.versions(m)) for m in org.model_ids}

    # The next cycle (a job, as `fleet run` submits it) picks up what is still pending.
    next_id, next_name, _ = submit_cycle(fl, client, config_path=None, steps=STEPS)
    assert wait_job(client, next_name, timeout_s=1500) == "SUCCEEDED", client.get_job_logs(next_name)[-3000:]
    out = fl.registry.get_cycle(next_id)["summary"]
    assert fl.registry.get_cycle(cycle_id)["status"] == "failed"  # marked interrupted
    killed_runs = fl.registry.list_runs(cycle_id=cycle_id)
    assert killed_runs and {r.status for r in killed_runs} <= {"failed", "succeeded"}
    st = collect_status(fl, serving=False)
    (killed,) = [c for c in st["cycles"] if c["id"] == cycle_id]
    assert any(p.startswith("interrupted") for p in killed["problems"])
    text = _render(st)
    assert f"cycle {cycle_id}: interrupted" in text
    assert out["failed_packs"] == 0
    for m in org.model_ids:
        versions = fl.registry.versions(m)
        assert len(versions) == 1, (m, versions, half)
        assert versions[0].state in (AdapterState.ACTIVE, AdapterState.REJECTED)
    assert out["published"] + sum(half.values()) >= len(org.individuals)
    usage = fl.registry.usage_since(0)
    assert set(usage) == set(org.companies) and all(v > 0 for v in usage.values())

    # Nothing new arrived: the next cycle schedules nothing.
    again = run_cycle(fl, steps=STEPS)
    assert again.summary.get("packs", 0) == 0 and again.summary["scheduled"] == 0


def _render(st) -> str:
    import io

    from rich.console import Console

    from fleet.status import render_status

    buf = io.StringIO()
    render_status(st, Console(file=buf, width=200, color_system=None))
    return buf.getvalue()


def test_control_loop_metrics_reach_prometheus(fl, org, ray_dashboard):
    """The cycles above recorded scheduler, training and cycle metrics in this process; Ray's
    Prometheus export on this node serves them, with bounded tags only (never a model id)."""
    import re
    import urllib.request

    want = {
        "ray_fleet_scheduler_queue_depth",
        "ray_fleet_scheduler_scheduled_models",
        "ray_fleet_scheduler_fairness_jain",
        "ray_fleet_train_gpu_seconds_total",
        "ray_fleet_train_runs_total",
        "ray_fleet_train_members_total",
        "ray_fleet_cycles_total",
    }
    deadline, found, text = time.time() + 300, set(), ""  # bounds a failure only
    while time.time() < deadline and found != want:
        text = (
            urllib.request.urlopen(f"http://127.0.0.1:{METRICS['port']}/metrics", timeout=5).read().decode()
        )
        found = {n for n in want if re.search(rf"^{n}[{{ ]", text, re.M)}
        time.sleep(1)
    assert found == want, sorted(want - found)
    fleet_lines = [line for line in text.splitlines() if line.startswith("ray_fleet_")]
    assert any(
        'tier="individual"' in line for line in fleet_lines if line.startswith("ray_fleet_train_gpu_seconds")
    )
    assert any(
        'status="succeeded"' in line for line in fleet_lines if line.startswith("ray_fleet_cycles_total")
    )
    assert not [line for line in fleet_lines for m in org.model_ids if f'"{m}"' in line]


def test_eval_trained_beats_base(fl, facts, untrained_eval, ray_dashboard):
    from fleet.ops.evaluate import evaluate

    before = untrained_eval
    # No adapters yet: the base answers (the held-out cloze is a wording no item uses).
    assert before["recall_heldout"] == before["methods"]["base"]["rate"]
    after = evaluate(fl, facts, models=4)
    trained, base = after["methods"]["trained"], after["methods"]["base"]
    assert trained["trials"] == base["trials"] == after["questions"] > 0
    assert after["recall_heldout"] >= before["recall_heldout"] + 0.2, after["examples"]
    assert after["recall_heldout"] > base["rate"] + 0.2
    assert after["token_ratio_vs_full_context"] > 1.5 and after["token_ratio_vs_bm25_top3"] > 1.0
    assert after["leak_rate"] <= 0.25 and after["leak_trials"] > 0
    # Every leak counted is listed with the model that said it, outside its owner's subtree.
    assert len(after["leak_hits"]) == round(after["leak_rate"] * after["leak_trials"])
    for hit in after["leak_hits"]:
        assert not hit["model"].startswith(hit["owner"]) and hit["reply"], hit
    assert abs(after["general_dnll_nats"]) < 1.0
    lo, hi = trained["ci95"]
    assert lo <= trained["rate"] <= hi


def test_sweep_applies_a_schedule_that_training_uses(fl, ray_dashboard, tmp_path):
    from fleet.ops.sweep import run_sweep
    from fleet.train.pack import build_pack, tier_schedule

    before = tier_schedule(fl.cfg, fl.registry, "individual")
    res = run_sweep(
        fl, tier="individual", samples=2, models=2, apply=True, steps=6, plot=str(tmp_path / "s.png")
    )
    assert len(res.trials) == 2 and res.best is not None
    assert all(t["objective"] is not None for t in res.trials if not t["error"])
    assert res.applied_version == 1
    stored = fl.registry.tier_schedule("individual")
    assert stored["params"]["lr"] == pytest.approx(res.best["params"]["lr"])
    after = tier_schedule(fl.cfg, fl.registry, "individual")
    assert after.lr == pytest.approx(res.best["params"]["lr"]) and after.lr != before.lr
    fl.ingestor().ingest_items(
        fl.registry.list_models(tier="individual")[0].id,
        [{"kind": "document", "text": "A new note arrives after the sweep."}],
    )
    pack = build_pack(fl, [fl.registry.list_models(tier="individual")[0].id], cycle_id=99, index=0)
    assert pack.members[0].learning_schedule.lr == pytest.approx(res.best["params"]["lr"])
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_a_live_cycle_blocks_the_next_and_a_silent_one_is_closed(fl):
    """Two cycles at once would train the same pending data: a cycle whose heartbeat is fresh
    stops the next from starting; one silent for four beats (its process died) is closed."""
    from fleet.errors import ConflictError
    from fleet.ops.cycle import prepare_cycle

    reg = fl.registry
    live = reg.start_cycle()
    with pytest.raises(
        ConflictError, match=f"cycle {live} is still running.*ray job stop fleet-cycle-{live}"
    ):
        prepare_cycle(fl)
    run_id = reg.create_run(f"pack-{live}-0", base_model=fl.base_name, members=[], cycle_id=live)
    reg.beat_cycle(live, at=reg.now() - 4 * fl.cfg.scheduler.cycle_heartbeat_s - 1)
    new_id, _ = prepare_cycle(fl)
    try:
        closed = reg.get_cycle(live)
        assert closed["status"] == "failed" and closed["summary"]["interrupted"] is True
        assert reg.get_run(run_id).status == "failed" and "interrupted" in reg.get_run(run_id).error
        assert reg.get_cycle(new_id)["status"] == "running"
    finally:
        from fleet.types import RunStatus

        reg.finish_cycle(new_id, RunStatus.SUCCEEDED, {})


def test_of_two_cycles_started_at_once_the_older_goes_on(fl, monkeypatch):
    """Both processes checked before either had registered its cycle (the check skipped here to
    play that interleaving): the one registered second yields and records why."""
    import fleet.ops.cycle as cycle_mod
    from fleet.errors import ConflictError
    from fleet.types import RunStatus

    reg = fl.registry
    older = reg.start_cycle()
    monkeypatch.setattr(cycle_mod, "_close_interrupted", lambda fl: None)
    with pytest.raises(ConflictError, match=f"cycle {older} started at the same time"):
        cycle_mod.prepare_cycle(fl)
    (newer,) = [c for c in reg.list_cycles(limit=5) if c["id"] > older]
    assert newer["status"] == "failed" and newer["summary"]["error"] == f"cycle {older} started first"
    assert reg.get_cycle(older)["status"] == "running"
    reg.finish_cycle(older, RunStatus.SUCCEEDED, {})


def test_a_job_is_submitted_once_the_clusters_agent_is_up_and_other_errors_are_not_retried(fl):
    """A stand-in for Ray's JobSubmissionClient (a just-started cluster's missing agent cannot be
    produced on demand): it refuses as Ray does until its agent is up."""
    from fleet._ray import submit_job

    class Client:
        def __init__(self, refusals: int, error: str):
            self.refusals, self.error, self.calls = refusals, error, 0

        def submit_job(self, **kw):
            self.calls += 1
            if self.calls <= self.refusals:
                raise RuntimeError(self.error)
            return kw["submission_id"]

    starting = Client(
        2, "Request failed with status code 500: No available agent to submit job, please try again later.."
    )
    assert submit_job(starting, fl.cfg, name="j1", args=["status"], metadata={}, config_path=None) == "j1"
    assert starting.calls == 3
    broken = Client(1, "Request failed with status code 400: bad runtime_env")
    with pytest.raises(RuntimeError, match="bad runtime_env"):
        submit_job(broken, fl.cfg, name="j2", args=["status"], metadata={}, config_path=None)
    assert broken.calls == 1
    never = Client(99, "No available agent to submit job")
    with pytest.raises(RuntimeError, match="No available agent"):
        submit_job(never, fl.cfg, name="j3", args=["status"], metadata={}, config_path=None, agent_wait_s=1.0)
