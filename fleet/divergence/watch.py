"""``fleet drift watch``: the monitor as a Ray job that scans on an interval until it is stopped.

The command plans here (it makes sure the probe set exists, so that the job's metadata can name
it) and submits ``fleet drift watch --in-job …`` through the Jobs API as
``fleet-drift-watch-<time>``: the job shows in the dashboard's Jobs view with metadata
``fleet=drift-watch``, ``probe_set``, ``base_model``, ``every_s``, and its driver joins the cluster,
so the drift metrics it records are exported with the cluster's. Stop it from the dashboard, with
``ray job stop <id>``, or with Ctrl-C in the submitting terminal while it follows the job.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable
from typing import Any

from fleet.divergence import probes as probe_sets
from fleet.divergence.monitor import ScanResult, scan
from fleet.errors import FleetError, ValidationError


def submit_watch(
    fl,
    *,
    every_s: float,
    probe_set: str | None = None,
    scans: int | None = None,
    config_path: str | None = None,
    dashboard_url: str | None = None,
) -> tuple[Any, str, dict[str, Any]]:
    """Submit the watch job; returns ``(client, submission id, metadata)``."""
    from fleet._ray import ensure_ray, job_client, submit_job

    if every_s <= 0:
        raise ValidationError("the watch interval must be positive")
    url = dashboard_url or ensure_ray(fl.cfg, dashboard=True)
    probe = probe_sets.ensure(fl, name=probe_set)
    client = job_client(fl.cfg, url)
    name = f"fleet-drift-watch-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    args = ["drift", "watch", "--in-job", "--every", f"{every_s:g}s", "--probe-set", probe.name]
    if scans:
        args += ["--scans", str(scans)]
    meta = {
        "fleet": "drift-watch",
        "probe_set": probe.name,
        "base_model": fl.cfg.base.name,
        "every_s": every_s,
    }
    submit_job(client, fl.cfg, name=name, args=args, metadata=meta, config_path=config_path)
    return client, name, meta


def local_cluster(cfg) -> bool:
    """True when this process started the Ray it uses: that cluster ends with the process."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def follow(client, name: str, emit: Callable[[str], None], *, poll_s: float = 2.0) -> str:
    """Print the job's new log lines until it ends; Ctrl-C stops the job. Returns its final status."""
    from fleet._ray import TERMINAL, job_status, wait_job

    seen = 0
    try:
        while True:
            logs = client.get_job_logs(name)
            if len(logs) > seen:
                emit(logs[seen:].rstrip("\n"))
                seen = len(logs)
            status = job_status(client, name)
            if status in TERMINAL:
                return status
            time.sleep(poll_s)
    except KeyboardInterrupt:
        client.stop_job(name)
        return wait_job(client, name, timeout_s=60)


def watch_loop(
    fl,
    *,
    every_s: float,
    probe_set: str | None = None,
    scans: int | None = None,
    emit: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[ScanResult]:
    """The job's body: scan, wait for the rest of the interval, repeat until stopped (or ``scans``
    scans are done). A scan that fails with a fleet error is reported and the loop goes on: the
    next interval may find the database or store back."""
    _join_ray(fl.cfg)
    done: list[ScanResult] = []
    while True:
        t0 = time.time()
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        try:
            res = scan(fl, probe_set=probe_set)
            c = res.counts
            emit(
                f"{stamp} scan on {res.probe_set}: {c['scored']} scored, {c['warned']} warned, {c['frozen']} frozen, "
                f"{c['rolled_back']} rolled back, {len(res.errors)} failed, {res.seconds:.1f} s"
            )
            done.append(res)
        except FleetError as exc:
            emit(f"{stamp} scan failed: {exc.message}")
            done.append(ScanResult(probe_set, errors=[{"message": exc.message}]))
        if scans and len(done) >= scans:
            return done
        sleep(max(0.0, every_s - (time.time() - t0)))


def _join_ray(cfg) -> None:
    """Connect this process to Ray, so the drift metrics it records are exported with the cluster's.

    Inside a Ray job (``RAY_ADDRESS`` set by the job supervisor) the driver joins the job's cluster
    with the job's own runtime env: passing another one to ``ray.init`` would conflict with it.
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(namespace=cfg.ray.namespace, log_to_driver=False)
        return
    from fleet._ray import ensure_ray

    ensure_ray(cfg, dashboard=False)
