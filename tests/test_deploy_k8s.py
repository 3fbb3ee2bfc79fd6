"""k8s/: the committed tree equals its rendering, and every object passes the schemas the cluster uses.

KubeRay kinds are checked against the CRDs' openAPIV3Schema (../shared/schemas/kuberay/) the way the
API server checks them with strict field validation: unknown fields are errors, int-or-string and
nullable are honoured, int32/int64 ranges and list-map keys are enforced. Core kinds, and every pod
template inside the custom resources, are checked with kubernetes-validate. Overlays are applied
twice, by `kubectl kustomize` when it is installed and by jsonpatch here, and must both give the
overlay config's own rendering.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.serve.schema import ServeDeploySchema

from fleet.config import FleetConfig, load_config
from fleet.deploy import k8s, overlay_objects, render_k8s, write_k8s
from fleet.deploy.common import HEALTH_PATH, SERVE_IMPORT_PATH

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
K8S_VERSION = "1.32"  # the kubectl shipped with this environment; kubernetes-validate ships its schemas
# The issue's ../shared/schemas/kuberay/, or a shared/ inside the checkout; FLEET_KUBERAY_CRDS overrides both.
CRD_DIR = Path(
    os.environ.get("FLEET_KUBERAY_CRDS")
    or next(
        (p for p in (ROOT.parent / "shared", ROOT / "shared") if (p / "schemas" / "kuberay").is_dir()),
        ROOT.parent / "shared",
    )
    / "schemas"
    / "kuberay"
)
CRD_FILES = {
    "RayService": "ray.io_rayservices.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
OVERLAYS = ["dev", "prod"]


# -- the CRD schema as the API server applies it -----------------------------------------------


def _strict(node: Any) -> Any:
    """openAPIV3Schema (structural, with x-kubernetes-* extensions) -> JSON Schema with the server's strictness."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: _strict(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _strict(value)
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [_strict(sub) for sub in value]
        elif key in ("x-kubernetes-list-type", "x-kubernetes-list-map-keys", "x-kubernetes-validations"):
            out[key] = value  # enforced by the keywords added below
        elif key.startswith("x-kubernetes-") or key in ("nullable", "description"):
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    # Strict field validation (kubectl's default): an unknown field is an error, not silently pruned.
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _list_semantics(validator, list_type, instance, schema):
    if not isinstance(instance, list) or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    defaults = {k: schema.get("items", {}).get("properties", {}).get(k, {}).get("default") for k in keys}
    seen = set()
    for item in instance:
        ident = tuple(item.get(k, defaults[k]) for k in keys) if list_type == "map" else yaml.safe_dump(item)
        if ident in seen:
            yield jsonschema.ValidationError(f"duplicate entry {ident} in a list of type {list_type}")
        seen.add(ident)


def _cel(validator, rules, instance, schema):
    for rule in rules:
        if "oldSelf" in rule["rule"]:
            continue  # transition rules (immutability) only apply to updates
        yield jsonschema.ValidationError(
            f"field guarded by CEL rule {rule['rule']!r} that this test cannot evaluate; check it by hand"
        )


_FORMATS = jsonschema.FormatChecker()
_FORMATS.checks("int32")(lambda v: not isinstance(v, int) or -(2**31) <= v < 2**31)
_FORMATS.checks("int64")(lambda v: not isinstance(v, int) or -(2**63) <= v < 2**63)
_CrdValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator,
    {"x-kubernetes-list-type": _list_semantics, "x-kubernetes-validations": _cel},
)


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        pytest.skip(f"KubeRay CRD {path} not found (set FLEET_KUBERAY_CRDS to the CRD directory)")
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"])
    return _CrdValidator(_strict(version["schema"]["openAPIV3Schema"]), format_checker=_FORMATS)


