"""GPU slices: the types fleet knows, an inventory of them, and what a pack asks Ray for.

A *slice* is the unit one pack trains on. Profiles (the ``profile`` of a config entry):

- ``cpu``: a CPU worker, the stand-in on machines without GPUs;
- a full GPU: ``a10g`` (24 GB), ``l4``, ``l40s``, ``a100-40gb``, ``a100-80gb``, ``h100-80gb``,
  ``h200-141gb``, or ``full`` with the card named separately (``gpu: h100-80gb``);
- a fractional GPU, ``frac-<f>`` with 0 < f < 1 (Ray's ``num_gpus: f``: time-shared, memory
  split by convention);
- a MIG instance: A100-40GB ``1g.5gb 1g.10gb 2g.10gb 3g.20gb 4g.20gb 7g.40gb``; A100-80GB
  and H100 ``1g.10gb 1g.20gb 2g.20gb 3g.40gb 4g.40gb 7g.80gb``; H200 ``1g.18gb … 7g.141gb``.
  A MIG slice is exposed to Ray as the custom resource ``fleet_slice_<profile>`` (e.g.
  ``fleet_slice_1g.10gb: 7``) beside one ``GPU`` per instance, as ``fleet.deploy`` sets
  nodes up (one MIG profile per node type).

Canonical slice-type names qualify the card: ``h100-80gb``, ``a100-80gb:1g.10gb``,
``a10g:frac-0.5``, ``cpu``. A bare MIG profile means the slowest card that has it (an A100
for ``1g.10gb``), so packs sized for it finish early rather than late; name the card
(``gpu: h100-80gb`` or ``h100-80gb:1g.10gb``) to plan for a faster one.

Relative speed is training throughput against a full H100 (1.0); a MIG instance gets g/7 of
its card, a fraction f gets f of it. Memory and speed can be overridden per entry.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from fleet.errors import ConfigError
from fleet.gpus import GPU_ALIASES, GPUS, GpuModel

SLICE_RESOURCE_PREFIX = "fleet_slice_"
ACCELERATOR_PIN = 0.001
"""How much of a node's ``accelerator_type:<T>`` resource a pack asks for: a pin to the card
type, not a limit (Ray puts 1.0 of it on each node)."""


def _mig_default(mig: str) -> GpuModel | None:
    """Card of a bare MIG profile: the slowest (then smallest) card that has it, so packs sized
    for it finish early rather than late."""
    cards = [g for g in GPUS.values() if mig in g.mig]
    return min(cards, key=lambda g: (g.speed, g.memory_gb)) if cards else None


_MIG = re.compile(r"(?:mig-)?([1-7])g\.(\d+)gb")
_FRAC = re.compile(r"frac-(\d*\.?\d+)")
CPU_DEFAULT_MEMORY_GB = 8.0
CPU_DEFAULT_SPEED = 0.01

Kind = Literal["gpu", "mig", "frac", "cpu"]


@dataclass(frozen=True)
class SliceType:
    """One kind of slice: what it is called, its memory and relative speed."""

    name: str
    kind: Kind
    gpu: str | None
    profile: str
    memory_gb: float
    speed: float
    fraction: float = 1.0
    """Share of a GPU (1 full, g/7 MIG, f fractional; 0 for CPU)."""
    cpus: float = 1.0
    """CPUs a CPU slice's worker takes."""

    @property
    def resources(self) -> dict[str, float]:
        return resources_for_slice(self)


def _known_profiles() -> str:
    migs = sorted({m for g in GPUS.values() for m in g.mig})
    return f"cpu, full, {', '.join(GPUS)}, frac-<f> (0<f<1), MIG {' '.join(migs)}, or '<gpu>:<profile>'"


