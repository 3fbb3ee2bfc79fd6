"""A deploy section that cannot become a working cluster fails before anything is written, naming the field."""

from __future__ import annotations

import pytest
import yaml

from fleet.config import FleetConfig, load_config
from fleet.deploy import check_deploy, json_patch, overlay_config, render_cluster_yaml, render_k8s
from fleet.errors import ConfigError


def _cfg(deploy: dict, **sections) -> FleetConfig:
    return FleetConfig.model_validate({"deploy": deploy, **sections})


@pytest.mark.parametrize(
    ("deploy", "sections", "message"),
    [
        (
            {
                "node_types": {
                    "h100": {
                        "gpu": "H100",
                        "gpus": 8,
                        "instance_type": "p5.48xlarge",
                        "mig_profiles": ["1g.5gb"],
                    }
                }
            },
            {},
            "deploy.node_types.h100.mig_profiles: H100 has no MIG profile 1g.5gb",
        ),
        (
            {"node_types": {"a10g": {"gpu": "A10G", "mig_profiles": ["1g.10gb"]}}},
            {},
            "deploy.node_types.a10g.mig_profiles: A10G has no MIG",
        ),
        (
            {
                "node_types": {
                    "h100": {
                        "gpu": "H100",
                        "instance_type": "p5.48xlarge",
                        "mig_profiles": ["4g.40gb", "4g.40gb"],
                    }
                }
            },
            {},
            "needs 8/7 compute",
        ),
        (
            {"node_types": {"v100": {"gpu": "V100", "instance_type": "p3.2xlarge"}}},
            {},
            "deploy.node_types.v100.gpu: unknown GPU model 'V100'",
        ),
        (
            {"node_types": {"a10g": {"gpu": "H100", "instance_type": "g5.8xlarge"}}},
            {},
            "deploy.node_types.a10g.instance_type: g5.8xlarge carries A10G GPUs, not H100",
        ),
        (
            {"node_types": {"a10g": {"gpu": "A10G", "max_workers": 2}}},
            {"serve": {"replicas": 3, "max_replicas": 3}},
            "serve.replicas: 3 model replicas need 3 GPUs",
        ),
        (
            {
                "node_types": {
                    "h100": {
                        "gpu": "H100",
                        "instance_type": "p5.48xlarge",
                        "mig_profiles": ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"],
                    }
                }
            },
            {},
            "deploy.node_types.h100.mig_profiles: one MIG profile per node type",
        ),
        ({"serve_slice": "7g.80gb"}, {}, "deploy.serve_slice: no serving node type offers 7g.80gb"),
        ({"node_types": {"a10g": {"gpu": "A10G", "roles": ["train"]}}}, {}, "no node type has role serve"),
    ],
)
def test_bad_deploy_sections_fail_with_the_field_to_fix(deploy, sections, message):
    cfg = _cfg(deploy, **sections)
    for render in (check_deploy, render_cluster_yaml, render_k8s):
        with pytest.raises(
            ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
        ):
            render(cfg)


def test_serving_on_a_mig_slice_counts_slices_not_gpus():
    deploy = {
        "node_types": {
            "h100": {
                "gpu": "H100",
                "gpus": 8,
                "instance_type": "p5.48xlarge",
                "max_workers": 1,
                "mig_profiles": ["3g.40gb", "3g.40gb"],
                "roles": ["serve", "train"],
            },
        },
        "serve_slice": "3g.40gb",
    }
    check_deploy(_cfg(deploy, serve={"replicas": 16, "max_replicas": 16}))
    with pytest.raises(ConfigError, match="17 model replicas need 17 3g.40gb MIG instances"):
        check_deploy(_cfg(deploy, serve={"replicas": 17, "max_replicas": 17}))


@pytest.mark.parametrize(
    ("deploy", "message"),
    [
        ({"node_types": {"head": {}}}, "must be a DNS label other than 'head'"),
        (
            {"node_types": {"a10g": {"min_workers": 5, "max_workers": 1}}},
            "min_workers \\(5\\) exceeds max_workers \\(1\\)",
        ),
        ({"node_types": {"cpu": {"gpu": "none", "gpus": 2}}}, "gpu: none takes gpus: 0"),
        ({"cron_schedule": "every 10 minutes"}, "is not a 5-field cron schedule"),
        ({"namespace": "Fleet_Prod"}, "is not a DNS label"),
    ],
)
def test_malformed_deploy_sections_fail_when_the_config_loads(tmp_path, deploy, message):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"deploy": deploy}))
    with pytest.raises(ConfigError, match=message):
        load_config(path, env={})


