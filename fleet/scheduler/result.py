"""The plan: packs to train, models left out and why, GPU-seconds per company.

JSON format (``Plan.to_json``; what ``fleet schedule --json`` prints and
``fleet train --pack-file`` reads), version ``fleet.plan/1``::

    {
      "format": "fleet.plan/1",
      "policy": "fleet",                 # fleet, fifo or round-robin
      "created_at": 1718000000.0,        # the plan's "now" (seconds)
      "cycle_s": 600.0,                  # the cycle the packs are sized for
      "packs": [
        {
          "slice_profile": "h100-80gb:1g.10gb",   # canonical slice type (fleet.scheduler.inventory)
          "resources": {"fleet_slice_1g.10gb": 1.0},  # what the pack's Ray Train worker requests
          "node_hint": "node-3",                   # node of the planned slice, or null
          "base": "default",                       # base model every member trains on
          "members": ["acme/search/dana", ...],    # model ids, one adapter each
          "token_budgets": [40960, ...],           # tokens each member trains on this run
          "start_s": 0.0,                          # planned start, seconds after created_at
          "est_seconds": 312.5                     # planned run time (overhead + tokens/throughput)
        }
      ],
      "unscheduled": {"acme/ops": "interval", ...},  # reasons: budget, frozen, no data, interval, capacity
      "company_gpu_s": {"acme": 1234.5},             # GPU-seconds (full-H100 equivalents) planned per company
      "summary": {"scheduled": 123, "capacity_gpu_s": 115200.0, ...}
    }

Packs on the same slice run one after another (``start_s``); a member's budget is the
number of tokens it contributes over the run, and the members of a pack have similar
budgets so that they finish together.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from fleet.errors import ValidationError

FORMAT = "fleet.plan/1"
REASONS = ("scheduled", "frozen", "no data", "interval", "budget", "capacity")
SCHEDULED, FROZEN, NO_DATA, INTERVAL, BUDGET, CAPACITY = range(len(REASONS))
UNSCHEDULED_REASONS = REASONS[1:]


@dataclass(frozen=True)
class Pack:
    """Models that train together in one run on one slice."""

    slice_profile: str
    node_hint: str | None
    base: str
    members: list[str]
    token_budgets: list[int]
    resources: dict[str, float] = field(default_factory=dict)
    start_s: float = 0.0
    est_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "slice_profile": self.slice_profile,
            "resources": dict(self.resources),
            "node_hint": self.node_hint,
            "base": self.base,
            "members": list(self.members),
            "token_budgets": [int(b) for b in self.token_budgets],
            "start_s": round(float(self.start_s), 3),
            "est_seconds": round(float(self.est_seconds), 3),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "pack") -> Pack:
        try:
            members = [str(m) for m in d["members"]]
            budgets = [int(b) for b in d["token_budgets"]]
            pack = cls(
                slice_profile=str(d["slice_profile"]),
                node_hint=None if d.get("node_hint") is None else str(d["node_hint"]),
                base=str(d["base"]),
                members=members,
                token_budgets=budgets,
                resources={str(k): float(v) for k, v in dict(d.get("resources") or {}).items()},
                start_s=float(d.get("start_s", 0.0)),
                est_seconds=float(d.get("est_seconds", 0.0)),
            )
        except KeyError as exc:
            raise ValidationError(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{where}: malformed field ({exc})") from None
        if not members or len(members) != len(budgets):
            raise ValidationError(f"{where}: members and token_budgets must be non-empty and of equal length")
        if min(budgets) < 1:
            raise ValidationError(f"{where}: token budgets must be positive")
        return pack


@dataclass(frozen=True, eq=False)
class PlanArrays:
    """The decision as arrays indexing the Demand and the slice table (for programs, not JSON)."""

    reason: np.ndarray  # (N,) int8 code into REASONS
    member_index: np.ndarray  # (M,) int64 model index, packs concatenated
    member_budget: np.ndarray  # (M,) int64 tokens
    member_forced: np.ndarray  # (M,) bool: admitted by the aging guarantee
    pack_offsets: np.ndarray  # (P+1,) int64 into member_*
    pack_slice: np.ndarray  # (P,) int32 row of the slice table
    pack_base: np.ndarray  # (P,) int16
    pack_start_s: np.ndarray  # (P,) float64
    pack_seconds: np.ndarray  # (P,) float64
    company_gpu_s: np.ndarray  # (C,) float64 planned token GPU-seconds

    @cached_property
    def member_finish_s(self) -> np.ndarray:
        """(M,) seconds after the plan's start at which each member's new version lands."""
        counts = np.diff(self.pack_offsets)
        return np.repeat(self.pack_start_s + self.pack_seconds, counts)


class _LazyPacks(Sequence[Pack]):
    """Packs built from the arrays on first access (a 10⁶-model plan is decided without strings)."""

    def __init__(self, arrays: PlanArrays, demand: Any, table: Any) -> None:
        self._a, self._d, self._t = arrays, demand, table

    def __len__(self) -> int:
        return len(self._a.pack_slice)

    @cached_property
    def _packs(self) -> list[Pack]:
        a, d, t = self._a, self._d, self._t
        names = d.ids(a.member_index)
        budgets = a.member_budget.tolist()
        out = []
        for p in range(len(a.pack_slice)):
            lo, hi = int(a.pack_offsets[p]), int(a.pack_offsets[p + 1])
            s = int(a.pack_slice[p])
            st = t.types[int(t.type_index[s])]
            out.append(
                Pack(
                    st.name,
                    t.node[s],
                    d.base_names[int(a.pack_base[p])],
                    names[lo:hi],
                    budgets[lo:hi],
                    st.resources,
                    float(a.pack_start_s[p]),
                    float(a.pack_seconds[p]),
                )
            )
        return out

    def __getitem__(self, i):  # type: ignore[override]
        return self._packs[i]

    def __iter__(self) -> Iterator[Pack]:
        return iter(self._packs)


class _LazyReasons(Mapping[str, str]):
    """model id → reason for every unscheduled model, built on first access."""

    def __init__(self, reason: np.ndarray, demand: Any) -> None:
        self._r, self._d = reason, demand

    @cached_property
    def _index(self) -> np.ndarray:
        return np.flatnonzero(self._r != SCHEDULED)

    @cached_property
    def _map(self) -> dict[str, str]:
        idx = self._index
        return dict(zip(self._d.ids(idx), (REASONS[c] for c in self._r[idx].tolist()), strict=True))

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, key: str) -> str:
        return self._map[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._map)


@dataclass(frozen=True, eq=False)
class Plan:
    """What to train this cycle (see the module docstring for the JSON form)."""

    policy: str
    created_at: float
    cycle_s: float
    packs: Sequence[Pack]
    unscheduled: Mapping[str, str]
    company_gpu_s: Mapping[str, float]
    summary: Mapping[str, Any]
    arrays: PlanArrays | None = None

    @property
    def scheduled(self) -> list[str]:
        return [m for p in self.packs for m in p.members]

    def reason_counts(self) -> dict[str, int]:
        if self.arrays is not None:
            counts = np.bincount(self.arrays.reason, minlength=len(REASONS))
            return {r: int(counts[i]) for i, r in enumerate(REASONS) if i != SCHEDULED}
        out = {r: 0 for r in UNSCHEDULED_REASONS}
        for r in self.unscheduled.values():
            out[r] += 1
        return out

    def to_dict(self, *, include_unscheduled: bool = True) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "policy": self.policy,
            "created_at": float(self.created_at),
            "cycle_s": float(self.cycle_s),
            "packs": [p.to_dict() for p in self.packs],
            "unscheduled": dict(self.unscheduled) if include_unscheduled else {},
            "company_gpu_s": {k: round(float(v), 3) for k, v in self.company_gpu_s.items()},
            "summary": {
                k: (float(v) if isinstance(v, float | np.floating) else v) for k, v in self.summary.items()
            },
        }

    def to_json(self, *, indent: int | None = 2, include_unscheduled: bool = True) -> str:
        return json.dumps(self.to_dict(include_unscheduled=include_unscheduled), indent=indent)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            got = d.get("format") if isinstance(d, Mapping) else type(d).__name__
            raise ValidationError(
                f"not a fleet plan: format is {got!r}, expected {FORMAT!r} (from `fleet schedule --json`)"
            )
        packs = d.get("packs")
        if not isinstance(packs, list):
            raise ValidationError("plan: 'packs' must be a list")
        unscheduled = {str(k): str(v) for k, v in dict(d.get("unscheduled") or {}).items()}
        bad = sorted({v for v in unscheduled.values() if v not in UNSCHEDULED_REASONS})
        if bad:
            raise ValidationError(
                f"plan: unknown unscheduled reason(s) {bad}; reasons are {list(UNSCHEDULED_REASONS)}"
            )
        return cls(
            policy=str(d.get("policy", "fleet")),
            created_at=float(d.get("created_at", 0.0)),
            cycle_s=float(d.get("cycle_s", 0.0)),
            packs=[Pack.from_dict(p, f"plan pack {i}") for i, p in enumerate(packs)],
            unscheduled=unscheduled,
            company_gpu_s={str(k): float(v) for k, v in dict(d.get("company_gpu_s") or {}).items()},
            summary=dict(d.get("summary") or {}),
        )

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"plan file is not valid JSON: {exc}") from None
        return cls.from_dict(data)


def build_plan(
    policy: str,
    now: float,
    cycle_s: float,
    arrays: PlanArrays,
    demand: Any,
    table: Any,
    summary: Mapping[str, Any],
) -> Plan:
    planned = arrays.company_gpu_s
    used = np.flatnonzero(planned > 0)
    return Plan(
        policy=policy,
        created_at=float(now),
        cycle_s=float(cycle_s),
        packs=_LazyPacks(arrays, demand, table),
        unscheduled=_LazyReasons(arrays.reason, demand),
        company_gpu_s={demand.company_names[i]: float(planned[i]) for i in used.tolist()},
        summary=dict(summary),
        arrays=arrays,
    )