def slice_type(
    profile: str,
    *,
    gpu: str | None = None,
    memory_gb: float | None = None,
    speed: float | None = None,
    cpus: float = 1.0,
) -> SliceType:
    """Parse a profile (see the module docstring) into a :class:`SliceType`."""
    if not isinstance(profile, str) or not profile.strip():
        raise ConfigError(
            f"slice profile must be a non-empty string, got {profile!r}; known: {_known_profiles()}"
        )
    p = profile.strip().lower()
    if ":" in p:
        qualifier, p = p.split(":", 1)
        qualifier = GPU_ALIASES.get(qualifier, qualifier)
        if gpu is not None and GPU_ALIASES.get(gpu.lower(), gpu.lower()) != qualifier:
            raise ConfigError(f"slice profile {profile!r} names GPU {qualifier!r} but gpu is {gpu!r}")
        gpu = qualifier
    card = None
    if gpu is not None:
        name = gpu.strip().lower()
        card = GPUS.get(GPU_ALIASES.get(name, name))
        if card is None:
            raise ConfigError(
                f"unknown GPU {gpu!r} in slice profile {profile!r}; known GPUs: {', '.join(GPUS)}"
            )
    for value, what in ((memory_gb, "memory_gb"), (speed, "speed"), (cpus, "cpus")):
        if value is not None and not (isinstance(value, int | float) and value > 0 and math.isfinite(value)):
            raise ConfigError(f"slice profile {profile!r}: {what} must be a positive number, got {value!r}")

    if p == "cpu":
        if card is not None:
            raise ConfigError(f"slice profile {profile!r}: a cpu slice has no GPU")
        return SliceType(
            "cpu",
            "cpu",
            None,
            "cpu",
            memory_gb or CPU_DEFAULT_MEMORY_GB,
            speed or CPU_DEFAULT_SPEED,
            0.0,
            cpus,
        )
    p = GPU_ALIASES.get(p, p)
    if p in GPUS or p == "full":
        if p in GPUS:
            if card is not None and card.name != p:
                raise ConfigError(f"slice profile {profile!r} names {p!r} but gpu is {card.name!r}")
            card = GPUS[p]
        if card is None:
            raise ConfigError(f"slice profile 'full' needs its card: set gpu to one of {', '.join(GPUS)}")
        return SliceType(
            card.name, "gpu", card.name, "full", memory_gb or card.memory_gb, speed or card.speed, 1.0
        )
    m = _FRAC.fullmatch(p)
    if m:
        f = float(m.group(1))
        if not 0.0 < f < 1.0:
            raise ConfigError(f"slice profile {profile!r}: a fraction must lie strictly between 0 and 1")
        if card is None:
            raise ConfigError(
                f"slice profile {profile!r} needs its card: set gpu to one of {', '.join(GPUS)}"
            )
        return SliceType(
            f"{card.name}:frac-{f:g}",
            "frac",
            card.name,
            f"frac-{f:g}",
            memory_gb or card.memory_gb * f,
            speed or card.speed * f,
            f,
        )
    m = _MIG.fullmatch(p)
    if m:
        mig = f"{m.group(1)}g.{m.group(2)}gb"
        if card is None:
            card = _mig_default(mig)
        if card is None or mig not in card.mig:
            where = (
                f"GPU {card.name!r} (its MIG profiles: {' '.join(card.mig) or 'none'})"
                if card
                else "any known GPU"
            )
            raise ConfigError(f"unknown MIG profile {profile!r} for {where}")
        g = int(m.group(1))
        return SliceType(
            f"{card.name}:{mig}",
            "mig",
            card.name,
            mig,
            memory_gb or float(m.group(2)),
            speed or card.speed * g / 7.0,
            g / 7.0,
        )
    raise ConfigError(f"unknown slice profile {profile!r}; known: {_known_profiles()}")


def resources_for_slice(slice_: SliceType | str) -> dict[str, float]:
    """What a pack's Ray Train worker requests to land on one slice of this type.

    Full and fractional GPUs ask for ``GPU`` (so Ray sets ``CUDA_VISIBLE_DEVICES``) and pin
    the card with a sliver of ``accelerator_type:<T>``. A MIG slice asks for one unit of its
    node's ``fleet_slice_<profile>`` resource, plus one ``GPU``: a MIG node shows Ray each
    instance as a GPU (``fleet.deploy`` gives a node type one profile), so the worker gets
    its instance in ``CUDA_VISIBLE_DEVICES``. A CPU slice asks for its CPUs.
    """
    st = slice_type(slice_) if isinstance(slice_, str) else slice_
    if st.kind == "cpu":
        return {"CPU": float(st.cpus)}
    if st.kind == "mig":
        return {"GPU": 1.0, f"{SLICE_RESOURCE_PREFIX}{st.profile}": 1.0}
    pin = f"accelerator_type:{GPUS[st.gpu].ray_type}"  # type: ignore[index]
    return {"GPU": float(st.fraction), pin: ACCELERATOR_PIN}


@dataclass(frozen=True)
class SliceGroup:
    """``count`` slices of one type, on one node when known."""

    type: SliceType
    count: int
    node: str | None = None


@dataclass(frozen=True)
class SliceTable:
    """An inventory expanded to one row per slice (what the policy plans over)."""

    types: tuple[SliceType, ...]
    type_index: np.ndarray  # (S,) int32 into types
    node: tuple[str | None, ...]  # (S,)
    speed: np.ndarray  # (S,) float64
    memory_gb: np.ndarray  # (S,) float64
    reserved: np.ndarray  # (S,) bool: kept for serving

    @property
    def training(self) -> np.ndarray:
        """Indices of the slices training may use."""
        return np.flatnonzero(~self.reserved)


