"""fleet.scheduler: which models train next, packed onto which GPU slices, fairly.

The contract:

- ``plan(demand, inventory, config, now) -> Plan``: the pure policy (numpy in, plain result
  out, no Ray); ``plan_fifo`` and ``plan_round_robin`` are baselines through the same code;
- ``Demand`` (per-model columns; ``Demand.from_records`` / ``from_columns``), ``load_demand``
  (the registry's query);
- ``Inventory`` / ``slice_type`` / ``resources_for_slice`` (what a pack's Ray worker asks
  for); ``inventory_from_ray`` in ``fleet.scheduler.ray_inventory`` (imports Ray lazily);
- ``Plan`` / ``Pack`` (``Plan.to_json`` / ``Plan.from_json``: the ``--pack-file`` format);
- ``plan_for(cfg, demand)``: that policy as the fleet config sets it (``inventory_for``: the
  configured slices or the live cluster's; ``base_specs``: the bases' memory footprints);
- ``PolicyConfig``, ``BaseSpec`` (memory model), ``advance_waiting`` and ``decay`` (what a
  cycle does after a plan);
- ``simulate`` / ``SimConfig`` / ``SimReport``: the fleet simulator (``plot_reports``, ``sim_table``);
- ``print_plan``: a plan as ``fleet schedule`` prints it.
"""

from fleet.scheduler.baselines import POLICIES, plan_fifo, plan_round_robin
from fleet.scheduler.demand import Demand, load_demand
from fleet.scheduler.inventory import (
    Inventory,
    SliceGroup,
    SliceType,
    resources_for_slice,
    slice_type,
    synthetic_inventory,
)
from fleet.scheduler.memory import BaseSpec
from fleet.scheduler.planning import base_specs, inventory_for, plan_for
from fleet.scheduler.policy import PolicyConfig, advance_waiting, decay, plan
from fleet.scheduler.render import print_plan, sim_table
from fleet.scheduler.result import REASONS, Pack, Plan
from fleet.scheduler.simulate import SimConfig, SimReport, plot_reports, simulate

__all__ = [
    "POLICIES",
    "REASONS",
    "BaseSpec",
    "Demand",
    "Inventory",
    "Pack",
    "Plan",
    "PolicyConfig",
    "SimConfig",
    "SimReport",
    "SliceGroup",
    "SliceType",
    "advance_waiting",
    "base_specs",
    "decay",
    "inventory_for",
    "load_demand",
    "plan",
    "plan_fifo",
    "plan_for",
    "plan_round_robin",
    "plot_reports",
    "print_plan",
    "resources_for_slice",
    "sim_table",
    "simulate",
    "slice_type",
    "synthetic_inventory",
]
