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


def _dashboard_url() -> str | None:
    url = _STATE.get("dashboard_url")
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return url or None


_STATE: dict[str, str | None] = {}
