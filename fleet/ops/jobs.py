"""Cycles as Ray jobs: ``fleet run`` plans each cycle, then submits its training through the
Jobs API as ``fleet-cycle-<n>`` (metadata: cycle id, packs, models), so operators follow it in
the dashboard next to the packs' Train runs and the Serve app."""

from __future__ import annotations

import os
import shlex
import sys
import time
from typing import Any

from fleet.errors import UnavailableError, ValidationError
from fleet.types import RunStatus

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def parse_interval(text: str) -> float:
    """'90s', '10m', '1h', '2d' or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = (text or "").strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, KeyError):
        raise ValidationError(f"interval {text!r}: use a number with s, m, h or d (e.g. 10m)") from None
    if value <= 0:
        raise ValidationError(f"interval {text!r} must be positive")
    return value


def job_client(cfg, dashboard_url: str | None):
    from ray.job_submission import JobSubmissionClient

    address = dashboard_url or cfg.ray.dashboard_url
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - the client raises plain exceptions for a bad address
        raise UnavailableError(f"the Ray Jobs API at {address} is unreachable: {exc}") from None


def job_env(cfg, config_path: str | None) -> dict[str, str]:
    """What the job's driver needs to open the same fleet.

    On a local Ray the driver runs on this machine: it gets this process's effective config (a
    file in the data dir). A remote cluster's nodes carry their own config and secrets (cluster.yaml,
    k8s Secrets); nothing secret goes into the runtime env, which the dashboard displays.
    """
    from fleet._ray import ray_env

    env = ray_env(cfg)
    if cfg.ray.address:
        if config_path:
            env["FLEET_CONFIG"] = config_path
        return env
    from fleet.config import render_commented_yaml

    path = cfg.data_path / "run" / "effective-fleet.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(render_commented_yaml(cfg))
    os.chmod(tmp, 0o600)
    tmp.replace(path)
    env["FLEET_CONFIG"] = str(path)
    return env


def entrypoint(cfg, args: list[str]) -> str:
    # A local cluster runs jobs with this very interpreter; a remote one with the nodes' python.
    python = "python" if cfg.ray.address else sys.executable
    return " ".join(shlex.quote(x) for x in [python, "-m", "fleet.cli", *args])


# A cluster that has just started (or is busy) answers this until its job agent is up.
_AGENT_NOT_READY = "No available agent to submit job"


def submit_job(
    client,
    cfg,
    *,
    name: str,
    args: list[str],
    metadata: dict[str, Any],
    config_path: str | None,
    agent_wait_s: float = 120.0,
) -> str:
    """Submit a job; while the cluster's job agent is not up yet, retry for ``agent_wait_s``."""
    deadline = time.monotonic() + agent_wait_s
    delay = 0.5
    while True:
        try:
            return client.submit_job(
                entrypoint=entrypoint(cfg, args),
                submission_id=name,
                metadata={k: str(v) for k, v in metadata.items()},
                runtime_env={"env_vars": job_env(cfg, config_path)},
                entrypoint_num_cpus=0,
            )
        except RuntimeError as exc:
            if _AGENT_NOT_READY not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(delay)
            delay = min(5.0, delay * 2)


def job_status(client, submission_id: str) -> str:
    """The job's status as its bare name (RUNNING, SUCCEEDED, STOPPED, …)."""
    return str(client.get_job_status(submission_id)).split(".")[-1]


def wait_job(
    client, submission_id: str, *, poll_s: float = 1.0, timeout_s: float | None = None, on_poll=None
) -> str:
    """Poll a job until it ends (or ``timeout_s``); ``on_poll(status)`` runs after every poll."""
    t0 = time.time()
    while True:
        status = job_status(client, submission_id)
        if on_poll is not None:
            on_poll(status)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.time() - t0 > timeout_s:
            return status
        time.sleep(poll_s)


def reap_ended_cycles(fl, client) -> list[int]:
    """Close running cycles whose job has already ended (stopped, killed) without recording it,
    so that the next cycle need not wait for their heartbeat to go stale."""
    from fleet.ops.cycle import mark_interrupted

    closed = []
    for c in fl.registry.list_cycles(limit=20):
        if c["status"] != "running":
            continue
        try:
            status = job_status(client, f"fleet-cycle-{c['id']}")
        except Exception:  # noqa: BLE001 - not a job (an in-process cycle), or not submitted yet
            continue
        if status in TERMINAL:
            mark_interrupted(fl.registry, c)
            closed.append(c["id"])
    return closed


def submit_cycle(fl, client, *, config_path: str | None, steps: int | None = None) -> tuple[int, str, dict]:
    """Plan a cycle here, then submit its execution as the job ``fleet-cycle-<n>``."""
    from fleet.ops.cycle import prepare_cycle

    reap_ended_cycles(fl, client)
    cycle_id, result = prepare_cycle(fl)
    packs = result.packs
    members = sum(len(p.members) for p in packs)
    name = f"fleet-cycle-{cycle_id}"
    args = ["cycle", "--cycle-id", str(cycle_id)] + (["--steps", str(steps)] if steps else [])
    meta = {"cycle_id": cycle_id, "packs": len(packs), "models": members, "fleet": "cycle"}
    try:
        submit_job(client, fl.cfg, name=name, args=args, metadata=meta, config_path=config_path)
    except Exception as exc:
        # Nothing will run it: close the cycle now rather than leave it "running" until it goes stale.
        summary = {**(fl.registry.get_cycle(cycle_id)["summary"] or {}), "error": f"not submitted: {exc}"}
        fl.registry.finish_cycle(cycle_id, RunStatus.FAILED, summary)
        raise
    return cycle_id, name, meta