@dataclass(frozen=True)
class Inventory:
    """The slices there are to plan over."""

    groups: tuple[SliceGroup, ...]

    def __post_init__(self) -> None:
        if not self.groups or sum(g.count for g in self.groups) == 0:
            raise ConfigError(
                "the slice inventory is empty: list slices under scheduler.inventory in the config, "
                "or run on a Ray cluster whose nodes have GPUs (or CPUs)"
            )
        for g in self.groups:
            if g.count < 0:
                raise ConfigError(f"slice group {g.type.name!r} has a negative count ({g.count})")

    @property
    def total(self) -> int:
        return sum(g.count for g in self.groups)

    @classmethod
    def from_entries(
        cls, entries: Iterable[Mapping[str, Any] | Any], *, cpus_per_slice: float = 1.0
    ) -> Inventory:
        """From config-style entries: mappings or objects with ``profile``, ``count``, and optional
        ``gpu``, ``memory_gb``, ``speed``, ``node``."""
        groups = []
        for i, e in enumerate(entries):
            get = e.get if isinstance(e, Mapping) else (lambda k, d=None, e=e: getattr(e, k, d))
            try:
                st = slice_type(
                    get("profile"),
                    gpu=get("gpu"),
                    memory_gb=get("memory_gb"),
                    speed=get("speed"),
                    cpus=cpus_per_slice,
                )
            except ConfigError as exc:
                raise ConfigError(f"scheduler.inventory[{i}]: {exc.message}") from None
            count = get("count", 1)
            if not isinstance(count, int) or count < 0:
                raise ConfigError(
                    f"scheduler.inventory[{i}]: count must be a non-negative integer, got {count!r}"
                )
            groups.append(SliceGroup(st, count, get("node")))
        return cls(tuple(groups))

    @classmethod
    def from_config(cls, cfg: Any) -> Inventory:
        """From ``scheduler.inventory`` of a :class:`fleet.config.FleetConfig` (empty: an error)."""
        return cls.from_entries(cfg.scheduler.inventory, cpus_per_slice=cfg.train.cpus_per_worker)

    def table(self, reserve_fraction: float = 0.0) -> SliceTable:
        """One row per slice; ``floor(reserve_fraction · total)`` of them reserved for serving,
        spread over slice types by largest remainder, taken from the end of each type's list."""
        return _table(self, float(reserve_fraction))

    @cached_property
    def _tables(self) -> dict[float, SliceTable]:
        return {}


def _table(inv: Inventory, reserve_fraction: float) -> SliceTable:
    cache = inv._tables
    if reserve_fraction in cache:
        return cache[reserve_fraction]
    if not 0.0 <= reserve_fraction < 1.0:
        raise ConfigError(f"reserve_serving_fraction must lie in [0, 1), got {reserve_fraction}")
    types: list[SliceType] = []
    index: dict[SliceType, int] = {}
    type_idx, nodes = [], []
    for g in inv.groups:
        t = index.setdefault(g.type, len(types))
        if t == len(types):
            types.append(g.type)
        type_idx += [t] * g.count
        nodes += [g.node] * g.count
    tix = np.asarray(type_idx, dtype=np.int32)
    total = len(tix)
    n_reserved = math.floor(reserve_fraction * total)
    per_type = np.bincount(tix, minlength=len(types))
    quota = per_type * n_reserved / max(total, 1)
    take = np.floor(quota).astype(np.int64)
    rest = n_reserved - int(take.sum())
    if rest > 0:  # largest remainder; ties to the type listed first
        order = np.lexsort((np.arange(len(types)), -(quota - take)))
        take[order[:rest]] += 1
    reserved = np.zeros(total, dtype=bool)
    for t in range(len(types)):
        rows = np.flatnonzero(tix == t)
        if take[t]:
            reserved[rows[len(rows) - take[t] :]] = True
    table = SliceTable(
        types=tuple(types),
        type_index=tix,
        node=tuple(nodes),
        speed=np.array([types[t].speed for t in type_idx], dtype=np.float64),
        memory_gb=np.array([types[t].memory_gb for t in type_idx], dtype=np.float64),
        reserved=reserved,
    )
    cache[reserve_fraction] = table
    return table


# A mixed data-centre fleet: (profile, share of slices). Nodes hold 8 slices of one kind.
_SYNTHETIC_MIX = (
    ("h100-80gb", 0.20),
    ("a100-80gb", 0.15),
    ("a10g", 0.10),
    ("h100-80gb:3g.40gb", 0.10),
    ("h100-80gb:1g.10gb", 0.15),
    ("a100-80gb:2g.20gb", 0.10),
    ("a100-40gb:3g.20gb", 0.10),
    ("h100-80gb:frac-0.5", 0.10),
)


def synthetic_inventory(n_slices: int, *, slices_per_node: int = 8) -> Inventory:
    """A deterministic mixed MIG/fractional/full inventory of ``n_slices`` (simulator, benchmarks)."""
    if n_slices < 1:
        raise ConfigError(f"a synthetic inventory needs at least one slice, got {n_slices}")
    shares = np.array([s for _, s in _SYNTHETIC_MIX])
    counts = np.floor(shares * n_slices).astype(np.int64)
    rest = n_slices - int(counts.sum())
    counts[np.argsort(-(shares * n_slices - counts), kind="stable")[:rest]] += 1
    groups, node = [], 0
    for (profile, _), count in zip(_SYNTHETIC_MIX, counts, strict=True):
        st = slice_type(profile)
        while count > 0:
            k = int(min(count, slices_per_node))
            groups.append(SliceGroup(st, k, f"node-{node}"))
            node += 1
            count -= k
    return Inventory(tuple(groups))
