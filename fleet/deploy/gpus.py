"""The checks a deploy section must pass before rendering, over the GPU catalogue (``fleet.gpus``).

Pure data and pure functions (no Ray, no Kubernetes client): the launcher and the
KubeRay renderers both call :func:`check_deploy` first, so a node type that asks
for a MIG profile its GPU does not have fails with the field to fix, not on a
cloud node an hour later.
"""

from __future__ import annotations

from collections import Counter

from fleet.config import DeployNodeType, FleetConfig
from fleet.errors import ConfigError
from fleet.gpus import DEPLOY_GPUS, MIG_COMPUTE_SLICES, MIG_MEMORY_SLICES, GpuModel

SLICE_RESOURCE_PREFIX = "fleet_slice_"
"""Ray custom resource of one MIG instance: fleet_slice_<profile> (the scheduler's inventory reads it)."""

GPU_MODELS = DEPLOY_GPUS
"""The GPU catalogue (``fleet.gpus``) by deployment name."""


def slice_counts(node: DeployNodeType) -> dict[str, int]:
    """MIG instances of one node by profile (all GPUs of the node), in first-seen order."""
    counts = Counter(node.mig_profiles)
    return {profile: counts[profile] * node.gpus for profile in dict.fromkeys(node.mig_profiles)}


def gpu_devices(node: DeployNodeType) -> int:
    """CUDA devices one node shows Ray: its GPUs, or its MIG instances when partitioned."""
    return node.gpus * len(node.mig_profiles) if node.mig_profiles else node.gpus


def ray_resources(node: DeployNodeType) -> dict[str, int]:
    """The Ray resources a node of this type advertises beyond CPU and memory."""
    out: dict[str, int] = {}
    if node.gpu != "none":
        out["GPU"] = gpu_devices(node)
    for profile, count in slice_counts(node).items():
        out[SLICE_RESOURCE_PREFIX + profile] = count
    return out


def node_selector(node: DeployNodeType) -> dict[str, str]:
    if node.node_selector or node.gpu == "none":
        return dict(node.node_selector)
    return {"nvidia.com/gpu.product": GPU_MODELS[node.gpu].product_label}


def check_deploy(cfg: FleetConfig) -> None:
    """Raise ConfigError naming the field when the deploy section cannot be rendered into a working cluster."""
    deploy = cfg.deploy
    known = ", ".join([*GPU_MODELS, "none"])
    for name, node in deploy.node_types.items():
        where = f"deploy.node_types.{name}"
        if node.gpu == "none":
            continue
        model = GPU_MODELS.get(node.gpu)
        if model is None:
            raise ConfigError(f"{where}.gpu: unknown GPU model {node.gpu!r}; known: {known}")
        _check_mig(where, node, model)
        family = node.instance_type.split(".", 1)[0]
        owner = next((g for g, m in GPU_MODELS.items() if family in m.aws_families), None)
        if owner is not None and owner != node.gpu:
            raise ConfigError(
                f"{where}.instance_type: {node.instance_type} carries {owner} GPUs, not {node.gpu}; "
                f"pick a {'/'.join(model.aws_families) or node.gpu} instance or change gpu"
            )
    _check_serving(cfg)


def _check_mig(where: str, node: DeployNodeType, model: GpuModel) -> None:
    if not node.mig_profiles:
        return
    if not model.mig:
        raise ConfigError(f"{where}.mig_profiles: {node.gpu} has no MIG; leave mig_profiles empty")
    unknown = [p for p in node.mig_profiles if p not in model.mig]
    if unknown:
        raise ConfigError(
            f"{where}.mig_profiles: {node.gpu} has no MIG profile {', '.join(unknown)}; "
            f"its profiles are {', '.join(model.mig)}"
        )
    if len(set(node.mig_profiles)) > 1:
        # Ray hands a worker "GPU i" by index: on one Ray node it cannot tell a 3g from a 1g instance.
        raise ConfigError(
            f"{where}.mig_profiles: one MIG profile per node type (e.g. [3g.40gb, 3g.40gb]), not "
            f"{node.mig_profiles}: Ray assigns GPUs by index and cannot tell instances of different "
            "profiles apart. On Kubernetes, declare one node type per profile with the same node_selector."
        )
    compute = sum(model.mig[p].compute for p in node.mig_profiles)
    memory = sum(model.mig[p].memory for p in node.mig_profiles)
    if compute > MIG_COMPUTE_SLICES or memory > MIG_MEMORY_SLICES:
        raise ConfigError(
            f"{where}.mig_profiles: {node.mig_profiles} needs {compute}/{MIG_COMPUTE_SLICES} compute and "
            f"{memory}/{MIG_MEMORY_SLICES} memory slices of one {node.gpu}; drop an instance"
        )


def _check_serving(cfg: FleetConfig) -> None:
    deploy = cfg.deploy
    serving = {n: t for n, t in deploy.node_types.items() if "serve" in t.roles}
    if not serving:
        raise ConfigError("deploy.node_types: no node type has role serve; the RayService needs one")
    if deploy.serve_slice:
        resource = SLICE_RESOURCE_PREFIX + deploy.serve_slice
        capacity = sum(ray_resources(t).get(resource, 0) * t.max_workers for t in serving.values())
        unit = f"{deploy.serve_slice} MIG instances"
        if capacity == 0:
            raise ConfigError(
                f"deploy.serve_slice: no serving node type offers {deploy.serve_slice}; "
                "add it to the mig_profiles of a node type with role serve, or empty serve_slice"
            )
    elif deploy.serve_gpus > 0:
        capacity = sum(ray_resources(t).get("GPU", 0) * t.max_workers for t in serving.values())
        unit = "GPUs"
    else:
        return
    needed = cfg.serve.replicas * (1 if deploy.serve_slice else deploy.serve_gpus)
    if needed > capacity:
        raise ConfigError(
            f"serve.replicas: {cfg.serve.replicas} model replicas need {needed:g} {unit}, but the serving "
            f"node types ({', '.join(serving)}) reach at most {capacity}; raise their max_workers"
        )
