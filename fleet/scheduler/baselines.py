"""Baseline policies through the same interface as ``plan()``: same eligibility, capacity,
packing and output, different order, and none of fleet's shares, budgets or aging.

- ``fifo``: oldest pending data first (``pending_age_s`` descending), what a queue of
  training requests would do;
- ``round-robin``: least recently trained first (``since_last_s`` descending), every model
  in turn whatever its owner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fleet.scheduler.demand import Demand
from fleet.scheduler.inventory import Inventory
from fleet.scheduler.policy import Candidates, PolicyConfig, plan, run_policy
from fleet.scheduler.result import Plan


def _descending(values: np.ndarray) -> np.ndarray:
    # stable, so equal values keep index order (deterministic ties)
    return np.argsort(-values, kind="stable")


def fifo_order(demand: Demand, c: Candidates, cfg: PolicyConfig):
    n = len(c.idx)
    return _descending(demand.pending_age_s[c.idx]), np.ones(n, bool), np.zeros(n, bool), c.desired


def round_robin_order(demand: Demand, c: Candidates, cfg: PolicyConfig):
    n = len(c.idx)
    since = np.nan_to_num(demand.since_last_s[c.idx], posinf=np.finfo(np.float64).max)
    return _descending(since), np.ones(n, bool), np.zeros(n, bool), c.desired


def plan_fifo(
    demand: Demand, inventory: Inventory, config: PolicyConfig | None = None, now: float = 0.0
) -> Plan:
    return run_policy(demand, inventory, config or PolicyConfig(), now, order_fn=fifo_order, name="fifo")


def plan_round_robin(
    demand: Demand, inventory: Inventory, config: PolicyConfig | None = None, now: float = 0.0
) -> Plan:
    return run_policy(
        demand, inventory, config or PolicyConfig(), now, order_fn=round_robin_order, name="round-robin"
    )


PlanFn = Callable[[Demand, Inventory, PolicyConfig | None, float], Plan]
POLICIES: dict[str, PlanFn] = {"fleet": plan, "fifo": plan_fifo, "round-robin": plan_round_robin}


def policy_named(name: str) -> PlanFn:
    from fleet.errors import ValidationError

    try:
        return POLICIES[name]
    except KeyError:
        raise ValidationError(f"unknown policy {name!r}; policies: {', '.join(POLICIES)}") from None
