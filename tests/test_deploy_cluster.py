"""cluster.yaml: equal to the default config's rendering, and accepted by Ray's and boto's own checks."""

from __future__ import annotations

import shlex
from pathlib import Path

import botocore.session
import pytest
import ray
import yaml
from botocore.validate import ParamValidator
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from fleet.config import FleetConfig, load_config
from fleet.deploy import cluster_launcher_config, render_cluster_yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def committed() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def _echo_json(command: str) -> tuple[dict, str]:
    """(JSON written, path) of a setup command `echo '<json>' > path`."""
    echo, payload, redirect, path = shlex.split(command)
    assert (echo, redirect) == ("echo", ">")
    return yaml.safe_load(payload), path


def test_committed_cluster_yaml_is_the_rendering_of_the_default_config():
    assert CLUSTER_YAML.read_text() == render_cluster_yaml(FleetConfig()), "run `fleet cluster-yaml`"


def test_ray_accepts_cluster_yaml_as_written_and_as_ray_up_prepares_it(committed):
    validate_config(committed)  # the schema shipped with Ray, plus its cross-field checks
    prepared = prepare_config(committed)  # what `ray up` does before launching: merge AWS defaults
    validate_config(prepared)
    # Every command list is ours: none of Ray's AWS defaults (a nightly wheel install) leaks in.
    for key in (
        "setup_commands",
        "initialization_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    ):
        assert prepared[key] == committed[key], key
    # `ray up` runs setup_commands then the head's (or worker's) own, which are empty.
    assert prepared["head_setup_commands"] == prepared["worker_setup_commands"] == committed["setup_commands"]
    assert prepared["available_node_types"]["a10g"]["max_workers"] == 8


def test_node_types_advertise_gpus_and_mig_slices(committed):
    types = committed["available_node_types"]
    assert committed["head_node_type"] == "head" and "GPU" not in types["head"]["resources"]
    assert types["a10g"]["resources"] == {"GPU": 1}
    assert types["h100"]["resources"] == {"GPU": 16, "fleet_slice_3g.40gb": 16}
    assert types["h100"]["min_workers"] == 0
    assert "sudo nvidia-smi mig -cgi 3g.40gb,3g.40gb -C" in types["h100"]["initialization_commands"]
    assert "initialization_commands" not in types["a10g"]
    assert "CUDA_VISIBLE_DEVICES=$MIG" in committed["worker_start_ray_commands"][-1]
    assert committed["max_workers"] == sum(t.get("max_workers", 0) for t in types.values())
    assert committed["idle_timeout_minutes"] == 10 and committed["upscaling_speed"] == 1.0


def test_node_configs_are_valid_ec2_run_instances_requests(committed):
    """Ray passes node_config to EC2 RunInstances (adding the AMI and counts): check it against botocore's model."""
    shape = (
        botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    )
    for name, node_type in committed["available_node_types"].items():
        params = {
            **node_type["node_config"],
            "ImageId": "ami-0123456789abcdef0",
            "MinCount": 1,
            "MaxCount": 1,
        }
        report = ParamValidator().validate(params, shape)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"
    bad = {"InstanceType": "g5.8xlarge", "BlockDevices": [], "ImageId": "ami-0", "MinCount": 1, "MaxCount": 1}
    assert ParamValidator().validate(bad, shape).has_errors()


def test_nodes_get_fleet_its_config_and_secrets_by_environment(committed, tmp_path):
    setup = committed["setup_commands"]
    assert setup[0] == "pip install -q --upgrade ~/fleet-src"
    assert committed["file_mounts"]["~/fleet-src"] == "."
    assert committed["file_mounts"]["~/fleet.env"] == "~/.fleet/cluster.env"
    fleet_yaml, config_path = _echo_json(setup[2])
    serve, _ = _echo_json(setup[3])
    local = tmp_path / "fleet.yaml"
    local.write_text(yaml.safe_dump(fleet_yaml))
    cfg = load_config(
        local, env={"FLEET_DB_URL": "postgresql+psycopg://u@db/fleet", "FLEET_STORE_URI": "s3://b/p"}
    )
    assert cfg.registry_url == "postgresql+psycopg://u@db/fleet" and cfg.store_uri == "s3://b/p"
    assert cfg.ray.address == "auto" and cfg.serve.host == "0.0.0.0"
    assert "registry" not in fleet_yaml and "store" not in fleet_yaml  # connection strings never in the file
    ServeDeploySchema.model_validate(serve)
    assert serve["applications"][0]["import_path"] == "fleet.serve.app:build"
    assert serve["applications"][0]["args"] == {"config": config_path}
    for start in (committed["head_start_ray_commands"][-1], committed["worker_start_ray_commands"][-1]):
        assert "set -a; . ~/fleet.env; set +a" in start and f"FLEET_CONFIG={config_path}" in start


def test_ray_version_matches_the_installed_ray(committed):
    assert FleetConfig().deploy.ray_version == ray.__version__
    assert committed["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"


def test_package_source_as_requirement_or_wheel():
    cfg = FleetConfig()
    cfg.deploy.package_source = "fleet @ git+https://example.org/acme/fleet@v0.1.0"
    launcher = cluster_launcher_config(cfg)
    assert (
        launcher["setup_commands"][0]
        == "pip install -q --upgrade 'fleet @ git+https://example.org/acme/fleet@v0.1.0'"
    )
    assert "~/fleet-src" not in launcher["file_mounts"]
    cfg.deploy.package_source = "./dist/fleet-0.1.0-py3-none-any.whl"
    launcher = cluster_launcher_config(cfg)
    assert launcher["file_mounts"]["~/fleet-src/fleet-0.1.0-py3-none-any.whl"] == cfg.deploy.package_source
    validate_config(launcher)


def test_cli_writes_and_prints_cluster_yaml(tmp_path, capsys, monkeypatch):
    from fleet.cli import main

    monkeypatch.chdir(tmp_path)  # the built-in config, not a fleet.yaml lying around
    monkeypatch.delenv("FLEET_CONFIG", raising=False)

    out = tmp_path / "cluster.yaml"
    assert main(["cluster-yaml", "--out", str(out)]) == 0
    assert out.read_text() == CLUSTER_YAML.read_text()
    capsys.readouterr()
    assert main(["cluster-yaml", "--out", "-"]) == 0
    assert capsys.readouterr().out == CLUSTER_YAML.read_text()
