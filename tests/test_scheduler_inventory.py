"""Slice types, inventories (config, Ray node records), reservation for serving, placement
resources, and the memory model's sizes."""

from __future__ import annotations

import numpy as np
import pytest

from fleet.config import load_config
from fleet.errors import ConfigError
from fleet.scheduler import BaseSpec, Inventory, resources_for_slice, slice_type, synthetic_inventory
from fleet.scheduler.memory import member_bytes, members_fit
from fleet.scheduler.ray_inventory import inventory_from_nodes


@pytest.mark.parametrize(
    ("profile", "gpu", "name", "memory", "speed", "resources"),
    [
        ("h100-80gb", None, "h100-80gb", 80, 1.0, {"GPU": 1.0, "accelerator_type:H100": 0.001}),
        ("full", "H100", "h100-80gb", 80, 1.0, {"GPU": 1.0, "accelerator_type:H100": 0.001}),
        ("a10g", None, "a10g", 24, 0.12, {"GPU": 1.0, "accelerator_type:A10G": 0.001}),
        (
            "frac-0.5",
            "a100-80gb",
            "a100-80gb:frac-0.5",
            40,
            0.2,
            {"GPU": 0.5, "accelerator_type:A100-80G": 0.001},
        ),
        ("1g.10gb", None, "a100-40gb:1g.10gb", 10, 0.4 / 7, {"GPU": 1.0, "fleet_slice_1g.10gb": 1.0}),
        (
            "mig-3g.40gb",
            "h100-80gb",
            "h100-80gb:3g.40gb",
            40,
            3 / 7,
            {"GPU": 1.0, "fleet_slice_3g.40gb": 1.0},
        ),
        ("1g.5gb", None, "a100-40gb:1g.5gb", 5, 0.4 / 7, {"GPU": 1.0, "fleet_slice_1g.5gb": 1.0}),
        ("7g.40gb", None, "a100-40gb:7g.40gb", 40, 0.4, {"GPU": 1.0, "fleet_slice_7g.40gb": 1.0}),
        ("h100:7g.80gb", None, "h100-80gb:7g.80gb", 80, 1.0, {"GPU": 1.0, "fleet_slice_7g.80gb": 1.0}),
        ("4g.40gb", None, "a100-80gb:4g.40gb", 40, 1.6 / 7, {"GPU": 1.0, "fleet_slice_4g.40gb": 1.0}),
        ("cpu", None, "cpu", 8, 0.01, {"CPU": 1.0}),
    ],
)
def test_profiles(profile, gpu, name, memory, speed, resources):
    st = slice_type(profile, gpu=gpu)
    assert (st.name, st.memory_gb) == (name, memory)
    assert st.speed == pytest.approx(speed)
    assert resources_for_slice(st) == resources == resources_for_slice(st.name)


@pytest.mark.parametrize(
    ("profile", "gpu", "message"),
    [
        ("tpu-v5", None, "unknown slice profile"),
        ("full", None, "needs its card"),
        ("frac-0.5", None, "needs its card"),
        ("frac-1.5", "a10g", "strictly between 0 and 1"),
        ("1g.5gb", "h100-80gb", "unknown MIG profile"),
        ("h100:1g.10gb", "a10g", "names GPU"),
        ("9g.90gb", None, "unknown slice profile"),
        ("a10g", "quantum-9", "unknown GPU"),
    ],
)
def test_bad_profiles(profile, gpu, message):
    with pytest.raises(ConfigError, match=message):
        slice_type(profile, gpu=gpu)