def test_cli_reports_a_bad_mig_profile_and_exits_2(tmp_path, capsys):
    from fleet.cli import main

    path = tmp_path / "fleet.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "deploy": {
                    "node_types": {
                        "h100": {
                            "gpu": "H100",
                            "gpus": 8,
                            "instance_type": "p5.48xlarge",
                            "mig_profiles": ["3g.40gb", "2g.10gb"],
                        }
                    }
                }
            }
        )
    )
    assert main(["--config", str(path), "cluster-yaml", "--out", str(tmp_path / "c.yaml")]) == 2
    assert main(["--config", str(path), "k8s", "render", "--out", str(tmp_path / "k8s")]) == 2
    err = capsys.readouterr().err
    assert "deploy.node_types.h100.mig_profiles: H100 has no MIG profile 2g.10gb" in err
    assert not (tmp_path / "c.yaml").exists() and not (tmp_path / "k8s").exists()


def test_overlays_are_checked_like_the_base():
    cfg = FleetConfig()
    cfg.deploy.overlays = {"prod": {"deploy": {"node_types": {"h100": {"mig_profiles": ["9g.99gb"]}}}}}
    with pytest.raises(ConfigError, match="deploy.overlays.prod: deploy.node_types.h100.mig_profiles"):
        render_k8s(cfg)
    cfg.deploy.overlays = {"prod": {"deploy": {"name": "other"}}}
    with pytest.raises(ConfigError, match="cannot change deploy.name"):
        overlay_config(cfg, "prod")
    cfg.deploy.overlays = {"prod": {"serve": {"replicas": "many"}}}
    with pytest.raises(ConfigError, match="deploy.overlays.prod makes an invalid config: serve.replicas"):
        overlay_config(cfg, "prod")
    with pytest.raises(ConfigError, match="unknown overlay 'staging'"):
        overlay_config(cfg, "staging")


def test_overlay_null_removes_a_node_type():
    dev = overlay_config(FleetConfig(), "dev")
    assert set(dev.deploy.node_types) == {"cpu"}
    assert dev.deploy.namespace == "fleet-dev"


def test_commented_config_round_trips_the_deploy_section(tmp_path):
    from fleet.config import render_commented_yaml

    path = tmp_path / "fleet.yaml"
    path.write_text(render_commented_yaml(FleetConfig()))
    assert load_config(path, env={}).deploy == FleetConfig().deploy


def test_json_patch_escapes_keys_and_replaces_reordered_lists():
    import jsonpatch

    old = {
        "limits": {"nvidia.com/gpu": "1"},
        "groups": [{"groupName": "a", "n": 1}, {"groupName": "b", "n": 2}],
    }
    new = {
        "limits": {"nvidia.com/gpu": "2", "cpu": "4"},
        "groups": [{"groupName": "b", "n": 2}, {"groupName": "a", "n": 1}],
    }
    ops = json_patch(old, new)
    assert {"op": "replace", "path": "/limits/nvidia.com~1gpu", "value": "2"} in ops
    assert {"op": "replace", "path": "/groups", "value": new["groups"]} in ops
    assert jsonpatch.apply_patch(old, ops) == new
    assert json_patch(new, new) == []
    assert json_patch({"a": 1}, {"a": 1.0}) == [{"op": "replace", "path": "/a", "value": 1.0}]


def test_serving_on_a_slice_asks_serve_for_that_slice():
    from ray.serve.schema import ServeDeploySchema

    from fleet.deploy import serve_config

    cfg = FleetConfig()
    cfg.deploy.node_types["h100"].roles = ["serve", "train"]
    cfg.deploy.serve_slice = "3g.40gb"
    check_deploy(cfg)
    config = serve_config(cfg, "/etc/fleet/fleet.yaml")
    ServeDeploySchema.model_validate(config)
    model = config["applications"][0]["deployments"][1]
    assert model["ray_actor_options"]["resources"] == {"fleet_slice_3g.40gb": 1}
    assert model["ray_actor_options"]["num_gpus"] == 1.0
