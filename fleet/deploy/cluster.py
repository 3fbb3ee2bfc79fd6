"""``cluster.yaml`` for the Ray cluster launcher on AWS (``ray up cluster.yaml``).

One Ray cluster runs everything: a CPU head (the Serve proxy, the control loop's
driver) and one worker node type per ``deploy.node_types`` entry. MIG-partitioned
GPUs are split on the host before Docker starts (node-type initialization
commands) and advertised as ``GPU`` plus ``fleet_slice_<profile>``; each Ray worker
is then pinned to one MIG instance through CUDA_VISIBLE_DEVICES.
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from fleet.config import DeployNodeType, FleetConfig
from fleet.deploy import common
from fleet.deploy.common import dump_yaml
from fleet.deploy.gpus import check_deploy, ray_resources

HEAD_TYPE = "head"
NODE_ENV_PATH = "~/fleet.env"
NODE_SOURCE_PATH = "~/fleet-src"

_HEADER = """\
# Ray cluster launcher config for fleet on AWS: `ray up cluster.yaml` (see README.md, "Deploy").
# Generated from the fleet config's deploy section by `fleet cluster-yaml`; change the config and
# regenerate instead of editing this file (a test keeps it equal to the default config's rendering).
"""

# One comment per top-level key, written above it: the file is read by operators.
_COMMENTS = {
    "cluster_name": "Name of the cluster (tags of its EC2 instances).",
    "max_workers": "Most worker nodes in all: the sum of the node types' max_workers.",
    "upscaling_speed": "Nodes added per autoscaler step, as a multiple of the running ones.",
    "idle_timeout_minutes": "An idle worker node is terminated after this long.",
    "provider": "AWS; nodes are terminated, not stopped, when scaled down (their GPUs are the cost).",
    "auth": "SSH user of the node image (Ray creates the key pair).",
    "docker": "Every setup and start command runs in this container; GPUs are passed through.",
    "head_node_type": "The CPU head: dashboard, Serve proxy, control-loop driver.",
    "available_node_types": (
        "Worker types: resources are what the autoscaler plans with. MIG instances count as GPUs and as\n"
        "fleet_slice_<profile> (what fleet's scheduler packs onto); initialization_commands split the GPUs\n"
        "on the host before Docker starts."
    ),
    "file_mounts": (
        "The fleet package source (when a local path) and the env file with FLEET_DB_URL,\n"
        "FLEET_STORE_URI (and AWS_* keys without an instance profile). Run `ray up` from the repository root."
    ),
    "cluster_synced_files": "Nothing else is synced between nodes; adapters live in the S3 store.",
    "file_mounts_sync_continuously": "File mounts are copied once per node start.",
    "rsync_exclude": "Never copy local state or the virtualenv to the nodes.",
    "rsync_filter": "Honour the repository's .gitignore when copying the package source.",
    "initialization_commands": "Host commands (per node type for MIG nodes).",
    "setup_commands": "Install fleet, write the cluster's fleet.yaml and Serve config.",
    "head_setup_commands": "Nothing beyond setup_commands.",
    "worker_setup_commands": "Nothing beyond setup_commands.",
    "head_start_ray_commands": "Export the env file and FLEET_CONFIG, then start the head.",
    "worker_start_ray_commands": "As the head, plus: pin Ray's GPUs to the MIG instances when the node has any.",
}


def node_config_paths(cfg: FleetConfig) -> tuple[str, str]:
    """Where a launcher node keeps the cluster's fleet.yaml and its Serve config (`serve deploy` reads it)."""
    data = cfg.deploy.data_dir.rstrip("/")
    return f"{data}/fleet.yaml", f"{data}/fleet-serve.yaml"


def ray_image(cfg: FleetConfig) -> str:
    return cfg.deploy.ray_image or f"rayproject/ray:{cfg.deploy.ray_version}-py311-gpu"


