"""``fleet schedule``, ``fleet cycle``, ``fleet simulate``: output and exits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet.cli import _common as common
from fleet.cli import main
from fleet.cli.scheduler import plan_and_show
from fleet.config import load_config
from fleet.scheduler import Demand, Plan, base_specs, inventory_for


@pytest.fixture
def cfg(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fleet.yaml").write_text(
        "scheduler:\n  reserve_serving_fraction: 0.0\n  inventory:\n"
        "    - {profile: a10g, count: 1, node: n1}\n    - {profile: 1g.10gb, gpu: h100, count: 2, node: n2}\n"
    )
    common.set_config_path(None)
    yield load_config(tmp_path / "fleet.yaml", env={})
    common.set_config_path(None)


def demand() -> Demand:
    rows = [
        {"model_id": f"acme/t{i % 3}/p{i}", "pending_tokens": 20_000 + 1000 * i, "since_last_s": None}
        for i in range(30)
    ]
    rows += [
        {"model_id": "acme", "pending_tokens": 0},
        {"model_id": "initech/ops/x", "pending_tokens": 50, "drift_state": "frozen"},
    ]
    return Demand.from_records(rows, companies={"acme": {"share": 3.0}, "initech": {"share": 1.0}})


def test_schedule_renders_a_table(cfg, capsys):
    d = demand()
    result = plan_and_show(cfg, d, json_out=False, inventory=inventory_for(cfg), now=0.0)
    out = capsys.readouterr().out
    assert "packs" in out and "not scheduled" in out and "acme" in out
    assert "h100-80gb:1g.10gb" in out or "a10g" in out
    assert result.summary["scheduled"] == 30
    assert result.unscheduled == {"acme": "no data", "initech/ops/x": "frozen"}


def test_schedule_json_is_the_pack_file_format(cfg, capsys):
    plan_and_show(cfg, demand(), json_out=True, inventory=inventory_for(cfg), now=42.0)
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "fleet.plan/1" and doc["created_at"] == 42.0
    back = Plan.from_dict(doc)
    members = [m for p in back.packs for m in p.members]
    assert len(members) == len(set(members)) == 30
    for p in back.packs:
        assert len(p.token_budgets) == len(p.members) and p.resources
        assert p.node_hint in ("n1", "n2")
    assert back.unscheduled["initech/ops/x"] == "frozen"


def test_fleet_train_reads_the_pack_file_as_training_orders(cfg, capsys, tmp_path):
    from fleet.errors import ValidationError
    from fleet.ops.cycle import read_plan_file, stored_orders
    from fleet.train.runner import PackOrder

    plan = plan_and_show(cfg, demand(), json_out=True, inventory=inventory_for(cfg), now=42.0)
    path = tmp_path / "plan.json"
    path.write_text(capsys.readouterr().out)
    orders = read_plan_file(path)
    assert [o.members for o in orders] == [tuple(p.members) for p in plan.packs]
    assert all(o.slice_profile and len(o.token_budgets) == len(o.members) for o in orders)
    # what a cycle stores comes back the same, both ways it is written
    assert stored_orders(plan.to_dict(include_unscheduled=False)) == orders
    assert stored_orders({"packs": [o.to_dict() for o in orders]}) == orders
    assert PackOrder.from_dict({"members": ["acme/a"]}) == PackOrder(("acme/a",))
    for bad, why in [
        ('{"packs": []}', "not a fleet plan"),
        ("[1, 2", "not valid JSON"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValidationError, match=why):
            read_plan_file(path)
    with pytest.raises(ValidationError, match="no such plan file"):
        read_plan_file(tmp_path / "missing.json")
    with pytest.raises(ValidationError, match="'members' must be a list"):
        PackOrder.from_dict({"members": "acme/a"})
    with pytest.raises(ValidationError, match="2 members has 1 token budgets"):
        PackOrder(("acme/a", "acme/b"), (10,))


def test_base_specs_reads_the_base_config(cfg):
    specs = base_specs(cfg, ["default"])
    assert specs["default"].name == "default"  # no base on disk: the tiny base's shape
    cfg.base_path.mkdir(parents=True)
    (cfg.base_path / "config.json").write_text(
        json.dumps(
            {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 4,
                "vocab_size": 260,
            }
        )
    )
    assert base_specs(cfg, ["default"])["default"].hidden == 64


def test_schedule_reads_demand_from_the_registry(cfg, capsys):
    """`fleet schedule --json` plans the registry's models: those with pending data are packed."""
    from fleet.registry import NewItem, Registry

    reg = Registry.open(cfg)
    reg.add_tenants(
        [
            ("acme", 2.0),
            ("acme/search", 1.0),
            ("acme/search/dana", 1.0),
            ("acme/search/li", 1.0),
            ("beta", 1.0),
        ],
        base_model=cfg.base.name,
        rank=8,
        alpha=16,
    )
    for i, mid in enumerate(["acme/search/dana", "acme/search/li", "beta"]):
        reg.add_items({mid: [NewItem("document", f"text {i}", 4000, f"{i:064x}")]})
    reg.close()
    assert main(["schedule", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    members = sorted(m for p in doc["packs"] for m in p["members"])
    assert members == ["acme/search/dana", "acme/search/li", "beta"]
    assert doc["unscheduled"] == {"acme": "no data", "acme/search": "no data"}
    assert all(p["base"] == cfg.base.name for p in doc["packs"])


def test_simulate_json_and_plot(cfg, tmp_path, capsys):
    png = tmp_path / "out.png"
    assert (
        main(["simulate", "--models", "600", "--slices", "2", "--hours", "1", "--json", "--plot", str(png)])
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert [r["policy"] for r in doc["reports"]] == ["fleet", "fifo", "round-robin"]
    assert all(r["cycles"] == 6 and 0 <= r["utilization"] <= 1 for r in doc["reports"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["simulate", "--models", "300", "--slices", "1", "--hours", "0.5", "--policy", "fifo"]) == 0
    out = capsys.readouterr().out
    assert "fifo" in out and "Jain" in out and "round-robin" not in out
    assert main(["simulate", "--policy", "lottery"]) == 2
    assert "unknown policy" in capsys.readouterr().err
    assert np.isfinite(doc["reports"][0]["jain"])
