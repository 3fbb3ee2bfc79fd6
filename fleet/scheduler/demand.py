"""Demand: what every model wants from this cycle, as columns (numpy arrays of length N).

The registry produces it with one set-based query (``load_demand``); tests, the simulator
and the benchmarks build it directly from arrays. Indices, not strings, travel through the
policy: ``company`` indexes ``company_names``/``company_shares``/…, ``team`` indexes
``team_names``/``team_company``/``team_shares`` (-1 for company-level models), ``base``
indexes ``base_names``. Model ids are only needed for output, and may be left out
(``m<i>`` then), which keeps a 10⁶-model simulation free of Python strings.

Per company: ``company_shares`` (relative entitlement, ≥ 0), ``company_usage_gpu_s``
(GPU-seconds used, decayed with the scheduler's half-life), ``company_budget_gpu_s`` (a
day's budget, inf = none) and ``company_spent_gpu_s`` (what it used in the current budget
day). GPU-seconds are normalized to a full H100 (speed 1.0).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fleet.errors import ValidationError
from fleet.types import TIERS, DriftState, ModelId

TIER_CODE = {name: i for i, name in enumerate(TIERS)}  # company 0, team 1, individual 2
DEFAULT_RANK = 8

_DTYPES: dict[str, Any] = {
    "company": np.int32,
    "team": np.int32,
    "tier": np.int8,
    "pending_tokens": np.int64,
    "since_last_s": np.float64,
    "frozen": np.bool_,
    "company_shares": np.float64,
    "team_company": np.int32,
    "team_shares": np.float64,
    "base": np.int16,
    "waiting_cycles": np.int32,
    "pending_age_s": np.float64,
    "model_usage_gpu_s": np.float64,
    "rank": np.int16,
    "weight": np.float64,
    "company_usage_gpu_s": np.float64,
    "company_budget_gpu_s": np.float64,
    "company_spent_gpu_s": np.float64,
}


@dataclass(frozen=True, eq=False)
class Demand:
    """One entry per model (arrays of length N), per company (C) and per team (T)."""

    company: np.ndarray
    """(N,) int32 company index."""
    team: np.ndarray
    """(N,) int32 team index, -1 for company-level models."""
    tier: np.ndarray
    """(N,) int8: 0 company, 1 team, 2 individual."""
    pending_tokens: np.ndarray
    """(N,) int64 tokens received after the active version's watermark."""
    since_last_s: np.ndarray
    """(N,) float64 seconds since the model's last version (inf: never trained)."""
    frozen: np.ndarray
    """(N,) bool: drift-frozen models never train."""
    company_names: tuple[str, ...]
    """(C,) company ids."""
    company_shares: np.ndarray
    """(C,) float64 relative shares (≥ 0; 0 = only idle capacity)."""
    team_company: np.ndarray | None = None
    """(T,) int32 company of each team."""
    team_shares: np.ndarray | None = None
    """(T,) float64 relative shares of the teams within their company (default 1)."""
    team_names: tuple[str, ...] | None = None
    base: np.ndarray | None = None
    """(N,) int16 base-model index (default 0)."""
    base_names: tuple[str, ...] = ("default",)
    waiting_cycles: np.ndarray | None = None
    """(N,) int32 cycles the model was eligible but not scheduled (aging; see ``advance_waiting``)."""
    pending_age_s: np.ndarray | None = None
    """(N,) float64 age of the oldest pending item (0 without pending data)."""
    model_usage_gpu_s: np.ndarray | None = None
    """(N,) float64 decayed GPU-seconds of each model (individual-level fair share)."""
    rank: np.ndarray | None = None
    """(N,) int16 adapter rank (memory model)."""
    weight: np.ndarray | None = None
    """(N,) float64 extra per-model weight within its team (default 1)."""
    company_usage_gpu_s: np.ndarray | None = None
    """(C,) decayed GPU-seconds used."""
    company_budget_gpu_s: np.ndarray | None = None
    """(C,) GPU-seconds per day (inf: no budget)."""
    company_spent_gpu_s: np.ndarray | None = None
    """(C,) GPU-seconds used in the current budget day."""
    model_ids: np.ndarray | Sequence[str] | None = None
    """(N,) model ids (None: ``m<i>``)."""

    def __post_init__(self) -> None:
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in _DTYPES and v is not None:
                put(f.name, np.ascontiguousarray(v, dtype=_DTYPES[f.name]))
        n, c = len(self.company), len(self.company_names)
        put("company_names", tuple(str(x) for x in self.company_names))
        put("base_names", tuple(str(x) for x in self.base_names))
        n_teams = 0 if self.team_company is None else len(self.team_company)
        defaults = {
            "team_company": (0, np.int32, 0),
            "team_shares": (n_teams, np.float64, 1.0),
            "base": (n, np.int16, 0),
            "waiting_cycles": (n, np.int32, 0),
            "pending_age_s": (n, np.float64, 0.0),
            "model_usage_gpu_s": (n, np.float64, 0.0),
            "rank": (n, np.int16, DEFAULT_RANK),
            "weight": (n, np.float64, 1.0),
            "company_usage_gpu_s": (c, np.float64, 0.0),
            "company_budget_gpu_s": (c, np.float64, np.inf),
            "company_spent_gpu_s": (c, np.float64, 0.0),
        }
        for name, (size, dtype, fill) in defaults.items():
            if getattr(self, name) is None:
                put(name, np.full(size, fill, dtype=dtype))
        if self.team_names is None:
            put("team_names", tuple(f"t{i}" for i in range(len(self.team_company))))
        self._validate()

    # -- sizes and names ------------------------------------------------------------------
    @property
    def n_models(self) -> int:
        return len(self.company)

    @property
    def n_companies(self) -> int:
        return len(self.company_names)

    @property
    def n_teams(self) -> int:
        return len(self.team_company)

    def ids(self, index: np.ndarray) -> list[str]:
        """Model ids of the models at ``index``."""
        if self.model_ids is None:
            return [f"m{i}" for i in np.asarray(index).tolist()]
        ids = self.model_ids
        if isinstance(ids, np.ndarray):
            return [str(x) for x in ids[np.asarray(index)].tolist()]
        return [str(ids[i]) for i in np.asarray(index).tolist()]

    # -- checks ---------------------------------------------------------------------------
    def _validate(self) -> None:
        n, c, t = self.n_models, self.n_companies, self.n_teams
        for name in (
            "team",
            "tier",
            "pending_tokens",
            "since_last_s",
            "frozen",
            "base",
            "waiting_cycles",
            "pending_age_s",
            "model_usage_gpu_s",
            "rank",
            "weight",
        ):
            if getattr(self, name).shape != (n,):
                raise ValidationError(
                    f"demand column {name} has shape {getattr(self, name).shape}; expected ({n},)"
                )
        for name in ("company_shares", "company_usage_gpu_s", "company_budget_gpu_s", "company_spent_gpu_s"):
            if getattr(self, name).shape != (c,):
                raise ValidationError(
                    f"demand column {name} has shape {getattr(self, name).shape}; expected ({c},) companies"
                )
        if self.team_shares.shape != (t,) or len(self.team_names) != t:
            raise ValidationError(f"team_shares and team_names must have one entry per team ({t})")
        if self.model_ids is not None and len(self.model_ids) != n:
            raise ValidationError(f"model_ids has {len(self.model_ids)} entries; expected {n}")
        if n and (self.company.min() < 0 or self.company.max() >= c):
            raise ValidationError(f"company index out of range [0, {c})")
        if n and (self.team.min() < -1 or self.team.max() >= t):
            raise ValidationError(f"team index out of range [-1, {t})")
        if t and (self.team_company.min() < 0 or self.team_company.max() >= c):
            raise ValidationError(f"team_company index out of range [0, {c})")
        has_team = self.team >= 0
        if np.any(self.team_company[self.team[has_team]] != self.company[has_team]):
            i = int(
                np.flatnonzero(has_team)[
                    np.flatnonzero(self.team_company[self.team[has_team]] != self.company[has_team])[0]
                ]
            )
            raise ValidationError(
                f"model {self.ids([i])[0]} belongs to company {self.company_names[self.company[i]]} "
                f"but its team {self.team_names[self.team[i]]} to another company"
            )
        if n and (self.tier.min() < 0 or self.tier.max() > 2):
            raise ValidationError("tier codes must be 0 (company), 1 (team) or 2 (individual)")
        if np.any(has_team != (self.tier > 0)):
            raise ValidationError(
                "company-level models (tier 0) have team -1; team and individual models name a team"
            )
        if n and (self.base.min() < 0 or self.base.max() >= len(self.base_names)):
            raise ValidationError(f"base index out of range [0, {len(self.base_names)})")
        self._non_negative("company_shares", self.company_shares, self.company_names)
        self._non_negative("team_shares", self.team_shares, self.team_names)
        for name in (
            "pending_tokens",
            "since_last_s",
            "waiting_cycles",
            "pending_age_s",
            "model_usage_gpu_s",
            "company_usage_gpu_s",
            "company_budget_gpu_s",
            "company_spent_gpu_s",
        ):
            arr = getattr(self, name)
            if arr.size and (np.isnan(arr).any() if arr.dtype.kind == "f" else False):
                raise ValidationError(f"demand column {name} contains NaN")
            if arr.size and arr.min() < 0:
                raise ValidationError(
                    f"demand column {name} has a negative value ({arr.min()}); it must be ≥ 0"
                )
        if not np.all(np.isfinite(self.company_usage_gpu_s)) or not np.all(np.isfinite(self.company_shares)):
            raise ValidationError("company shares and usage must be finite")
        if n and (self.rank.min() < 1 or not np.all(self.weight > 0) or not np.all(np.isfinite(self.weight))):
            raise ValidationError("ranks must be ≥ 1 and weights positive and finite")

    @staticmethod
    def _non_negative(what: str, values: np.ndarray, names: Sequence[str]) -> None:
        bad = np.flatnonzero(~(values >= 0))  # also catches NaN
        if bad.size:
            i = int(bad[0])
            raise ValidationError(
                f"{what}: {names[i]} has share {values[i]}; shares must be ≥ 0 (0 = only idle capacity)"
            )

    # -- builders -------------------------------------------------------------------------
    @classmethod
    def from_records(
        cls,
        models: Iterable[Mapping[str, Any]],
        companies: Mapping[str, Mapping[str, Any]] | None = None,
        teams: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Demand:
        """From per-model dicts, as the registry's demand query returns them.

        Model keys: ``model_id`` (required); ``tier``, ``company``, ``team`` (derived from the
        id when absent); ``base`` ("default"); ``pending_tokens`` (0); ``since_last_s``
        (None/absent: never trained); ``drift_state`` ("frozen" freezes) or ``frozen``;
        optional ``waiting_cycles``, ``pending_age_s``, ``usage_gpu_s``, ``rank``, ``weight``.
        ``companies``: id → {``share`` (1), ``budget_gpu_s_per_day`` (None: none),
        ``usage_gpu_s`` (0), ``spent_gpu_s`` (0)}; ``teams``: id → {``share`` (1)}.
        """
        cols: dict[str, list[Any]] = {
            k: []
            for k in (
                "model_id",
                "company",
                "team",
                "tier",
                "base",
                "pending_tokens",
                "since_last_s",
                "frozen",
                "waiting_cycles",
                "pending_age_s",
                "usage_gpu_s",
                "rank",
                "weight",
            )
        }
        for rec in models:
            mid = ModelId(str(rec["model_id"]))
            segs = mid.segments
            cols["model_id"].append(mid.value)
            cols["company"].append(str(rec.get("company") or segs[0]))
            team = rec.get("team") or ("/".join(segs[:2]) if len(segs) > 1 else None)
            cols["team"].append(team)
            tier = rec.get("tier", mid.level.value)
            cols["tier"].append(TIER_CODE.get(str(getattr(tier, "value", tier)), tier))
            cols["base"].append(str(rec.get("base") or "default"))
            cols["pending_tokens"].append(int(rec.get("pending_tokens") or 0))
            since = rec.get("since_last_s")
            cols["since_last_s"].append(np.inf if since is None else float(since))
            drift = rec.get("drift_state")
            cols["frozen"].append(
                bool(rec.get("frozen", False))
                or str(getattr(drift, "value", drift)) == DriftState.FROZEN.value
            )
            cols["waiting_cycles"].append(int(rec.get("waiting_cycles") or 0))
            cols["pending_age_s"].append(float(rec.get("pending_age_s") or 0.0))
            cols["usage_gpu_s"].append(float(rec.get("usage_gpu_s") or 0.0))
            cols["rank"].append(int(rec.get("rank") or DEFAULT_RANK))
            cols["weight"].append(float(rec.get("weight") or 1.0))
        return cls.from_columns(cols, companies=companies, teams=teams)

    @classmethod
    def from_columns(
        cls,
        cols: Mapping[str, Sequence[Any] | np.ndarray],
        companies: Mapping[str, Mapping[str, Any]] | None = None,
        teams: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Demand:
        """From columns keyed as in :meth:`from_records` (``company``/``team``/``base`` as id
        strings, ``tier`` as codes or names, ``frozen`` as bools): the fast path for 10⁶ rows."""
        companies = dict(companies or {})
        teams = dict(teams or {})
        n = len(cols["model_id"])
        comp_ids = np.asarray(cols["company"], dtype=object).astype(str)
        names = sorted(set(comp_ids.tolist()) | set(companies))
        comp_index = {c: i for i, c in enumerate(names)}
        company = np.fromiter((comp_index[c] for c in comp_ids.tolist()), dtype=np.int32, count=n)
        raw_team = cols.get("team", [None] * n)
        if isinstance(raw_team, np.ndarray) and raw_team.dtype == object and not (raw_team == None).any():  # noqa: E711
            team_col = raw_team.tolist()  # the registry's column: strings already, "" for none
        else:
            team_col = ["" if t is None else str(t) for t in raw_team]
        team_names = sorted({t for t in team_col if t} | set(teams))
        team_index = {t: i for i, t in enumerate(team_names)}
        team = np.fromiter((team_index[t] if t else -1 for t in team_col), dtype=np.int32, count=n)
        team_company = np.zeros(len(team_names), dtype=np.int32)
        for t, i in team_index.items():
            owner = t.split("/")[0]
            if owner not in comp_index:
                raise ValidationError(f"team {t!r} belongs to no known company")
            team_company[i] = comp_index[owner]
        tier_col = cols.get("tier", [2] * n)
        if isinstance(tier_col, np.ndarray) and tier_col.dtype.kind in "iu":
            tiers = tier_col
        elif isinstance(tier_col, np.ndarray) and tier_col.dtype == object:
            tiers = np.full(n, -1, dtype=np.int8)
            for name, code in TIER_CODE.items():
                tiers[tier_col == name] = code
        else:
            tiers = [TIER_CODE.get(str(x), x) for x in tier_col]
        raw_base = cols.get("base", ["default"] * n)
        base_col = raw_base.tolist() if isinstance(raw_base, np.ndarray) else [str(b) for b in raw_base]
        base_names = sorted(set(base_col)) or ["default"]
        base_index = {b: i for i, b in enumerate(base_names)}

        def company_field(key: str, default: float) -> np.ndarray:
            out = np.full(len(names), default, dtype=np.float64)
            for c, info in companies.items():
                value = info.get(key)
                out[comp_index[c]] = default if value is None else float(value)
            return out

        team_shares = np.ones(len(team_names), dtype=np.float64)
        for t, info in teams.items():
            team_shares[team_index[t]] = float(info.get("share", 1.0))

        def col(key: str, default: Any) -> Any:
            return cols[key] if key in cols else [default] * n

        return cls(
            company=company,
            team=team,
            tier=np.asarray(tiers, dtype=np.int8),
            pending_tokens=np.asarray(col("pending_tokens", 0), dtype=np.int64),
            since_last_s=_since(col("since_last_s", None)),
            frozen=np.asarray(col("frozen", False), dtype=bool),
            company_names=tuple(names),
            company_shares=company_field("share", 1.0),
            team_company=team_company,
            team_shares=team_shares,
            team_names=tuple(team_names),
            base=np.fromiter((base_index[b] for b in base_col), dtype=np.int16, count=n),
            base_names=tuple(base_names),
            waiting_cycles=np.asarray(col("waiting_cycles", 0), dtype=np.int32),
            pending_age_s=np.asarray(col("pending_age_s", 0.0), dtype=np.float64),
            model_usage_gpu_s=np.asarray(col("usage_gpu_s", 0.0), dtype=np.float64),
            rank=np.asarray(col("rank", DEFAULT_RANK), dtype=np.int16),
            weight=np.asarray(col("weight", 1.0), dtype=np.float64),
            company_usage_gpu_s=company_field("usage_gpu_s", 0.0),
            company_budget_gpu_s=company_field("budget_gpu_s_per_day", np.inf),
            company_spent_gpu_s=company_field("spent_gpu_s", 0.0),
            model_ids=np.asarray(cols["model_id"], dtype=object),
        )


def _since(values: Any) -> np.ndarray:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return values.astype(np.float64, copy=False)
    return np.asarray([np.inf if v is None else v for v in values], dtype=np.float64)


def load_demand(cfg: Any, registry: Any = None, *, now: float | None = None) -> Demand:
    """Every model's demand from the registry: one set-based query over the models, one over the
    companies and teams, and the companies' decayed and same-day usage."""
    import time

    from fleet.registry import Registry

    reg = registry if registry is not None else Registry.open(cfg)
    now = time.time() if now is None else now
    half_life = cfg.scheduler.usage_half_life_s
    cols = reg.demand_columns(now=now, half_life_s=half_life)
    companies, teams = reg.demand_tenants()
    decayed = reg.decayed_usage(now=now, half_life_s=half_life)
    spent = reg.usage_since(now - 86400.0)
    default_budget = cfg.scheduler.default_company_budget_gpu_s_per_day
    for cid, info in companies.items():
        if info.get("budget_gpu_s_per_day") is None:
            info["budget_gpu_s_per_day"] = default_budget
        info["usage_gpu_s"] = decayed.get(cid, 0.0)
        info["spent_gpu_s"] = spent.get(cid, 0.0)
    # Tiers also weigh urgency: the tier's configured weight multiplies each model's.
    weights = np.array([cfg.tier(t).weight for t in TIERS], dtype=np.float64)  # by tier code
    cols["weight"] = weights[np.asarray(cols["tier"], dtype=np.int64)]
    if registry is None:
        reg.close()
    return Demand.from_columns(cols, companies=companies, teams=teams)
