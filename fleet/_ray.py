"""Joining or starting Ray for fleet's commands."""

from __future__ import annotations

import os

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
