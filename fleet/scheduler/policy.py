"""The scheduling policy: ``plan(demand, inventory, config, now) -> Plan``. Pure: numpy in,
plain result out, no Ray, no clock, no randomness; the same inputs give the same plan.

One cycle's decision, in order:

1. **Eligibility** (reasons, first that applies): ``frozen`` (drift-frozen models never
   train), ``no data`` (pending < the tier's ``min_pending_tokens``), ``interval`` (the
   tier's minimum interval has not passed: ``since_last_s < min_interval_s − cycle_s``;
   plans run every cycle and a run's version lands within its cycle, so this keeps runs at
   least ``min_interval_s`` apart when the interval is a multiple of the cycle).
2. **Desired tokens** d_i = min(pending_i, ``max_member_tokens``): a large backlog is
   trained over several cycles; g_i = d_i / tokens_per_gpu_s GPU-seconds.
3. **Order** (``fleet.scheduler.fairshare``): forced models (aging guarantee) first, then
   hierarchical fair share (F = 2^(−U/S) after this plan's own allocations) with urgency
   inside teams and an age factor across companies; under overload, budgets per run are cut
   to a per-company breadth quantum. Baselines (``fleet.scheduler.baselines``) plug in
   another order through the same code.
4. **Admission** against the training slices' GPU-seconds (``reserve_serving_fraction`` of
   the slices kept for serving): models within their company's budget, in order, while
   capacity lasts; what capacity the in-budget demand leaves idle is lent, in the same
   order, to models of companies beyond their budget (``borrow_idle``). Companies are
   charged g_i (token compute); pack start-up overhead is fleet's own.
5. **Packing** (``fleet.scheduler.packing``), in rounds: in-budget models first; if slices
   still have room, the next models in order; then the borrowers.

Reasons of the models left out: ``capacity`` (eligible, within budget, no room this cycle)
or ``budget`` (its company's budget for the day is spent and no idle capacity was left).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fleet.errors import ConfigError
from fleet.scheduler import fairshare
from fleet.scheduler.demand import Demand
from fleet.scheduler.inventory import Inventory
from fleet.scheduler.memory import BaseSpec, member_bytes, members_fit, usable_bytes
from fleet.scheduler.metrics import water_fill
from fleet.scheduler.packing import PackList, PackParams, SliceState, pack_base
from fleet.scheduler.result import (
    BUDGET,
    CAPACITY,
    FROZEN,
    INTERVAL,
    NO_DATA,
    REASONS,
    SCHEDULED,
    Plan,
    PlanArrays,
    build_plan,
)

REFILL_ROUNDS = 3
"""Admission/packing rounds per pass: a round admits what the estimate says fits; the next
rounds fill what fragmentation left (each round at least 1% of capacity, else stop)."""


@dataclass(frozen=True)
class PolicyConfig:
    """Everything ``plan()`` needs besides the demand and the slices (see SchedulerConfig)."""

    cycle_s: float = 600.0
    usage_half_life_s: float = 7 * 86400.0
    reserve_serving_fraction: float = 0.25
    aging_bound_cycles: int = 12
    max_pack_members: int = 64
    tokens_per_gpu_s: float = 20_000.0
    pack_overhead_s: float = 15.0
    min_member_tokens: int = 512
    max_member_tokens: int | None = None
    """Most tokens one model trains per cycle (None: an eighth of a full GPU's cycle)."""
    aging_member_tokens: int | None = None
    """Most tokens a model admitted by the aging guarantee trains (None: a 64th of a full GPU's
    cycle, one member of a full pack): guaranteed progress for everyone, bulk by fair share."""
    borrow_idle: bool = True
    tier_min_interval_s: tuple[float, float, float] = (3600.0, 1800.0, 600.0)
    tier_min_pending_tokens: tuple[int, int, int] = (1, 1, 1)
    tier_weight: tuple[float, float, float] = (1.0, 1.0, 1.0)
    company_model_share: float = 1.0
    """Share of a company's own model beside its teams (team shares are relative to it)."""
    urgency_tokens: float = 4096.0
    """Pending tokens at which the urgency's data term has doubled."""
    staleness_horizon_s: float = 86400.0
    """Age of the last version at which the urgency's staleness term has doubled (and stops)."""
    age_weight: float = 1.0
    """Weight of the age of a model's oldest pending data against the fair-share factor (Slurm's
    PriorityWeightAge relative to PriorityWeightFairshare): 0 orders by fair share alone."""
    max_age_s: float | None = None
    """Data age at which the age factor saturates (Slurm's PriorityMaxAge; None: 4 aging bounds)."""
    rows_per_member: int = 4
    context_length: int = 128
    bases: Mapping[str, BaseSpec] = field(default_factory=dict)
    default_base: BaseSpec = field(default_factory=lambda: BaseSpec.preset("tiny", "default"))

    def __post_init__(self) -> None:
        positive = (
            "cycle_s",
            "usage_half_life_s",
            "tokens_per_gpu_s",
            "urgency_tokens",
            "staleness_horizon_s",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"scheduler policy: {name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.reserve_serving_fraction < 1:
            raise ConfigError(
                f"reserve_serving_fraction must lie in [0, 1), got {self.reserve_serving_fraction}"
            )
        if self.aging_bound_cycles < 1 or self.max_pack_members < 1 or self.min_member_tokens < 1:
            raise ConfigError("aging_bound_cycles, max_pack_members and min_member_tokens must be ≥ 1")
        if self.pack_overhead_s < 0 or self.company_model_share < 0 or self.age_weight < 0:
            raise ConfigError("pack_overhead_s, company_model_share and age_weight must be ≥ 0")
        if self.max_age_s is not None and not self.max_age_s > 0:
            raise ConfigError(f"max_age_s must be positive, got {self.max_age_s}")
        for name in ("max_member_tokens", "aging_member_tokens"):
            value = getattr(self, name)
            if value is not None and value < self.min_member_tokens:
                raise ConfigError(
                    f"{name} must be ≥ min_member_tokens ({self.min_member_tokens}), got {value}"
                )
        if (
            min(self.tier_weight) <= 0
            or min(self.tier_min_interval_s) < 0
            or min(self.tier_min_pending_tokens) < 1
        ):
            raise ConfigError("tier weights must be positive, intervals ≥ 0 and minimum pending tokens ≥ 1")

    @property
    def member_cap(self) -> int:
        if self.max_member_tokens is not None:
            return int(self.max_member_tokens)
        return max(self.min_member_tokens, int(self.tokens_per_gpu_s * self.cycle_s / 8))

    @property
    def age_horizon_s(self) -> float:
        return self.max_age_s if self.max_age_s is not None else 4.0 * self.aging_bound_cycles * self.cycle_s

    @property
    def aging_cap(self) -> int:
        if self.aging_member_tokens is not None:
            return min(int(self.aging_member_tokens), self.member_cap)
        return min(
            self.member_cap, max(self.min_member_tokens, int(self.tokens_per_gpu_s * self.cycle_s / 64))
        )

    def base_spec(self, name: str) -> BaseSpec:
        return self.bases.get(name, self.default_base)

    @classmethod
    def from_fleet_config(
        cls, cfg: Any, bases: Mapping[str, BaseSpec] | None = None, **overrides: Any
    ) -> PolicyConfig:
        """From a :class:`fleet.config.FleetConfig` (scheduler, tier, train and data sections)."""
        s = cfg.scheduler
        tiers = [cfg.tier(t) for t in ("company", "team", "individual")]
        kw: dict[str, Any] = dict(
            cycle_s=s.cycle_s,
            usage_half_life_s=s.usage_half_life_s,
            reserve_serving_fraction=s.reserve_serving_fraction,
            aging_bound_cycles=s.aging_bound_cycles,
            max_pack_members=s.max_pack_members,
            tokens_per_gpu_s=s.tokens_per_gpu_s,
            pack_overhead_s=s.pack_overhead_s,
            min_member_tokens=s.min_member_tokens,
            max_member_tokens=s.max_member_tokens,
            borrow_idle=s.borrow_idle,
            age_weight=s.age_weight,
            tier_min_interval_s=tuple(t.min_interval_s for t in tiers),
            tier_min_pending_tokens=tuple(t.min_pending_tokens for t in tiers),
            tier_weight=tuple(t.weight for t in tiers),
            rows_per_member=cfg.train.rows_per_member,
            context_length=cfg.data.context_length,
            bases=dict(bases or {}),
        )
        kw.update(overrides)
        return cls(**kw)


@dataclass(frozen=True, eq=False)
class Candidates:
    """The eligible models of one plan, as arrays (index into the Demand: ``idx``)."""

    idx: np.ndarray
    company: np.ndarray
    node: np.ndarray
    base: np.ndarray
    desired: np.ndarray  # tokens
    gpu_s: np.ndarray  # desired / tokens_per_gpu_s
    mem_bytes: np.ndarray
    capacity_gpu_s: float  # the training slices' GPU-seconds this cycle
    per_cycle: int  # most members one cycle can schedule at the minimum budget


# An order function: (demand, candidates, config) → (order over candidate positions,
# within-budget flag aligned with that order, forced flag per candidate, desired tokens per
# candidate: the candidates' own, or a changed copy).
OrderFn = Callable[[Demand, Candidates, PolicyConfig], tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]


def plan(demand: Demand, inventory: Inventory, config: PolicyConfig | None = None, now: float = 0.0) -> Plan:
    """fleet's policy: hierarchical fair share, urgency, aging, budgets with borrowing."""
    return run_policy(demand, inventory, config or PolicyConfig(), now, order_fn=fleet_order, name="fleet")


def fleet_order(
    demand: Demand, c: Candidates, cfg: PolicyConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    i = c.idx
    forced = fairshare.aging_forced(demand.waiting_cycles[i], cfg.aging_bound_cycles, c.per_cycle)
    # Breadth under overload: within each company, no model takes more per run than lets all
    # of the company's candidates run once within half the aging bound on the company's
    # entitled capacity (shares, water-filled against demand). Fair share then rotates
    # through a throttled company's backlog itself, instead of the aging rule forcing it
    # (and overriding shares).
    cap_tokens = c.capacity_gpu_s * cfg.tokens_per_gpu_s
    wanted = np.bincount(c.company, weights=c.desired, minlength=demand.n_companies)
    entitled = water_fill(cap_tokens, demand.company_shares, wanted)
    spare = cap_tokens - float(entitled.sum())
    if spare > 0:  # what share-holders leave idle is anyone's, zero-share companies included
        entitled += water_fill(spare, np.ones(len(wanted)), wanted - entitled)
    quantum = fairshare.group_water_level(c.desired, c.company, 0.5 * cfg.aging_bound_cycles * entitled)
    desired = np.minimum(c.desired, np.maximum(quantum[c.company], cfg.min_member_tokens)).astype(np.int64)
    # a forced model was passed over by fair share: it gets guaranteed progress, not its backlog
    desired = np.where(forced, np.minimum(desired, cfg.aging_cap), desired)
    gpu_s = desired / cfg.tokens_per_gpu_s
    urg = fairshare.urgency(
        np.asarray(cfg.tier_weight)[demand.tier[i]],
        demand.weight[i],
        demand.pending_tokens[i],
        demand.since_last_s[i],
        demand.waiting_cycles[i] + demand.pending_age_s[i] / cfg.cycle_s,
        cfg.urgency_tokens,
        cfg.staleness_horizon_s,
    )
    n_teams = demand.n_teams
    node_all = np.where(demand.team >= 0, demand.team, n_teams + demand.company)
    node_usage = np.bincount(
        node_all, weights=demand.model_usage_gpu_s, minlength=n_teams + demand.n_companies
    )
    node_share = np.concatenate([demand.team_shares, np.full(demand.n_companies, cfg.company_model_share)])
    left = np.maximum(demand.company_budget_gpu_s - demand.company_spent_gpu_s, 0.0)
    order, in_budget = fairshare.fair_share_order(
        company=c.company,
        node=c.node,
        gpu_s=gpu_s,
        model_usage=demand.model_usage_gpu_s[i],
        urgency_=urg,
        forced=forced,
        node_usage=node_usage,
        node_share=node_share,
        company_usage=demand.company_usage_gpu_s,
        company_share=demand.company_shares,
        company_budget_left=left,
        age=np.minimum(demand.pending_age_s[i] / cfg.age_horizon_s, 1.0),
        age_weight=cfg.age_weight,
        level_ref=(float(demand.company_usage_gpu_s.sum()) + c.capacity_gpu_s)
        / max(float(demand.company_shares.sum()), 1e-300),
    )
    return order, in_budget, forced, desired


def advance_waiting(waiting: np.ndarray, reason: np.ndarray) -> np.ndarray:
    """Next cycle's ``waiting_cycles``: +1 when left out for capacity, 0 when scheduled or with
    nothing to train (no data, frozen), unchanged while held by its interval or its budget."""
    out = waiting.copy()
    out[reason == CAPACITY] += 1
    out[(reason == SCHEDULED) | (reason == NO_DATA) | (reason == FROZEN)] = 0
    return out


def decay(usage: np.ndarray, elapsed_s: float, half_life_s: float) -> np.ndarray:
    """Usage after ``elapsed_s`` of exponential decay with the given half-life."""
    return usage * np.exp2(-elapsed_s / half_life_s)


# -- the machinery shared by fleet's policy and the baselines ---------------------------------


def run_policy(
    demand: Demand, inventory: Inventory, cfg: PolicyConfig, now: float, *, order_fn: OrderFn, name: str
) -> Plan:
    table = inventory.table(cfg.reserve_serving_fraction)
    train_rows = table.training
    n = demand.n_models

    # 1. eligibility
    tier = demand.tier
    reason = np.full(n, CAPACITY, dtype=np.int8)
    interval = np.asarray(cfg.tier_min_interval_s)[tier] - cfg.cycle_s
    reason[demand.since_last_s < interval] = INTERVAL
    reason[demand.pending_tokens < np.asarray(cfg.tier_min_pending_tokens)[tier]] = NO_DATA
    reason[demand.frozen] = FROZEN
    idx = np.flatnonzero(reason == CAPACITY)

    # 2. candidates, memory per member, what each base fits on
    specs = [cfg.base_spec(b) for b in demand.base_names]
    base_c = demand.base[idx]
    mem = np.zeros(len(idx))
    for b, spec in enumerate(specs):
        sel = base_c == b
        if sel.any():
            mem[sel] = member_bytes(
                spec, demand.rank[idx[sel]], tier[idx[sel]], cfg.rows_per_member, cfg.context_length
            )
    desired = np.clip(demand.pending_tokens[idx], 1, cfg.member_cap)
    gpu_s = desired / cfg.tokens_per_gpu_s
    node_all_c = np.where(demand.team[idx] >= 0, demand.team[idx], demand.n_teams + demand.company[idx])
    speed = table.speed[train_rows]
    state = SliceState.fresh(train_rows, speed, usable_bytes(table.memory_gb[train_rows]), cfg.cycle_s)
    capacity = float(state.remaining.sum())
    fits = np.zeros((len(specs), len(train_rows)), dtype=np.int64)
    for b, spec in enumerate(specs):
        sel = base_c == b
        typical = (
            float(mem[sel].max())
            if sel.any()
            else float(
                member_bytes(spec, np.array([8]), np.array([2]), cfg.rows_per_member, cfg.context_length)[0]
            )
        )
        fits[b] = members_fit(table.memory_gb[train_rows], spec, typical, cfg.max_pack_members)
    share = _base_shares(fits, np.bincount(base_c, weights=gpu_s, minlength=len(specs)))
    per_cycle = _members_per_cycle(fits, speed, cfg)

    cand = Candidates(idx, demand.company[idx], node_all_c, base_c, desired, gpu_s, mem, capacity, per_cycle)
    order, in_budget, forced, desired = order_fn(demand, cand, cfg)
    gpu_s = desired / cfg.tokens_per_gpu_s

    # 3-5. admission and packing, in rounds
    params = PackParams(
        cfg.tokens_per_gpu_s, cfg.pack_overhead_s, cfg.min_member_tokens, cfg.max_pack_members
    )
    ov_member = _overhead_per_member(fits, speed, cfg)
    cost_o = gpu_s[order] + ov_member[base_c[order]]
    base_o, forced_o = base_c[order], forced[order]
    admitted = np.zeros(len(order), dtype=bool)
    dropped = np.zeros(len(order), dtype=bool)
    packs = PackList()
    base_bytes = np.array([s.base_bytes for s in specs])

    def rounds(pool: np.ndarray, force: bool) -> None:
        for r in range(REFILL_ROUNDS):
            room = np.array([float((state.remaining * share[b]).sum()) for b in range(len(specs))])
            todo = pool & ~admitted & ~dropped
            if not todo.any() or (r > 0 and room.sum() < 0.01 * capacity):
                return
            cum = np.zeros(len(order))
            for b in np.unique(base_o[todo]).tolist():
                sel = todo & (base_o == b)
                cs = np.cumsum(np.where(sel, cost_o, 0.0))
                cum[sel] = (cs - cost_o)[sel]
            take = todo & ((cum < room[base_o]) | (forced_o & force & (r == 0)))
            if not take.any():
                return
            admitted[take] = True
            pos = np.flatnonzero(take)
            for b in np.unique(base_o[pos]).tolist():
                mine = pos[base_o[pos] == b]
                gone = pack_base(
                    state,
                    share[b],
                    mine,
                    desired[order[mine]],
                    mem[order[mine]],
                    mine,
                    b,
                    float(base_bytes[b]),
                    params,
                    packs,
                )
                dropped[gone] = True

    rounds(in_budget, force=True)
    if cfg.borrow_idle and not (in_budget & ~admitted).any() and not (dropped & in_budget).any():
        rounds(~in_budget, force=False)  # budgets are hard: aging does not override them

    # assemble
    scheduled_o = admitted & ~dropped
    reason[idx[order[~scheduled_o & in_budget]]] = CAPACITY
    reason[idx[order[~scheduled_o & ~in_budget]]] = BUDGET
    reason[idx[order[scheduled_o]]] = SCHEDULED
    arrays = _arrays(packs, order, idx, forced, reason, demand, state, cfg)
    busy = capacity - float(state.remaining.sum())
    summary = {
        "models": n,
        "eligible": int(len(idx)),
        "scheduled": int(len(arrays.member_index)),
        "forced": int(arrays.member_forced.sum()),
        "packs": int(len(arrays.pack_slice)),
        "slices": int(len(table.reserved)),
        "training_slices": int(len(train_rows)),
        "reserved_slices": int(table.reserved.sum()),
        "capacity_gpu_s": round(capacity, 3),
        "busy_gpu_s": round(busy, 3),
        "token_gpu_s": round(float(arrays.company_gpu_s.sum()), 3),
        "utilization": round(busy / capacity, 6) if capacity > 0 else 0.0,
        "tokens": int(arrays.member_budget.sum()),
        **{f"unscheduled_{k.replace(' ', '_')}": int(v) for k, v in _reason_counts(reason).items()},
    }
    return build_plan(name, now, cfg.cycle_s, arrays, demand, table, summary)


def _base_shares(fits: np.ndarray, demand_b: np.ndarray) -> np.ndarray:
    """(B, S) fraction of each slice's time each base may use: by the bases' demand among
    those that fit the slice (a slice runs packs of different bases one after another)."""
    hosts = (fits >= 1).astype(np.float64)
    weight = hosts * np.maximum(demand_b, 1e-12)[:, None]
    total = weight.sum(axis=0, keepdims=True)
    return np.divide(weight, total, out=np.zeros_like(weight), where=total > 0)


def _overhead_per_member(fits: np.ndarray, speed: np.ndarray, cfg: PolicyConfig) -> np.ndarray:
    """(B,) pack start-up GPU-seconds per member when packs are full (admission's estimate;
    0 for a base no slice can hold: its models get no room anyway)."""
    slots = (fits * (fits >= 1)).sum(axis=1)
    speed_sum = ((fits >= 1) * speed[None, :]).sum(axis=1)
    return np.divide(cfg.pack_overhead_s * speed_sum, slots, out=np.zeros(len(fits)), where=slots > 0)


def _members_per_cycle(fits: np.ndarray, speed: np.ndarray, cfg: PolicyConfig) -> int:
    """Most members one cycle can schedule at the minimum budget (the aging rule's M), for
    the base that fits most slices."""
    if fits.size == 0:
        return 1
    m = fits[int(np.argmax((fits >= 1).sum(axis=1)))]
    ok = m >= 1
    per_pack_s = cfg.pack_overhead_s + cfg.min_member_tokens * m[ok] / (cfg.tokens_per_gpu_s * speed[ok])
    return max(1, int((np.floor(cfg.cycle_s / per_pack_s) * m[ok]).sum()))


def _reason_counts(reason: np.ndarray) -> dict[str, int]:
    counts = np.bincount(reason, minlength=len(REASONS))
    return {REASONS[i]: int(counts[i]) for i in range(1, len(REASONS))}


def _arrays(
    packs: PackList,
    order: np.ndarray,
    idx: np.ndarray,
    forced: np.ndarray,
    reason: np.ndarray,
    demand: Demand,
    state: SliceState,
    cfg: PolicyConfig,
) -> PlanArrays:
    if packs.members:
        pos = np.concatenate(packs.members)
        budgets = np.concatenate(packs.budgets).astype(np.int64)
        sizes = np.array([len(m) for m in packs.members], dtype=np.int64)
    else:
        pos, budgets, sizes = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    cand = order[pos]
    member_index = idx[cand].astype(np.int64)
    company_gpu_s = np.bincount(
        demand.company[member_index], weights=budgets / cfg.tokens_per_gpu_s, minlength=demand.n_companies
    )
    return PlanArrays(
        reason=reason,
        member_index=member_index,
        member_budget=budgets,
        member_forced=forced[cand],
        pack_offsets=np.concatenate(([0], np.cumsum(sizes))).astype(np.int64),
        pack_slice=state.rows[np.asarray(packs.slice, dtype=np.int64)].astype(np.int32),
        pack_base=np.asarray(packs.base, dtype=np.int16),
        pack_start_s=np.asarray(packs.start_s, dtype=np.float64),
        pack_seconds=np.asarray(packs.seconds, dtype=np.float64),
        company_gpu_s=company_gpu_s,
    )
