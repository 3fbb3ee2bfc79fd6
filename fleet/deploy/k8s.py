"""KubeRay and core Kubernetes objects for fleet, built from the fleet config.

Pods, containers, probes and resources are the ``kubernetes`` client's models
(V1Container, V1ResourceRequirements, …) serialized with
``ApiClient.sanitize_for_serialization``; the KubeRay custom resources are
plain dicts around them, shaped by the CRDs (ray.io/v1):

- RayService ``<name>``: the Serve application (serveConfigV2) on the serving worker groups;
- RayCluster ``<name>-train``: the training cluster, every GPU group scaling from zero;
- RayCronJob ``<name>-cycle``: ``fleet run --once`` on the training cluster on a schedule;
- ConfigMap ``<name>-config``: the clusters' fleet.yaml, mounted at /etc/fleet;
- NetworkPolicy ``<name>``: what may reach fleet's pods (see :func:`network_policy`).

Both clusters run Ray's token authentication (``authOptions``, the token in the Secret
``deploy.ray_auth_secret``): the dashboard and the Jobs API run any code with the nodes'
database and S3 credentials, so nothing reaches them without the token. Their Services are
ClusterIP only. Connection strings and keys are never rendered: containers reference the
Secrets named in the deploy section.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from kubernetes import client as k

from fleet.config import ENV_DB_URL, ENV_STORE_URI, DeployNodeType, FleetConfig
from fleet.deploy import common
from fleet.deploy.gpus import node_selector, ray_resources, slice_counts

API_VERSION = "ray.io/v1"
CONFIG_DIR = "/etc/fleet"
CONFIG_FILE = "fleet.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
CONFIG_VOLUME = "fleet-config"
DASHBOARD_AGENT_PORT = 52365
AUTH_TOKEN_KEY = "auth_token"  # the key KubeRay and Ray read the token from
# Ray's own health endpoints (what KubeRay probes by default), spelled out so every container has both probes.
RAYLET_HEALTH = (
    f"wget -T 2 -q -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz | grep success"
)
GCS_HEALTH = f"wget -T 2 -q -O- http://localhost:{common.DASHBOARD_PORT}/api/gcs_healthz | grep success"


@lru_cache(maxsize=1)
def _api() -> k.ApiClient:
    return k.ApiClient()


def to_dict(model: Any) -> Any:
    """A kubernetes client model as the plain dict kubectl would send (camelCase keys, no nulls)."""
    return _api().sanitize_for_serialization(model)


def names(cfg: FleetConfig) -> dict[str, str]:
    n = cfg.deploy.name
    return {"serve": n, "train": f"{n}-train", "cycle": f"{n}-cycle", "config": f"{n}-config"}


def labels(cfg: FleetConfig, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": cfg.deploy.name,
        "app.kubernetes.io/part-of": "fleet",
        "app.kubernetes.io/component": component,
    }


def _metadata(cfg: FleetConfig, name: str, component: str) -> dict[str, Any]:
    return to_dict(k.V1ObjectMeta(name=name, labels=labels(cfg, component)))


def _requirements(cpu: str, memory: str, extra: dict[str, int] | None = None) -> k.V1ResourceRequirements:
    # Requests equal limits: Guaranteed QoS, so a busy neighbour never evicts a replica holding adapters.
    quantities = {"cpu": cpu, "memory": memory, **{name: str(n) for name, n in (extra or {}).items()}}
    return k.V1ResourceRequirements(requests=dict(quantities), limits=dict(quantities))


def gpu_limits(node: DeployNodeType) -> dict[str, int]:
    """Extended resources a pod of this type requests from the NVIDIA device plugin (MIG: mixed strategy)."""
    if node.gpu == "none":
        return {}
    if node.mig_profiles:
        return {f"nvidia.com/mig-{profile}": n for profile, n in slice_counts(node).items()}
    return {"nvidia.com/gpu": node.gpus}


def _secret(name: str, key: str, optional: bool = False) -> k.V1EnvVarSource:
    return k.V1EnvVarSource(
        secret_key_ref=k.V1SecretKeySelector(name=name, key=key, optional=optional or None)
    )


def env(cfg: FleetConfig) -> list[k.V1EnvVar]:
    deploy = cfg.deploy
    return [
        k.V1EnvVar(name=common.CONFIG_ENV, value=CONFIG_PATH),
        k.V1EnvVar(name=ENV_DB_URL, value_from=_secret(deploy.registry_secret, "url")),
        k.V1EnvVar(name=ENV_STORE_URI, value_from=_secret(deploy.s3_secret, "store-uri")),
        # Optional: with IAM roles for service accounts (or node roles) no keys are needed.
        k.V1EnvVar(name="AWS_ACCESS_KEY_ID", value_from=_secret(deploy.s3_secret, "access-key-id", True)),
        k.V1EnvVar(
            name="AWS_SECRET_ACCESS_KEY", value_from=_secret(deploy.s3_secret, "secret-access-key", True)
        ),
        *(k.V1EnvVar(name=name, value=value) for name, value in common.OFFLINE_ENV.items()),
    ]


def _exec_probe(command: str, period_s: int = 5, failures: int = 12) -> k.V1Probe:
    return k.V1Probe(
        _exec=k.V1ExecAction(command=["bash", "-c", command]),
        initial_delay_seconds=10,
        period_seconds=period_s,
        timeout_seconds=2,
        failure_threshold=failures,
    )


def _healthz_probe(cfg: FleetConfig) -> k.V1Probe:
    # Readiness only: a pod leaves the Serve Service while fleet's app is unhealthy, but is not
    # restarted for it (the RayService controller owns app recovery).
    return k.V1Probe(
        http_get=k.V1HTTPGetAction(path=common.HEALTH_PATH, port=cfg.serve.port),
        initial_delay_seconds=10,
        period_seconds=5,
        timeout_seconds=2,
        failure_threshold=3,
    )


def _ports(cfg: FleetConfig, head: bool, serving: bool) -> list[k.V1ContainerPort]:
    ports = []
    if head:
        ports += [
            k.V1ContainerPort(name="gcs-server", container_port=common.GCS_PORT),
            k.V1ContainerPort(name="dashboard", container_port=common.DASHBOARD_PORT),
            k.V1ContainerPort(name="client", container_port=common.CLIENT_PORT),
        ]
    if serving:
        ports.append(k.V1ContainerPort(name="serve", container_port=cfg.serve.port))
    ports.append(k.V1ContainerPort(name="metrics", container_port=common.METRICS_PORT))
    return ports


def _pod(
    cfg: FleetConfig,
    component: str,
    container: k.V1Container,
    selector: dict[str, str] | None = None,
    gpu: bool = False,
) -> dict[str, Any]:
    spec = k.V1PodSpec(
        containers=[container],
        volumes=[
            k.V1Volume(name=CONFIG_VOLUME, config_map=k.V1ConfigMapVolumeSource(name=names(cfg)["config"]))
        ],
        node_selector=selector or None,
        tolerations=[k.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
        if gpu
        else None,
    )
    return to_dict(k.V1PodTemplateSpec(metadata=k.V1ObjectMeta(labels=labels(cfg, component)), spec=spec))


def _ray_container(
    cfg: FleetConfig,
    name: str,
    resources: k.V1ResourceRequirements,
    ports: list[k.V1ContainerPort],
    readiness: k.V1Probe,
    liveness: k.V1Probe,
) -> k.V1Container:
    return k.V1Container(
        name=name,
        image=cfg.deploy.image,
        image_pull_policy=cfg.deploy.image_pull_policy,
        env=env(cfg),
        ports=ports,
        resources=resources,
        readiness_probe=readiness,
        liveness_probe=liveness,
        volume_mounts=[k.V1VolumeMount(name=CONFIG_VOLUME, mount_path=CONFIG_DIR, read_only=True)],
    )


def head_group(cfg: FleetConfig, component: str, serving: bool) -> dict[str, Any]:
    deploy = cfg.deploy
    start = {"dashboard-host": "0.0.0.0"}
    if serving:
        start["num-cpus"] = "0"  # no replicas on the head: its restart must not take models down
    probe = f"{RAYLET_HEALTH} && {GCS_HEALTH}"
    container = _ray_container(
        cfg,
        "ray-head",
        _requirements(str(deploy.head_cpus), f"{deploy.head_memory_gb}Gi"),
        _ports(cfg, head=True, serving=serving),
        # The head's readiness must not wait for fleet's app: KubeRay deploys the app once the head is ready.
        readiness=_exec_probe(probe),
        liveness=_exec_probe(probe, period_s=10, failures=30),
    )
    return {
        "serviceType": "ClusterIP",
        "rayStartParams": start,
        "template": _pod(cfg, component, container),
    }


def worker_group(cfg: FleetConfig, name: str, node: DeployNodeType, serving: bool) -> dict[str, Any]:
    component = "serve" if serving else "train"
    container = _ray_container(
        cfg,
        "ray-worker",
        _requirements(str(node.cpus), f"{node.memory_gb}Gi", gpu_limits(node)),
        _ports(cfg, head=False, serving=serving),
        readiness=_healthz_probe(cfg) if serving else _exec_probe(RAYLET_HEALTH),
        liveness=_exec_probe(RAYLET_HEALTH, period_s=10, failures=30),
    )
    # Serving pods keep min_workers up; the training cluster scales every group to zero when idle.
    low = node.min_workers if serving else 0
    group: dict[str, Any] = {
        "groupName": name,
        "replicas": low,
        "minReplicas": low,
        "maxReplicas": node.max_workers,
        "rayStartParams": {},
    }
    resources = ray_resources(node)
    if resources:
        # GPU here, not from the pod limits: KubeRay only counts resources named *gpu, not nvidia.com/mig-*.
        group["resources"] = {key: str(value) for key, value in resources.items()}
    group["template"] = _pod(cfg, component, container, node_selector(node), gpu=node.gpu != "none")
    return group


def _autoscaler(cfg: FleetConfig) -> dict[str, Any]:
    return {
        "upscalingMode": cfg.deploy.upscaling_mode,
        "idleTimeoutSeconds": cfg.deploy.idle_timeout_s,
        "imagePullPolicy": cfg.deploy.image_pull_policy,
        "resources": to_dict(_requirements("500m", "512Mi")),
    }


def _auth_options(cfg: FleetConfig) -> dict[str, Any]:
    # KubeRay sets RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from this Secret) on every Ray container.
    return {"mode": "token", "secretName": cfg.deploy.ray_auth_secret}


def _cluster_spec(cfg: FleetConfig, role: str) -> dict[str, Any]:
    serving = role == "serve"
    return {
        "rayVersion": cfg.deploy.ray_version,
        "authOptions": _auth_options(cfg),
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": _autoscaler(cfg),
        "headGroupSpec": head_group(cfg, role, serving),
        "workerGroupSpecs": [
            worker_group(cfg, name, node, serving)
            for name, node in cfg.deploy.node_types.items()
            if role in node.roles
        ],
    }


def ray_service(cfg: FleetConfig) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(cfg, names(cfg)["serve"], "serve"),
        "spec": {
            # NewCluster: an upgrade brings up a whole new cluster and switches traffic once it serves.
            "upgradeStrategy": {"type": "NewCluster"},
            "excludeHeadPodFromServeSvc": True,
            "serveConfigV2": common.dump_yaml(common.serve_config(cfg, CONFIG_PATH)),
            "rayClusterConfig": _cluster_spec(cfg, "serve"),
        },
    }


def ray_cluster(cfg: FleetConfig) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(cfg, names(cfg)["train"], "train"),
        "spec": _cluster_spec(cfg, "train"),
    }


def ray_cron_job(cfg: FleetConfig) -> dict[str, Any]:
    deploy = cfg.deploy
    submitter = k.V1Container(
        name="ray-job-submitter",
        image=deploy.image,
        image_pull_policy=deploy.image_pull_policy,
        # `ray job submit` to the training cluster's Jobs API, which asks for the token.
        env=[
            k.V1EnvVar(name="RAY_AUTH_MODE", value="token"),
            k.V1EnvVar(name="RAY_AUTH_TOKEN", value_from=_secret(deploy.ray_auth_secret, AUTH_TOKEN_KEY)),
        ],
        resources=_requirements("500m", "1Gi"),
    )
    submitter_pod = k.V1PodTemplateSpec(
        metadata=k.V1ObjectMeta(labels=labels(cfg, "cycle")),
        spec=k.V1PodSpec(restart_policy="Never", containers=[submitter]),
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCronJob",
        "metadata": _metadata(cfg, names(cfg)["cycle"], "cycle"),
        "spec": {
            "schedule": deploy.cron_schedule,
            "timeZone": deploy.cron_time_zone,
            "jobTemplate": {
                "entrypoint": common.CYCLE_ENTRYPOINT,
                # Runs on the standing training cluster (its GPU groups scale up for the packs), so a
                # cycle does not pay for a new cluster every time.
                "clusterSelector": {"ray.io/cluster": names(cfg)["train"]},
                "submissionMode": "K8sJobMode",
                "activeDeadlineSeconds": deploy.cycle_deadline_s,
                "backoffLimit": 0,
                "submitterPodTemplate": to_dict(submitter_pod),
            },
        },
    }


def config_map(cfg: FleetConfig) -> dict[str, Any]:
    return to_dict(
        k.V1ConfigMap(
            api_version="v1",
            kind="ConfigMap",
            metadata=k.V1ObjectMeta(name=names(cfg)["config"], labels=labels(cfg, "config")),
            data={CONFIG_FILE: common.cluster_config_yaml(cfg)},
        )
    )


def network_policy(cfg: FleetConfig) -> dict[str, Any]:
    """What may reach fleet's pods: each other (Ray's own traffic), the KubeRay operator (the heads'
    dashboards), the operators' namespace (dashboard, Jobs API, Ray client, metrics) and callers of
    the API port (from ``deploy.api_namespaces``, or anywhere when that is empty). Nothing else:
    the Jobs API runs any code with the nodes' credentials. Egress is left open (database, S3)."""
    deploy = cfg.deploy
    ours = {"app.kubernetes.io/name": deploy.name, "app.kubernetes.io/part-of": "fleet"}

    def in_namespace(name: str, pods: dict[str, str] | None = None) -> k.V1NetworkPolicyPeer:
        return k.V1NetworkPolicyPeer(
            namespace_selector=k.V1LabelSelector(match_labels={"kubernetes.io/metadata.name": name}),
            pod_selector=k.V1LabelSelector(match_labels=pods) if pods else None,
        )

    def ports(*numbers: int) -> list[k.V1NetworkPolicyPort]:
        return [k.V1NetworkPolicyPort(protocol="TCP", port=n) for n in numbers]

    api = k.V1NetworkPolicyIngressRule(
        ports=ports(cfg.serve.port),
        _from=[in_namespace(ns) for ns in deploy.api_namespaces] or None,
    )
    rules = [
        k.V1NetworkPolicyIngressRule(
            _from=[k.V1NetworkPolicyPeer(pod_selector=k.V1LabelSelector(match_labels=ours))]
        ),
        k.V1NetworkPolicyIngressRule(
            _from=[in_namespace(deploy.kuberay_namespace, {"app.kubernetes.io/name": "kuberay-operator"})],
            ports=ports(common.DASHBOARD_PORT, DASHBOARD_AGENT_PORT),
        ),
        k.V1NetworkPolicyIngressRule(
            _from=[in_namespace(deploy.operator_namespace)],
            ports=ports(common.DASHBOARD_PORT, common.CLIENT_PORT, common.METRICS_PORT),
        ),
        api,
    ]
    return to_dict(
        k.V1NetworkPolicy(
            api_version="networking.k8s.io/v1",
            kind="NetworkPolicy",
            metadata=k.V1ObjectMeta(name=deploy.name, labels=labels(cfg, "network")),
            spec=k.V1NetworkPolicySpec(
                pod_selector=k.V1LabelSelector(match_labels=ours), policy_types=["Ingress"], ingress=rules
            ),
        )
    )


def namespace(cfg: FleetConfig) -> dict[str, Any]:
    return to_dict(
        k.V1Namespace(
            api_version="v1",
            kind="Namespace",
            metadata=k.V1ObjectMeta(name=cfg.deploy.namespace, labels=labels(cfg, "namespace")),
        )
    )
