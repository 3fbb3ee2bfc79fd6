"""The Serve application: ``build`` (the import path ``fleet.serve.app:build`` that Serve config
files and the RayService name) and ``run`` (what ``fleet serve`` does).

Deployment options come from ``ServeConfig``; a Serve config file (``serveConfigV2``) may override
them per deployment, as the rendered Kubernetes manifests do.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from fleet.config import ENV_DB_URL, FleetConfig, strip_password
from fleet.serve.runtime import config_from_args

# Headroom over the queue limit: the replica answers 503 itself past serve.max_queue, so Serve's
# own per-replica cap must not bite first and queue requests where nobody counts them.
_ONGOING_HEADROOM = 8


def deployment_options(cfg: FleetConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(FleetModel options, FleetIngress options) for ``Deployment.options``."""
    s = cfg.serve
    model: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus},
        "max_ongoing_requests": s.max_queue + _ONGOING_HEADROOM,
        # Loading the base can take minutes on a large model; do not count it as a failed health check.
        "health_check_timeout_s": 60.0,
    }
    if s.max_replicas > s.replicas:
        model["autoscaling_config"] = {
            "min_replicas": s.replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": s.target_ongoing_requests,
        }
    else:
        model["num_replicas"] = s.replicas
    ingress = {
        "num_replicas": 1,
        "ray_actor_options": {"num_cpus": 1},
        "max_ongoing_requests": s.max_queue * max(1, s.max_replicas) + _ONGOING_HEADROOM,
    }
    return model, ingress


def build(args: dict[str, Any] | None = None):
    """Application builder: ``{"config": "/path/fleet.yaml"}`` (optional) → the bound application.

    ``{"config_json": {...}}`` passes an already loaded config instead (``fleet serve`` and tests,
    see :func:`application_args`), with the replica's environment overrides on top; every replica
    then builds its base, engine and registry handles from it.
    """
    from fleet.serve.ingress import FleetIngress
    from fleet.serve.replica import FleetModel

    args = dict(args or {})
    cfg = config_from_args(args)
    model_opts, ingress_opts = deployment_options(cfg)
    model = FleetModel.options(**model_opts).bind(args)
    return FleetIngress.options(**ingress_opts).bind(model, args)


def application_args(cfg: FleetConfig) -> dict[str, Any]:
    """The application's arguments for an already loaded config. Serve shows deployments' arguments
    in the dashboard, so they carry the config without its passwords; every replica takes those from
    its own environment (``$FLEET_DB_URL``, libpq's ``PGPASSWORD``, ``AWS_*``): a local Ray's workers
    inherit this process's, a cluster's nodes have theirs (the rendered deployments set them)."""
    return {"config_json": cfg.without_secrets().model_dump(mode="json")}


def start(cfg: FleetConfig, *, port: int | None = None, blocking_ready: bool = True) -> str:
    """Deploy the application on the connected Ray cluster; returns its base URL."""
    from ray import serve

    port = port or cfg.serve.port
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    app = build(application_args(cfg))
    serve.run(app, name=cfg.serve.app_name, route_prefix="/", blocking=False)
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{port}"


def run(cfg: FleetConfig, *, port: int | None = None, address: str | None = None, echo=print) -> None:
    """``fleet serve``: start Ray (or join ``address``), deploy, print the URL, serve until interrupted."""
    from ray import serve

    from fleet._ray import ensure_ray

    if address:
        cfg = cfg.model_copy(deep=True)
        cfg.ray.address = address
    if not cfg.ray.address:
        _prepare_local(cfg)
        # Ray starts its workers at nice 15 (so that a driver stays responsive); a local service's
        # model and HTTP processes should not yield the CPU to every other program on the machine.
        os.environ.setdefault("RAY_worker_niceness", "0")
    dashboard = ensure_ray(cfg)  # a local Ray's workers inherit this environment, secrets included
    url = start(cfg, port=port)
    echo(f"fleet is serving at {url}/v1  (OpenAI-compatible; model = a fleet model id)")
    if dashboard:
        echo(f"Ray dashboard: {dashboard}")
    echo("Ctrl-C stops it.")
    # SIGTERM (a container stopping, a service manager) stops it the same way as Ctrl-C.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        echo("stopping")
    finally:
        serve.delete(cfg.serve.app_name)
        if not address and not cfg.ray.address:
            serve.shutdown()


def _prepare_local(cfg: FleetConfig) -> None:
    """Once, here, before replicas start: build the default tiny base if it is missing, and create or
    migrate the registry (replicas open it without migrating, so they never race on a migration)."""
    from fleet.registry import Registry

    try:
        from fleet.base.build import ensure_base
    except ImportError:  # a build without fleet.base's builder: the base must already exist
        ensure_base = None
    if ensure_base is not None:
        ensure_base(cfg)
    cfg.data_path.mkdir(parents=True, exist_ok=True)
    Registry.open(cfg).close()
    if cfg.registry.url and strip_password(cfg.registry.url) != cfg.registry.url:
        # The replicas get the URL without its password (application_args); they read it from here.
        os.environ.setdefault(ENV_DB_URL, cfg.registry.url)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
