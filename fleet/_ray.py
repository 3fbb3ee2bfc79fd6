"""Joining or starting Ray for fleet's commands, and submitting and following Ray jobs (the
Jobs API: cycles, the drift watch)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from fleet.config import FleetConfig
from fleet.errors import UnavailableError


def ensure_ray(cfg: FleetConfig, *, log_to_driver: bool = False, dashboard: bool = True) -> str | None:
    """Connect to ``ray.address`` or start a local Ray; returns the dashboard URL when there is one.

    A local Ray picks free ports itself (6379 may belong to a Redis server on the machine).
    """
    import ray

    if ray.is_initialized():
        return _dashboard_url()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = ray_env(cfg)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    # Workers of a local Ray inherit this process's environment; a remote cluster's nodes have their
    # own (credentials never travel in a runtime env, which the dashboard shows).
    kwargs = dict(namespace=cfg.ray.namespace, log_to_driver=log_to_driver, runtime_env={"env_vars": env})
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")  # inside a Ray job: its cluster
    if os.environ.get("RAY_ADDRESS") and not cfg.ray.address:
        # A job's driver: the job's own runtime env applies; a second one would conflict with it.
        kwargs.pop("runtime_env")
    try:
        if address:
            ctx = ray.init(address=address, **kwargs)
        else:
            ctx = ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=dashboard, **kwargs)
        _STATE["dashboard_url"] = getattr(ctx, "dashboard_url", None)
    except ConnectionError as exc:
        raise UnavailableError(f"cannot reach the Ray cluster at {address}: {exc}") from None
    return _dashboard_url()


def ray_env(cfg: FleetConfig) -> dict[str, str]:
    """Environment of fleet's Ray processes (runtime env of its jobs and of a local Ray): Train V2,
    the Train controller's poll interval, and no network or thread surprises from tokenizers."""
    return {
        "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": f"{cfg.train.controller_poll_s:g}",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }


TRAIN_CONTROLLER = "TrainController"


def reclaim_train_reservations() -> list[str]:
    """Remove the placement groups of Ray Train runs whose controller has died; returns their ids.

    A run's controller removes its workers' placement group when the run ends. When the controller
    itself dies (its cycle job stopped, its task cancelled), Ray Train's detached cleaner removes it
    only if the State API can tell it the controller is dead, and Ray itself only when the job that
    created it ends: until then the reservation keeps its CPUs and GPUs from every later pack.
    Only groups created by a dead Train controller are touched; Serve's and detached ones never.
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached:
            continue
        creator = ray.ActorID(pg.creator_actor_id)
        if creator.is_nil():
            continue
        actor = state.actor_table(creator.hex())  # {} once Ray has forgotten a long-dead actor
        if actor.get("ActorClassName", "").rsplit(".", 1)[-1] != TRAIN_CONTROLLER:
            continue
        if actor.get("State") != "DEAD":  # alive, or restarting: its run still owns the group
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed.append(pg.placement_group_id.hex())
    return removed


def _dashboard_url() -> str | None:
    url = _STATE.get("dashboard_url")
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return url or None


_STATE: dict[str, str | None] = {}


def train_storage(cfg: FleetConfig) -> tuple[str, Any]:
    """Ray Train's (and Tune's) storage path and filesystem: a local path, or S3 with the
    store's endpoint."""
    path = cfg.runs_path
    if path.startswith("s3://") and cfg.store.endpoint_url:
        from urllib.parse import urlparse

        import pyarrow.fs

        ep = urlparse(cfg.store.endpoint_url)
        fs = pyarrow.fs.S3FileSystem(
            endpoint_override=ep.netloc, scheme=ep.scheme or "https", region=cfg.store.region
        )
        return path[len("s3://") :], fs
    if "://" not in path:
        Path(path).mkdir(parents=True, exist_ok=True)
    return path, None


# ---------------------------------------------------------------------- Ray jobs
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


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