def test_inventory_from_config_and_reserve(tmp_path):
    (tmp_path / "fleet.yaml").write_text(
        "scheduler:\n"
        "  reserve_serving_fraction: 0.25\n"
        "  inventory:\n"
        "    - {profile: h100-80gb, count: 4, node: gpu-a}\n"
        "    - {profile: 1g.10gb, gpu: h100-80gb, count: 7, node: gpu-b}\n"
        "    - {profile: frac-0.5, gpu: a10g, count: 2, speed: 0.05}\n"
    )
    cfg = load_config(tmp_path / "fleet.yaml", env={})
    inv = Inventory.from_config(cfg)
    assert inv.total == 13
    table = inv.table(cfg.scheduler.reserve_serving_fraction)
    assert table.reserved.sum() == 3  # floor(0.25 · 13), spread by largest remainder
    reserved_types = [table.types[t].name for t in table.type_index[table.reserved]]
    assert sorted(reserved_types) == ["h100-80gb", "h100-80gb:1g.10gb", "h100-80gb:1g.10gb"]
    assert table.speed[-1] == 0.05 and table.node[0] == "gpu-a"
    assert len(table.training) == 10
    (tmp_path / "bad.yaml").write_text("scheduler:\n  inventory:\n    - {profile: 5g.50gb}\n")
    with pytest.raises(ConfigError, match=r"scheduler.inventory\[0\]"):
        Inventory.from_config(load_config(tmp_path / "bad.yaml", env={}))


def test_inventory_from_ray_nodes():
    nodes = [
        {
            "NodeID": "a",
            "Alive": True,
            "Resources": {"CPU": 8, "GPU": 7, "fleet_slice_1g.10gb": 7, "accelerator_type:H100": 1},
        },
        {
            "NodeID": "b",
            "Alive": True,
            "Resources": {"CPU": 8, "GPU": 2, "accelerator_type:A100": 1, "accelerator_type:A100-80G": 1},
        },
        {"NodeID": "c", "Alive": True, "Resources": {"CPU": 4, "memory": 16e9}},
        {"NodeID": "d", "Alive": False, "Resources": {"GPU": 8, "accelerator_type:H100": 1}},
    ]
    inv = inventory_from_nodes(nodes)
    got = {(g.type.name, g.count, g.node) for g in inv.groups}
    assert got == {("h100-80gb:1g.10gb", 7, "a"), ("a100-80gb", 2, "b")}
    cpu_only = inventory_from_nodes([nodes[2]], cpus_per_slice=2)
    (group,) = cpu_only.groups
    assert (group.type.name, group.count, group.type.memory_gb, group.type.cpus) == ("cpu", 2, 8.0, 2)
    with pytest.raises(ConfigError, match="unknown type"):
        inventory_from_nodes([{"NodeID": "x", "Resources": {"GPU": 1, "accelerator_type:Z9": 1}}])
    with pytest.raises(ConfigError, match="MIG"):
        inventory_from_nodes(
            [{"NodeID": "y", "Resources": {"GPU": 1, "fleet_slice_1g.5gb": 1, "accelerator_type:H100": 1}}]
        )
    with pytest.raises(ConfigError, match="empty"):
        inventory_from_nodes([{"NodeID": "z", "Resources": {"CPU": 0.5}}])


def test_synthetic_inventory_is_mixed_and_deterministic():
    inv = synthetic_inventory(512)
    assert inv.total == 512 and inv == synthetic_inventory(512)
    kinds = {g.type.kind for g in inv.groups}
    assert kinds == {"gpu", "mig", "frac"}
    with pytest.raises(ConfigError):
        synthetic_inventory(0)


def test_memory_model_numbers():
    one_b = BaseSpec.preset("1b")
    assert 1.1e9 < one_b.params < 1.4e9  # Llama-3.2-1B has 1.24 B parameters
    eight_b = BaseSpec.preset("8b")
    assert 7.5e9 < eight_b.params < 8.5e9
    mb = member_bytes(one_b, np.array([8, 8]), np.array([0, 2]), rows=4, context_length=128)
    assert mb[1] > mb[0]  # an individual carries two frozen ancestors
    fit = members_fit(np.array([10.0, 24.0, 80.0]), one_b, float(mb.max()), 64)
    assert 1 <= fit[0] < fit[1] < fit[2] <= 64
    assert members_fit(np.array([10.0]), eight_b, float(mb.max()), 64)[0] == 0
    hf = {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
    }
    assert BaseSpec.from_hf_config("x", hf) == BaseSpec.preset("1b", "x")
    with pytest.raises(ConfigError, match="hidden_size"):
        BaseSpec.from_hf_config("x", {})