def _is_local(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _install_target(source: str) -> tuple[str, dict[str, str]]:
    """(pip argument, file_mounts) for the package source."""
    if not _is_local(source):
        return shlex.quote(source), {}
    if source.endswith((".whl", ".tar.gz", ".zip")):
        remote = f"{NODE_SOURCE_PATH}/{source.rstrip('/').rsplit('/', 1)[-1]}"
    else:
        remote = NODE_SOURCE_PATH
    return remote, {remote: source}


def _write_json(path: str, obj: Any) -> str:
    return f"echo {shlex.quote(json.dumps(obj, separators=(',', ':')))} > {path}"


def _mig_init_commands(node: DeployNodeType) -> list[str]:
    """Split every GPU of the host into the node type's MIG layout (idempotent on a fresh node)."""
    profiles = ",".join(node.mig_profiles)
    return [
        "sudo nvidia-smi -mig 1",
        "sudo nvidia-smi mig -dci >/dev/null 2>&1; sudo nvidia-smi mig -dgi >/dev/null 2>&1; true",
        f"sudo nvidia-smi mig -cgi {profiles} -C",
    ]


def _base_build(cfg: FleetConfig, config_path: str) -> list[str]:
    """The embedded tiny base is built on each node (deterministic, offline); a configured base is not touched."""
    if cfg.base.path:
        return []
    base = shlex.quote(f"{cfg.deploy.data_dir.rstrip('/')}/base")
    return [f"test -d {base} || {common.CONFIG_ENV}={shlex.quote(config_path)} fleet base build"]


def _worker_type(node: DeployNodeType, cfg: FleetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "min_workers": node.min_workers,
        "max_workers": node.max_workers,
        "resources": ray_resources(node),
        "node_config": _node_config(node.instance_type, node.disk_gb, cfg),
    }
    if node.mig_profiles:
        out["initialization_commands"] = _mig_init_commands(node)
    return out


def _node_config(instance_type: str, disk_gb: int, cfg: FleetConfig) -> dict[str, Any]:
    out: dict[str, Any] = {
        "InstanceType": instance_type,
        "BlockDeviceMappings": [
            {"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": disk_gb, "VolumeType": "gp3"}}
        ],
    }
    if cfg.deploy.aws_instance_profile_arn:
        out["IamInstanceProfile"] = {"Arn": cfg.deploy.aws_instance_profile_arn}
    return out


def cluster_launcher_config(cfg: FleetConfig) -> dict[str, Any]:
    """The launcher config as a dict (what `ray up` reads)."""
    check_deploy(cfg)
    deploy = cfg.deploy
    pip_target, mounts = _install_target(deploy.package_source)
    mounts[NODE_ENV_PATH] = deploy.env_file
    config_path, serve_path = node_config_paths(cfg)
    env = f"set -a; . {NODE_ENV_PATH}; set +a; export {common.CONFIG_ENV}={shlex.quote(config_path)}"
    env += "".join(f" {k}={v}" for k, v in common.OFFLINE_ENV.items())
    # A MIG node shows Ray its instances by UUID; on other nodes the list is empty and Ray sees the GPUs.
    mig_pin = (
        "MIG=$(nvidia-smi -L 2>/dev/null | grep -o 'MIG-[0-9a-f-]*' | paste -sd, -); "
        'if [ -n "$MIG" ]; then export CUDA_VISIBLE_DEVICES=$MIG; fi'
    )
    node_types: dict[str, Any] = {
        HEAD_TYPE: {
            "resources": {},
            "node_config": _node_config(deploy.head_instance_type, 200, cfg),
        }
    }
    for name, node in deploy.node_types.items():
        node_types[name] = _worker_type(node, cfg)
    return {
        "cluster_name": deploy.name,
        "max_workers": sum(n.max_workers for n in deploy.node_types.values()),
        "upscaling_speed": deploy.upscaling_speed,
        "idle_timeout_minutes": round(deploy.idle_timeout_s / 60, 3),
        "provider": {"type": "aws", "region": deploy.aws_region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": deploy.ssh_user},
        "docker": {
            "image": ray_image(cfg),
            "container_name": "ray_container",
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "head_node_type": HEAD_TYPE,
        "available_node_types": node_types,
        "file_mounts": mounts,
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": ["**/.git", "**/.venv", "**/fleet-data", "**/__pycache__"],
        "rsync_filter": [".gitignore"],
        "initialization_commands": [],
        "setup_commands": [
            f"pip install -q --upgrade {pip_target}",
            f"mkdir -p {shlex.quote(deploy.data_dir)}",
            _write_json(shlex.quote(config_path), common.cluster_config_json(cfg)),
            _write_json(shlex.quote(serve_path), common.serve_config(cfg, config_path)),
            *_base_build(cfg, config_path),
        ],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env}; ray start --head --port={common.GCS_PORT} --object-manager-port=8076 "
            f"--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=0.0.0.0",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"ulimit -n 65536; {env}; {mig_pin}; ray start --address=$RAY_HEAD_IP:{common.GCS_PORT} "
            "--object-manager-port=8076",
        ],
    }


def render_cluster_yaml(cfg: FleetConfig) -> str:
    """cluster.yaml text: a header, then every top-level key under a comment saying what it is for."""
    config = cluster_launcher_config(cfg)
    parts = [_HEADER]
    for key, value in config.items():
        comment = "".join(f"# {line}\n" for line in _COMMENTS[key].splitlines())
        parts.append("\n" + comment + dump_yaml({key: value}))
    return "".join(parts)