def crd_errors(obj: dict[str, Any]) -> list[str]:
    errors = crd_validator(obj["kind"]).iter_errors(obj)
    return sorted(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj["spec"]
    if obj["kind"] == "RayService":
        spec = spec["rayClusterConfig"]
    if obj["kind"] == "RayCronJob":
        return [spec["jobTemplate"]["submitterPodTemplate"]]
    return [spec["headGroupSpec"]["template"], *(g["template"] for g in spec["workerGroupSpecs"])]


def core_validate(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# -- the objects under test -------------------------------------------------------------------


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    return obj["kind"], obj["metadata"]["name"]


def kustomize_in_python(root: Path, overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """What kustomize does with our overlays: load the base, apply the JSON patches, set the namespace."""
    base_dir, over_dir = root / "base", root / "overlays" / overlay
    objs = {
        _key(o): o for o in (_load(base_dir / r) for r in _load(base_dir / "kustomization.yaml")["resources"])
    }
    kustomization = _load(over_dir / "kustomization.yaml")
    for patch in kustomization.get("patches", []):
        target = (patch["target"]["kind"], patch["target"]["name"])
        objs[target] = jsonpatch.apply_patch(objs[target], _load(over_dir / patch["path"]))
    for obj in objs.values():
        obj["metadata"]["namespace"] = kustomization["namespace"]
    for extra in kustomization["resources"]:
        if not extra.startswith(".."):
            obj = _load(over_dir / extra)
            objs[_key(obj)] = obj
    return objs


def committed_objects() -> list[dict[str, Any]]:
    objs = [_load(p) for p in sorted((K8S / "base").glob("*.yaml")) if p.name != "kustomization.yaml"]
    for overlay in OVERLAYS:
        objs += kustomize_in_python(K8S, overlay).values()
    return objs


# -- tests ------------------------------------------------------------------------------------


def test_committed_tree_is_the_rendering_of_the_default_config(tmp_path):
    written = write_k8s(FleetConfig(), tmp_path / "k8s")
    assert written, "nothing rendered"
    for path in written:
        rel = path.relative_to(tmp_path / "k8s")
        committed = K8S / rel
        assert committed.exists(), f"k8s/{rel} is rendered but not committed; run `fleet k8s render`"
        assert committed.read_bytes() == path.read_bytes(), f"k8s/{rel} drifted; run `fleet k8s render`"
    rendered = {p.relative_to(tmp_path / "k8s") for p in written}
    stale = [
        p
        for d in ("base", "overlays")
        for p in (K8S / d).rglob("*.yaml")
        if p.relative_to(K8S) not in rendered
    ]
    assert not stale, f"stale files under k8s/: {stale}"


def test_cli_renders_one_overlay_and_removes_stale_patches(tmp_path, monkeypatch):
    from fleet.cli import main

    monkeypatch.chdir(tmp_path)  # the built-in config, not a fleet.yaml lying around
    monkeypatch.delenv("FLEET_CONFIG", raising=False)

    out = tmp_path / "out"
    stale = out / "overlays" / "prod" / "patches" / "old.yaml"
    stale.parent.mkdir(parents=True)
    stale.write_text("[]\n")
    assert main(["k8s", "render", "--overlay", "prod", "--out", str(out)]) == 0
    assert not stale.exists()
    assert (out / "overlays/prod/kustomization.yaml").read_text() == (
        K8S / "overlays/prod/kustomization.yaml"
    ).read_text()
    assert not (out / "overlays" / "dev").exists()
    assert main(["k8s", "render", "--overlay", "staging", "--out", str(out)]) == 2


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_kuberay_objects_match_their_crd(kind):
    objs = [o for o in committed_objects() if o["kind"] == kind]
    assert len(objs) == 1 + len(OVERLAYS)
    for obj in objs:
        assert obj["apiVersion"] == "ray.io/v1"
        assert crd_errors(obj) == [], obj["metadata"]


def test_crd_validation_catches_broken_objects():
    """The validator is strict enough to matter: each breakage is reported, with where."""
    good = k8s.ray_service(FleetConfig())
    assert crd_errors(good) == []

    def broken(edit) -> list[str]:
        obj = copy.deepcopy(good)
        edit(obj)
        return crd_errors(obj)

    group = lambda o: o["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]  # noqa: E731
    container = lambda o: group(o)["template"]["spec"]["containers"][0]  # noqa: E731
    assert any("maxReplicas" in e for e in broken(lambda o: group(o).pop("maxReplicas")))
    assert any(
        "workerGroupSpec" in e
        for e in broken(lambda o: o["spec"]["rayClusterConfig"].update(workerGroupSpec=[]))
    )
    assert any(
        "limits" in e for e in broken(lambda o: container(o)["resources"]["limits"].update(cpu="lots"))
    )
    assert any("int32" in e for e in broken(lambda o: group(o).update(maxReplicas=2**31)))
    assert any(
        "duplicate" in e
        for e in broken(lambda o: container(o)["ports"].append(dict(container(o)["ports"][0])))
    )
    assert any("CEL" in e for e in broken(lambda o: o["spec"].update(managedBy="someone-else")))


def test_core_objects_and_every_pod_template_pass_kubernetes_schemas():
    checked = 0
    for obj in committed_objects():
        if obj["kind"] not in CRD_FILES:  # ConfigMap, Namespace, NetworkPolicy
            core_validate(obj)
            checked += 1
            continue
        for template in pod_templates(obj):
            core_validate(
                {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
            )
            checked += 1
    assert checked >= 12
    bad = k8s.config_map(FleetConfig())
    bad["data"]["fleet.yaml"] = 3
    with pytest.raises(kubernetes_validate.ValidationError):
        core_validate(bad)


@pytest.mark.skipif(
    shutil.which("kubectl") is None, reason="kubectl is not installed: overlays checked in Python only"
)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_each_overlay_into_the_overlay_rendering(overlay):
    done = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    built = {_key(o): o for o in yaml.safe_load_all(done.stdout)}
    assert built == {_key(o): o for o in overlay_objects(FleetConfig(), overlay)}
    if CRD_DIR.is_dir():  # the built objects are the ones validated above; check them anyway
        for obj in built.values():
            if obj["kind"] in CRD_FILES:
                assert crd_errors(obj) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_patches_reproduce_the_overlay_config(overlay):
    expected = {_key(o): o for o in overlay_objects(FleetConfig(), overlay)}
    assert kustomize_in_python(K8S, overlay) == expected


def test_rayservice_serves_fleets_app_on_gpu_groups_with_healthz_probes():
    cfg = FleetConfig()
    svc = k8s.ray_service(cfg)
    serve = yaml.safe_load(svc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve)  # what KubeRay hands to Serve's REST API
    (app,) = serve["applications"]
    assert app["import_path"] == SERVE_IMPORT_PATH
    assert app["args"] == {"config": f"{k8s.CONFIG_DIR}/{k8s.CONFIG_FILE}"}
    deployments = {d["name"]: d for d in app["deployments"]}
    assert set(deployments) == {"FleetIngress", "FleetModel"}
    assert deployments["FleetModel"]["ray_actor_options"]["num_gpus"] == cfg.deploy.serve_gpus

    spec = svc["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    head = spec["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}.items() >= {
        "dashboard": 8265,
        "serve": 8000,
    }.items()
    groups = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == [
        n for n, t in cfg.deploy.node_types.items() if "serve" in t.roles
    ]
    for group in groups:
        container = group["template"]["spec"]["containers"][0]
        assert container["readinessProbe"]["httpGet"] == {"path": HEALTH_PATH, "port": cfg.serve.port}
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_prod_serving_autoscales_between_the_configured_replicas():
    prod = {_key(o): o for o in overlay_objects(FleetConfig(), "prod")}
    serve = yaml.safe_load(prod[("RayService", "fleet")]["spec"]["serveConfigV2"])
    model = next(d for d in serve["applications"][0]["deployments"] if d["name"] == "FleetModel")
    assert model["autoscaling_config"]["min_replicas"] == 2
    assert model["autoscaling_config"]["max_replicas"] == 16
    assert ServeDeploySchema.model_validate(serve)


def test_ray_autoscaler_reads_mig_slices_from_the_training_cluster():
    """Ray's own KubeRay autoscaler derives node types from the CR: MIG instances must reach it."""
    cfg = FleetConfig()
    cr = k8s.ray_cluster(cfg)
    cr["metadata"]["namespace"] = cfg.deploy.namespace
    derived = _derive_autoscaling_config_from_ray_cr(cr)  # also runs Ray's validate_config
    h100 = derived["available_node_types"]["h100"]
    assert h100["min_workers"] == 0 and h100["max_workers"] == cfg.deploy.node_types["h100"].max_workers
    assert h100["resources"]["GPU"] == 8 * 2
    assert h100["resources"]["fleet_slice_3g.40gb"] == 16
    assert h100["resources"]["CPU"] == 180
    container = cr["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/mig-3g.40gb"] == "16"
    assert "nvidia.com/gpu" not in container["resources"]["limits"]
    assert all(g["minReplicas"] == 0 for g in cr["spec"]["workerGroupSpecs"])
    assert cr["spec"]["enableInTreeAutoscaling"] is True
    assert derived["idle_timeout_minutes"] == cfg.deploy.idle_timeout_s / 60


def test_cron_job_runs_one_cycle_on_the_training_cluster():
    cfg = FleetConfig()
    cron = k8s.ray_cron_job(cfg)
    job = cron["spec"]["jobTemplate"]
    assert cron["spec"]["schedule"] == cfg.deploy.cron_schedule
    assert job["entrypoint"] == "fleet run --once"
    assert job["clusterSelector"] == {"ray.io/cluster": k8s.ray_cluster(cfg)["metadata"]["name"]}
    assert job["submitterPodTemplate"]["spec"]["restartPolicy"] == "Never"


def test_secrets_are_referenced_never_rendered_and_every_container_is_bounded():
    for obj in committed_objects():
        assert obj["kind"] != "Secret"
        templates = pod_templates(obj) if obj["kind"] in CRD_FILES else []
        for template in templates:
            for container in template["spec"]["containers"]:
                resources = container["resources"]
                assert resources["requests"] == resources["limits"], container["name"]
                assert {"cpu", "memory"} <= set(resources["limits"]), container["name"]
                for var in container.get("env", []):
                    if var["name"].startswith(("FLEET_DB", "FLEET_STORE", "AWS_", "RAY_AUTH_TOKEN")):
                        assert set(var) == {"name", "valueFrom"}, var
                        assert "secretKeyRef" in var["valueFrom"]
                assert "livenessProbe" in container or container["name"] == "ray-job-submitter"
                assert "readinessProbe" in container or container["name"] == "ray-job-submitter"
        if obj["kind"] in ("RayService", "RayCluster"):
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            assert spec["autoscalerOptions"]["resources"]["limits"]


def test_configmap_holds_a_loadable_cluster_config_without_connection_strings(tmp_path):
    cm = _load(K8S / "base" / "configmap.yaml")
    path = tmp_path / "fleet.yaml"
    path.write_text(cm["data"]["fleet.yaml"])
    cfg = load_config(path, env={})
    assert cfg.registry.url is None and cfg.store.uri is None
    assert cfg.data_dir == FleetConfig().deploy.data_dir
    assert cfg.serve.host == "0.0.0.0"
    assert cfg.ray.address == "auto"
    assert "deploy:" not in cm["data"]["fleet.yaml"]
    cfg = load_config(path, env={"FLEET_DB_URL": "postgresql+psycopg://fleet@db/fleet"})
    assert cfg.registry_url == "postgresql+psycopg://fleet@db/fleet"


def test_dev_overlay_runs_on_cpu_pods_only():
    dev = {_key(o): o for o in overlay_objects(FleetConfig(), "dev")}
    for name in ("fleet", "fleet-train"):
        kind = "RayService" if name == "fleet" else "RayCluster"
        spec = dev[(kind, name)]["spec"]
        spec = spec.get("rayClusterConfig", spec)
        assert [g["groupName"] for g in spec["workerGroupSpecs"]] == ["cpu"]
        limits = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert not any(key.startswith("nvidia.com/") for key in limits)
    assert all(o["metadata"].get("namespace", "fleet-dev") == "fleet-dev" for o in dev.values())


def test_both_clusters_require_rays_token_and_stay_cluster_internal():
    """The dashboard and Jobs API run any code with the nodes' credentials: token authentication
    on both clusters (the CRDs' authOptions), ClusterIP services only, and the cycle's submitter
    carrying the token."""
    for obj in committed_objects():
        if obj["kind"] in ("RayService", "RayCluster"):
            spec = obj["spec"].get("rayClusterConfig", obj["spec"])
            assert spec["authOptions"] == {"mode": "token", "secretName": "fleet-ray-token"}
            assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
            assert crd_errors(obj) == []
        if obj["kind"] == "RayCronJob":
            (container,) = obj["spec"]["jobTemplate"]["submitterPodTemplate"]["spec"]["containers"]
            env = {v["name"]: v for v in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
                "name": "fleet-ray-token",
                "key": "auth_token",
            }
        assert "LoadBalancer" not in yaml.safe_dump(obj) and "NodePort" not in yaml.safe_dump(obj)
    bad = k8s.ray_cluster(FleetConfig())
    bad["spec"]["authOptions"]["mode"] = "password"
    assert any("authOptions" in e for e in crd_errors(bad))


def _admits(policy: dict[str, Any], namespace: str, labels: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy admits a TCP connection from a pod (the API server's semantics for
    one policy: rules are ORed; a peer's namespace and pod selectors are ANDed; no `from` = anyone)."""

    def peer_matches(peer: dict[str, Any]) -> bool:
        ns = peer.get("namespaceSelector", {}).get("matchLabels")
        pods = peer.get("podSelector", {}).get("matchLabels")
        if ns is None and namespace != policy["metadata"]["namespace"]:
            return False  # a bare podSelector means pods of the policy's own namespace
        ns_ok = ns is None or ns == {"kubernetes.io/metadata.name": namespace}
        return ns_ok and (pods is None or pods.items() <= labels.items())

    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if (not ports or port in ports) and ("from" not in rule or any(map(peer_matches, rule["from"]))):
            return True
    return False


def test_network_policy_admits_only_fleet_the_operator_and_the_operators_namespace():
    objs = {_key(o): o for o in overlay_objects(FleetConfig(), "prod")}
    policy = objs[("NetworkPolicy", "fleet")]
    core_validate(policy)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    head = objs[("RayCluster", "fleet-train")]["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= head.items()  # it selects fleet's pods
    fleet_pod, ns = head, "fleet"
    stranger = {"app": "anything"}
    kuberay = {"app.kubernetes.io/name": "kuberay-operator"}
    dashboard, jobs_client, gcs, api = 8265, 10001, 6379, 8000
    assert _admits(policy, ns, fleet_pod, gcs) and _admits(policy, ns, fleet_pod, dashboard)
    assert _admits(policy, "kuberay-system", kuberay, dashboard)
    assert _admits(policy, "fleet-operators", stranger, dashboard) and _admits(
        policy, "fleet-operators", stranger, jobs_client
    )
    for who in (
        ("fleet", stranger),
        ("default", stranger),
        ("kuberay-system", stranger),
        ("default", kuberay),
    ):
        assert not _admits(policy, *who, dashboard) and not _admits(policy, *who, gcs), who
    assert _admits(policy, "default", stranger, api)  # the API answers with an API key only
    narrowed = FleetConfig(deploy={"api_namespaces": ["ingress-nginx"]})
    policy = k8s.network_policy(narrowed)
    policy["metadata"]["namespace"] = "fleet"
    assert _admits(policy, "ingress-nginx", stranger, api) and not _admits(policy, "default", stranger, api)


def test_rendering_is_deterministic():
    assert render_k8s(FleetConfig()) == render_k8s(FleetConfig())


def test_serve_import_path_resolves_once_serving_is_built():
    import importlib

    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            pytest.skip(f"{module} is not in this build yet; the manifests point at {SERVE_IMPORT_PATH}")
        raise
    assert callable(getattr(loaded, attr))
