"""The drift monitor on a real local Ray (started once for this module, with its dashboard for the
Jobs API and a Prometheus endpoint): ``fleet drift watch`` as a Ray job that keeps scanning until
it is stopped, with metadata naming the probe set; the drift metrics it exports carry bounded tags
only, never a model id."""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from conftest import free_port
from test_divergence_monitor import add, make_fleet, publish, save_base

from fleet.divergence.telemetry import ALLOWED_TAGS, SPECS
from fleet.types import DriftState

MODELS = ("acme", "acme/search", "acme/search/dana", "beta")
RAY_LABELS = {"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "JobId", "le"}


@pytest.fixture(scope="module")
def cluster():
    import ray

    metrics_port = free_port()
    ctx = ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_port=free_port(),
        namespace="fleet",
        log_to_driver=False,
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 1000},
        runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}},
    )
    url = ctx.dashboard_url if ctx.dashboard_url.startswith("http") else f"http://{ctx.dashboard_url}"
    yield url, metrics_port
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("drift-ray")
    fl = make_fleet(tmp, save_base(tmp / "base"), caps={"company": {"max_kl": 0.5}})
    add(fl, *MODELS)
    for i, m in enumerate(MODELS):
        publish(fl, m, seed=i, std=0.6 if m == "beta" else 0.02)  # beta runs away: frozen
    yield fl, str(tmp / "fleet.yaml")
    fl.close()


def _labels(line: str) -> dict[str, str]:
    if "{" not in line:
        return {}
    return dict(re.findall(r'(\w+)="([^"]*)"', line.split("{", 1)[1].rsplit("}", 1)[0]))


def _drift_series(port: int) -> list[str]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return [line for line in text.splitlines() if line.startswith("ray_fleet_drift_")]


def test_watch_runs_as_a_ray_job_until_stopped_and_exports_bounded_metrics(cluster, fleet):
    from fleet._ray import wait_job
    from fleet.divergence.watch import submit_watch

    url, port = cluster
    fl, config_path = fleet
    client, name, meta = submit_watch(fl, every_s=2.0, config_path=config_path, dashboard_url=url)
    assert name.startswith("fleet-drift-watch-") and meta["probe_set"] == "fleet-tiny-llama-probes-v1"
    info = client.get_job_info(name)
    assert info.metadata["probe_set"] == meta["probe_set"] and info.metadata["fleet"] == "drift-watch"
    try:
        deadline, series = time.time() + 240, []
        while time.time() < deadline:  # until the job scanned everything and its metrics arrived
            status = str(client.get_job_status(name)).split(".")[-1]
            assert status in ("PENDING", "RUNNING"), client.get_job_logs(name)[-3000:]
            series = _drift_series(port)
            names = {
                re.match(r"ray_(fleet_drift_\w+?)(_total|_bucket|_sum|_count)?\{", s).group(1) for s in series
            }
            if {"fleet_drift_kl", "fleet_drift_models_scored", "fleet_drift_actions"} <= names:
                break
            time.sleep(2)
        else:
            pytest.fail(f"no drift metrics from the watch job: {client.get_job_logs(name)[-3000:]}")
        deadline = time.time() + 120
        while ": 0 scored" not in client.get_job_logs(name):  # a later scan: the job keeps scanning
            assert time.time() < deadline, client.get_job_logs(name)[-3000:]
            time.sleep(1)
        assert str(client.get_job_status(name)).split(".")[-1] == "RUNNING"
    finally:
        client.stop_job(name)
    assert wait_job(client, name, timeout_s=60) == "STOPPED"
    logs = client.get_job_logs(name)
    assert "scan on fleet-tiny-llama-probes-v1: 4 scored, 0 warned, 1 frozen" in logs
    assert ": 0 scored" in logs  # the later scans found nothing new
    assert fl.registry.get_model("beta").drift_state is DriftState.FROZEN
    assert {s["model_id"] for s in fl.registry.drift_samples()} == set(MODELS)

    for line in series:
        extra = {k for k in _labels(line) if not k.startswith("otel_")} - ALLOWED_TAGS - RAY_LABELS
        assert not extra, line
        for value in _labels(line).values():
            assert "@v" not in value and value not in MODELS, line
    tags = {k: v for line in series for k, v in _labels(line).items()}
    assert tags["base_model"] == "fleet-tiny-llama"
    relations = {_labels(s).get("relation") for s in series if s.startswith("ray_fleet_drift_kl")}
    assert relations == {"base", "parent"}
    assert {_labels(s).get("action") for s in series if s.startswith("ray_fleet_drift_actions")} == {"freeze"}
    assert all(set(s.tag_keys) <= ALLOWED_TAGS and "model_id" not in s.tag_keys for s in SPECS.values())


def test_watch_loop_scans_on_the_interval_and_survives_a_failed_scan(cluster, fleet):
    from fleet.divergence.watch import watch_loop

    fl, _ = fleet
    lines, sleeps = [], []
    done = watch_loop(fl, every_s=60.0, scans=2, emit=lines.append, sleep=sleeps.append)
    assert len(done) == 2 and len(sleeps) == 1 and 0 < sleeps[0] <= 60.0
    assert all("0 scored" in line for line in lines)  # the job above scored everything already
    bad = watch_loop(fl, every_s=60.0, probe_set="nope-v1", scans=1, emit=lines.append, sleep=sleeps.append)
    assert bad[0].errors and "scan failed: no probe set 'nope-v1'" in lines[-1]
