"""What the launcher and Kubernetes renderings share: the clusters' own fleet.yaml, the Serve
application config, overlay merging, and deterministic YAML.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import ValidationError as PydanticValidationError

from fleet.config import ENV_CONFIG, ENV_DB_URL, ENV_STORE_URI, FleetConfig, render_commented_yaml
from fleet.deploy.gpus import SLICE_RESOURCE_PREFIX, check_deploy
from fleet.errors import ConfigError

SERVE_IMPORT_PATH = "fleet.serve.app:build"
INGRESS_DEPLOYMENT = "FleetIngress"
MODEL_DEPLOYMENT = "FleetModel"
HEALTH_PATH = "/healthz"
DASHBOARD_PORT = 8265
GCS_PORT = 6379
CLIENT_PORT = 10001
METRICS_PORT = 8080
CYCLE_ENTRYPOINT = "fleet run --once"

# Environment every fleet process in a cluster gets; the values come from Secrets (Kubernetes) or the
# operator's env file (launcher), never from a rendered file.
SECRET_ENV = (ENV_DB_URL, ENV_STORE_URI, "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
CONFIG_ENV = ENV_CONFIG


def cluster_config(cfg: FleetConfig) -> FleetConfig:
    """The fleet config the cluster's own processes load.

    Connection strings are cleared because they arrive by environment from secrets; paths
    are the nodes' paths, not the operator's; Ray is the cluster fleet runs in.
    """
    deploy = cfg.deploy
    out = cfg.model_copy(deep=True)
    out.data_dir = deploy.data_dir
    out.registry.url = None
    out.store.uri = None
    out.train.storage_path = deploy.train_storage_path
    out.serve.host = "0.0.0.0"
    out.serve.num_gpus = deploy.serve_gpus
    out.ray.address = "auto"
    out.ray.num_cpus = None
    out.ray.dashboard_url = f"http://127.0.0.1:{DASHBOARD_PORT}"
    return out


def cluster_config_yaml(cfg: FleetConfig) -> str:
    """cluster_config() as commented YAML, without the deploy section (the cluster does not deploy itself)."""
    text = render_commented_yaml(cluster_config(cfg))
    # Top-level fields are rendered as blocks separated by one blank line: drop the deploy block.
    blocks = text.split("\n\n")
    kept = [b for b in blocks if not any(line.startswith("deploy:") for line in b.splitlines())]
    return "\n\n".join(kept).rstrip("\n") + "\n"


def cluster_config_json(cfg: FleetConfig) -> dict[str, Any]:
    """The non-default part of cluster_config(), small enough to write on a node in one command."""
    return cluster_config(cfg).model_dump(mode="json", exclude_defaults=True, exclude={"deploy"})


def serve_config(cfg: FleetConfig, config_path: str) -> dict[str, Any]:
    """Ray Serve's declarative config (ServeDeploySchema) for fleet's application."""
    deploy, serve = cfg.deploy, cfg.serve
    model_options: dict[str, Any] = {"num_cpus": serve.num_cpus, "num_gpus": deploy.serve_gpus}
    if deploy.serve_slice:
        model_options["resources"] = {SLICE_RESOURCE_PREFIX + deploy.serve_slice: 1}
    model: dict[str, Any] = {"name": MODEL_DEPLOYMENT}
    if serve.max_replicas > serve.replicas:
        model["autoscaling_config"] = {
            "min_replicas": serve.replicas,
            "max_replicas": serve.max_replicas,
            "target_ongoing_requests": serve.target_ongoing_requests,
        }
    else:
        model["num_replicas"] = serve.replicas
    model["ray_actor_options"] = model_options
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": serve.port},
        "applications": [
            {
                "name": serve.app_name,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "args": {"config": config_path},
                "deployments": [
                    {
                        "name": INGRESS_DEPLOYMENT,
                        "num_replicas": deploy.ingress_replicas,
                        "ray_actor_options": {"num_cpus": 1},
                    },
                    model,
                ],
            }
        ],
    }


def overlay_config(cfg: FleetConfig, overlay: str) -> FleetConfig:
    """The config of one overlay: deploy.overlays[overlay] merged over cfg (null removes a key)."""
    overlays = cfg.deploy.overlays
    if overlay not in overlays:
        known = ", ".join(overlays) or "none"
        raise ConfigError(f"unknown overlay {overlay!r}; deploy.overlays has {known}")
    raw = cfg.model_dump(mode="json")
    merged = merge(raw, overlays[overlay])
    try:
        out = FleetConfig.model_validate(merged)
    except PydanticValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"deploy.overlays.{overlay} makes an invalid config: {problems}") from None
    if out.deploy.name != cfg.deploy.name:
        raise ConfigError(
            f"deploy.overlays.{overlay}: an overlay cannot change deploy.name (it patches the base's objects)"
        )
    try:
        check_deploy(out)
    except ConfigError as exc:
        raise ConfigError(f"deploy.overlays.{overlay}: {exc.message}") from None
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a None in `over` deletes the key."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(
        self, data: Any
    ) -> bool:  # the same dict in requests and limits must not become &id001
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(obj: Any) -> str:
    """Deterministic YAML: keys in insertion order, multi-line strings as literal blocks, no aliases."""
    return yaml.dump(
        obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=4096
    )


def dump_yaml_all(objs: list[Any]) -> str:
    return "---\n".join(dump_yaml(o) for o in objs)
