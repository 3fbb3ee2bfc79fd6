"""One plan from the fleet config: the inventory it names (or the live cluster's), the memory
footprints of the bases in the demand, and the configured policy. ``fleet schedule`` prints it;
a cycle (``fleet.ops.cycle``) executes it."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

from fleet.config import FleetConfig
from fleet.scheduler.demand import Demand
from fleet.scheduler.inventory import Inventory
from fleet.scheduler.memory import BaseSpec
from fleet.scheduler.policy import PolicyConfig, plan
from fleet.scheduler.result import Plan


def inventory_for(cfg: FleetConfig) -> Inventory:
    """The configured slices, or (none configured) the live Ray cluster's."""
    if cfg.scheduler.inventory:
        return Inventory.from_config(cfg)
    from fleet.scheduler.ray_inventory import live_inventory  # imports Ray

    return live_inventory(cfg)


def base_specs(cfg: FleetConfig, names: Iterable[str]) -> dict[str, BaseSpec]:
    """Memory footprints of the bases named in the demand: the configured base from its
    ``config.json`` when it is on disk, otherwise the shape of fleet's tiny base."""
    specs = {}
    hf = Path(cfg.base_path) / "config.json"
    for name in names:
        if name in (cfg.base.name, "default") and hf.exists():
            specs[name] = BaseSpec.from_hf_config(name, json.loads(hf.read_text()), cfg.lora.target_modules)
        else:
            specs[name] = BaseSpec.preset("tiny", name)
    return specs


def plan_for(
    cfg: FleetConfig, demand: Demand, *, inventory: Inventory | None = None, now: float | None = None
) -> Plan:
    """The configured policy's plan for ``demand`` on ``inventory`` (default: ``inventory_for``)."""
    inventory = inventory if inventory is not None else inventory_for(cfg)
    policy = PolicyConfig.from_fleet_config(cfg, bases=base_specs(cfg, demand.base_names))
    return plan(demand, inventory, policy, time.time() if now is None else now)
