"""The slice inventory of a live Ray cluster (Ray is imported only when called).

Per alive node:

- custom resources ``fleet_slice_<profile>: n`` declare n slices of that profile (MIG
  instances as ``fleet.deploy`` sets them up; ``frac-<f>`` works too); a node that declares
  any offers exactly those slices;
- otherwise its ``GPU`` count gives full GPUs of the card named by its
  ``accelerator_type:<T>`` label (``A100-80G``/``A100-40G`` win over plain ``A100``);
- if no node has a GPU slice, CPU slices stand in: ``floor(CPU / cpus_per_slice)`` per node,
  each with an equal part of the node's memory.

The node's id (``NodeID``) is the pack's ``node_hint``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from fleet.errors import ConfigError, UnavailableError
from fleet.gpus import RAY_TYPES
from fleet.scheduler.inventory import SLICE_RESOURCE_PREFIX, Inventory, SliceGroup, slice_type

_PREFERRED_LABELS = ("A100-80G", "A100-40G")


def _card(resources: Mapping[str, float]) -> tuple[str | None, list[str]]:
    labels = sorted(k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:"))
    for label in _PREFERRED_LABELS:
        if label in labels:
            return RAY_TYPES[label], labels
    for label in labels:
        if label in RAY_TYPES:
            return RAY_TYPES[label], labels
    return None, labels


def inventory_from_nodes(nodes: Iterable[Mapping[str, Any]], *, cpus_per_slice: float = 1.0) -> Inventory:
    """Build the inventory from ``ray.nodes()`` records (pure: the records are plain dicts)."""
    alive = sorted((n for n in nodes if n.get("Alive", True)), key=lambda n: str(n.get("NodeID", "")))
    gpu_groups: list[SliceGroup] = []
    for node in alive:
        res: Mapping[str, float] = node.get("Resources") or {}
        node_id = str(node.get("NodeID") or node.get("NodeManagerAddress") or "")
        card, labels = _card(res)
        declared = {
            k[len(SLICE_RESOURCE_PREFIX) :]: v for k, v in res.items() if k.startswith(SLICE_RESOURCE_PREFIX)
        }
        if declared:
            for profile, count in sorted(declared.items()):
                try:
                    st = slice_type(profile, gpu=card)
                except ConfigError as exc:
                    raise ConfigError(
                        f"Ray node {node_id}: resource {SLICE_RESOURCE_PREFIX}{profile}: {exc.message}"
                    ) from None
                gpu_groups.append(SliceGroup(st, int(math.floor(count)), node_id))
            continue
        gpus = int(math.floor(res.get("GPU", 0.0)))
        if gpus >= 1:
            if card is None:
                raise ConfigError(
                    f"Ray node {node_id} has {gpus} GPU(s) of unknown type (accelerator_type labels: "
                    f"{labels or 'none'}); list the slices under scheduler.inventory in the config"
                )
            gpu_groups.append(SliceGroup(slice_type(card), gpus, node_id))
    if gpu_groups:
        return Inventory(tuple(gpu_groups))
    cpu_groups = []
    for node in alive:
        res = node.get("Resources") or {}
        count = int(math.floor(res.get("CPU", 0.0) / cpus_per_slice))
        if count >= 1:
            memory_gb = float(res.get("memory", 8e9 * count)) / count / 1e9
            st = slice_type("cpu", memory_gb=max(memory_gb, 0.1), cpus=cpus_per_slice)
            cpu_groups.append(SliceGroup(st, count, str(node.get("NodeID") or "")))
    return Inventory(tuple(cpu_groups))


def inventory_from_ray(*, cpus_per_slice: float = 1.0) -> Inventory:
    """The slices of the Ray cluster this process is connected to."""
    import ray

    if not ray.is_initialized():
        raise UnavailableError("not connected to a Ray cluster: call ray.init() (or set ray.address) first")
    return inventory_from_nodes(ray.nodes(), cpus_per_slice=cpus_per_slice)


def live_inventory(cfg: Any) -> Inventory:
    """Connect to the configured Ray cluster (or start a local one) and read its slices."""
    from fleet._ray import ensure_ray

    ensure_ray(cfg)
    return inventory_from_ray(cpus_per_slice=cfg.train.cpus_per_worker)
