"""fleet.deploy: the Ray cluster launcher's cluster.yaml and the KubeRay manifests in k8s/, both
rendered from one fleet config (its ``deploy`` section) and checked before anything is written.
"""

from fleet.deploy.cluster import cluster_launcher_config, render_cluster_yaml
from fleet.deploy.common import cluster_config, overlay_config, serve_config
from fleet.deploy.gpus import GPU_MODELS, SLICE_RESOURCE_PREFIX, check_deploy, ray_resources
from fleet.deploy.kustomize import base_objects, json_patch, overlay_objects, render_k8s, write_k8s

__all__ = [
    "GPU_MODELS",
    "SLICE_RESOURCE_PREFIX",
    "base_objects",
    "check_deploy",
    "cluster_config",
    "cluster_launcher_config",
    "json_patch",
    "overlay_config",
    "overlay_objects",
    "ray_resources",
    "render_cluster_yaml",
    "render_k8s",
    "serve_config",
    "write_k8s",
]
