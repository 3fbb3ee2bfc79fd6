"""The scheduling policy on random fleets and inventories: hypothesis properties of every
plan, multi-cycle properties (aging bound, shares), determinism, bad input."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.errors import ConfigError, ValidationError
from fleet.scheduler import (
    Demand,
    Inventory,
    Plan,
    PolicyConfig,
    advance_waiting,
    plan,
    plan_fifo,
    plan_round_robin,
)
from fleet.scheduler.inventory import SliceGroup, slice_type
from fleet.scheduler.memory import BaseSpec, member_bytes, usable_bytes
from fleet.scheduler.result import BUDGET, CAPACITY, FROZEN, INTERVAL, NO_DATA, REASONS, SCHEDULED

PROFILES = [
    "h100-80gb",
    "a100-80gb",
    "a10g",
    "h100-80gb:1g.10gb",
    "a100-80gb:3g.40gb",
    "a100-40gb:1g.5gb",
    "h100-80gb:frac-0.5",
    "l4",
    "cpu",
]
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_demand(
    seed: int,
    n: int,
    n_comp: int,
    n_teams: int,
    *,
    frozen_p: float = 0.1,
    budgets: bool = True,
    zero_share: bool = True,
    bases: int = 1,
) -> Demand:
    rng = np.random.default_rng(seed)
    team_company = rng.integers(0, n_comp, n_teams).astype(np.int32)
    tier = rng.choice([0, 1, 2], n, p=[0.1, 0.2, 0.7]).astype(np.int8) if n_teams else np.zeros(n, np.int8)
    team = np.where(tier > 0, rng.integers(0, max(n_teams, 1), n), -1).astype(np.int32)
    company = np.where(
        team >= 0, team_company[np.maximum(team, 0)] if n_teams else 0, rng.integers(0, n_comp, n)
    ).astype(np.int32)
    pending = np.where(rng.random(n) < 0.8, (rng.pareto(1.2, n) * 20_000).astype(np.int64), 0)
    since = np.where(rng.random(n) < 0.1, np.inf, rng.uniform(0, 20_000, n))
    shares = rng.uniform(0.5, 10, n_comp)
    if zero_share and n_comp > 1:
        shares[rng.random(n_comp) < 0.15] = 0.0
    budget = (
        np.where(rng.random(n_comp) < 0.5, rng.uniform(0, 3000, n_comp), np.inf)
        if budgets
        else np.full(n_comp, np.inf)
    )
    return Demand(
        company=company,
        team=team,
        tier=tier,
        pending_tokens=pending,
        since_last_s=since,
        frozen=rng.random(n) < frozen_p,
        company_names=[f"c{i}" for i in range(n_comp)],
        company_shares=shares,
        team_company=team_company,
        team_shares=rng.uniform(0.5, 5, n_teams),
        waiting_cycles=rng.integers(0, 14, n),
        pending_age_s=np.where(pending > 0, rng.uniform(0, 20_000, n), 0.0),
        model_usage_gpu_s=rng.exponential(3, n),
        rank=rng.choice([4, 8, 16], n),
        company_usage_gpu_s=rng.exponential(500, n_comp),
        company_budget_gpu_s=budget,
        company_spent_gpu_s=rng.uniform(0, 1000, n_comp),
        model_ids=np.array([f"c{company[i]}/m{i}" for i in range(n)], dtype=object),
        base=rng.integers(0, bases, n),
        base_names=("default", "big")[:bases],
    )


def random_inventory(seed: int, groups: int) -> Inventory:
    rng = np.random.default_rng(seed + 7)
    picks = rng.choice(len(PROFILES), groups)
    return Inventory(
        tuple(
            SliceGroup(slice_type(PROFILES[p]), int(rng.integers(1, 5)), f"n{i}") for i, p in enumerate(picks)
        )
    )


def check_plan(p: Plan, d: Demand, inv: Inventory, cfg: PolicyConfig) -> None:
    """Every property a plan must have, whatever the inputs."""
    a = p.arrays
    assert a is not None
    table = inv.table(cfg.reserve_serving_fraction)
    n = d.n_models
    # each model at most once; scheduled iff in a pack
    assert len(np.unique(a.member_index)) == len(a.member_index)
    in_pack = np.zeros(n, bool)
    in_pack[a.member_index] = True
    assert np.array_equal(in_pack, a.reason == SCHEDULED)
    # eligibility: frozen never trains; reasons follow the rules in their order
    tier = d.tier
    assert not np.any(in_pack & d.frozen)
    assert np.all(a.reason[d.frozen] == FROZEN)
    no_data = ~d.frozen & (d.pending_tokens < np.asarray(cfg.tier_min_pending_tokens)[tier])
    assert np.all(a.reason[no_data] == NO_DATA)
    interval = (
        ~d.frozen & ~no_data & (d.since_last_s < np.asarray(cfg.tier_min_interval_s)[tier] - cfg.cycle_s)
    )
    assert np.all(a.reason[interval] == INTERVAL)
    assert np.all(np.isin(a.reason[~d.frozen & ~no_data & ~interval], [SCHEDULED, BUDGET, CAPACITY]))
    # budgets: positive, never more than the model's pending tokens or the per-run cap
    assert np.all(a.member_budget >= 1)
    assert np.all(a.member_budget <= d.pending_tokens[a.member_index])
    assert np.all(a.member_budget <= cfg.member_cap)
    # slices: only training slices; packs on a slice run one after another within the cycle
    assert not np.any(table.reserved[a.pack_slice])
    for s in np.unique(a.pack_slice):
        on = np.flatnonzero(a.pack_slice == s)
        start, secs = a.pack_start_s[on], a.pack_seconds[on]
        assert np.all(np.diff(start) >= -1e-9)
        assert np.all(start[:-1] + secs[:-1] <= start[1:] + 1e-6)
        assert start[-1] + secs[-1] <= cfg.cycle_s * (1 + 1e-9) + 1e-6
    # packs: member count and memory fit their slice
    sizes = np.diff(a.pack_offsets)
    assert np.all(sizes >= 1) and np.all(sizes <= cfg.max_pack_members)
    for k in range(len(a.pack_slice)):
        members = a.member_index[a.pack_offsets[k] : a.pack_offsets[k + 1]]
        spec = cfg.base_spec(d.base_names[int(a.pack_base[k])])
        need = (
            spec.base_bytes
            + member_bytes(
                spec, d.rank[members], tier[members], cfg.rows_per_member, cfg.context_length
            ).sum()
        )
        assert need <= usable_bytes(table.memory_gb[a.pack_slice[k]]) + 1e-6
        assert np.all(d.base[members] == a.pack_base[k])
        rate = cfg.tokens_per_gpu_s * table.speed[a.pack_slice[k]]
        budgets = a.member_budget[a.pack_offsets[k] : a.pack_offsets[k + 1]]
        assert math.isclose(a.pack_seconds[k], cfg.pack_overhead_s + budgets.sum() / rate, rel_tol=1e-9)
    # accounting: companies are charged their members' token GPU-seconds
    expect = np.bincount(
        d.company[a.member_index], weights=a.member_budget / cfg.tokens_per_gpu_s, minlength=d.n_companies
    )
    assert np.allclose(a.company_gpu_s, expect)
    left = np.maximum(d.company_budget_gpu_s - d.company_spent_gpu_s, 0)
    over = a.company_gpu_s > left * (1 + 1e-9) + 1e-9
    if p.policy == "fleet" and over.any():
        # over a budget only on capacity nobody within budget wanted: no in-budget model waits
        assert cfg.borrow_idle
        assert not np.any(a.reason == CAPACITY)
    assert p.summary["scheduled"] == len(a.member_index)


@st.composite
def scenarios(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(1, 250))
    n_comp = draw(st.integers(1, 6))
    n_teams = draw(st.integers(0, 12))
    groups = draw(st.integers(1, 5))
    cfg = PolicyConfig(
        reserve_serving_fraction=draw(st.sampled_from([0.0, 0.25, 0.5])),
        max_pack_members=draw(st.sampled_from([1, 3, 64])),
        borrow_idle=draw(st.booleans()),
        age_weight=draw(st.sampled_from([0.0, 1.0])),
        pack_overhead_s=draw(st.sampled_from([0.0, 15.0, 200.0])),
        tokens_per_gpu_s=draw(st.sampled_from([2_000.0, 20_000.0])),
        default_base=BaseSpec.preset(draw(st.sampled_from(["tiny", "1b"])), "default"),
    )
    bases = draw(st.sampled_from([1, 2]))
    if bases == 2:  # a second, larger base that only the bigger slices hold
        cfg = replace(cfg, bases={"big": BaseSpec.preset("1b", "big")})
    return random_demand(seed, n, n_comp, n_teams, bases=bases), random_inventory(seed, groups), cfg


@FAST
@given(scenarios())
def test_every_plan_respects_slices_memory_budgets_and_rules(scenario):
    d, inv, cfg = scenario
    for fn in (plan, plan_fifo, plan_round_robin):
        check_plan(fn(d, inv, cfg, 0.0), d, inv, cfg)


@FAST
@given(scenarios())
def test_same_inputs_same_plan(scenario):
    d, inv, cfg = scenario
    p1, p2 = plan(d, inv, cfg, 123.0), plan(d, inv, cfg, 123.0)
    assert p1.to_json() == p2.to_json()
    for field in ("reason", "member_index", "member_budget", "pack_slice", "pack_start_s"):
        assert np.array_equal(getattr(p1.arrays, field), getattr(p2.arrays, field))


def test_without_borrowing_no_company_exceeds_its_budget():
    d = random_demand(3, 400, 4, 8, frozen_p=0.0)
    d = replace(d, company_budget_gpu_s=np.array([50.0, 0.0, np.inf, 400.0]), company_spent_gpu_s=np.zeros(4))
    inv = Inventory((SliceGroup(slice_type("h100-80gb"), 8),))
    strict = plan(d, inv, PolicyConfig(borrow_idle=False), 0.0)
    assert np.all(strict.arrays.company_gpu_s <= np.array([50.0, 0.0, np.inf, 400.0]) + 1e-9)
    assert (strict.arrays.reason == BUDGET).any()
    assert set(strict.unscheduled.values()) >= {"budget"}


def test_idle_capacity_is_lent_beyond_a_budget():
    # one company out of budget, nobody else wants anything: it borrows the idle slices
    d = Demand(
        company=np.zeros(5, np.int32),
        team=np.full(5, -1, np.int32),
        tier=np.zeros(5, np.int8),
        pending_tokens=np.full(5, 50_000),
        since_last_s=np.full(5, np.inf),
        frozen=np.zeros(5, bool),
        company_names=["acme", "idle"],
        company_shares=np.array([1.0, 1.0]),
        company_budget_gpu_s=np.array([0.0, np.inf]),
    )
    inv = Inventory((SliceGroup(slice_type("a10g"), 2),))
    lent = plan(d, inv, PolicyConfig(reserve_serving_fraction=0.0), 0.0)
    assert lent.summary["scheduled"] == 5 and lent.company_gpu_s["acme"] > 0
    held = plan(d, inv, PolicyConfig(reserve_serving_fraction=0.0, borrow_idle=False), 0.0)
    assert held.summary["scheduled"] == 0
    assert set(held.unscheduled.values()) == {"budget"}


def test_frozen_no_data_interval_reasons_and_json_round_trip():
    d = Demand.from_records(
        [
            {"model_id": "acme", "pending_tokens": 5000, "since_last_s": None},
            {"model_id": "acme/search", "pending_tokens": 0, "since_last_s": 99_999.0},
            {"model_id": "acme/search/dana", "pending_tokens": 800, "since_last_s": 10.0},
            {
                "model_id": "acme/search/ravi",
                "pending_tokens": 900,
                "since_last_s": 7200.0,
                "drift_state": "frozen",
            },
            {"model_id": "globex/ops/kim", "pending_tokens": 3000, "since_last_s": 7200.0},
        ],
        companies={"acme": {"share": 2.0}, "globex": {"share": 1.0, "budget_gpu_s_per_day": 10.0}},
    )
    assert d.company_names == ("acme", "globex") and d.team_names == ("acme/search", "globex/ops")
    assert d.tier.tolist() == [0, 1, 2, 2, 2]
    inv = Inventory.from_entries([{"profile": "cpu", "count": 2, "memory_gb": 16}])
    p = plan(d, inv, PolicyConfig(reserve_serving_fraction=0.0), now=1000.0)
    # the individual trained 10 s ago may train again: its 600 s interval less one 600 s cycle of slack is 0
    assert p.unscheduled == {"acme/search": "no data", "acme/search/ravi": "frozen"}
    assert sorted(p.scheduled) == ["acme", "acme/search/dana", "globex/ops/kim"]
    back = Plan.from_json(p.to_json())
    assert [pk.to_dict() for pk in back.packs] == [pk.to_dict() for pk in p.packs]
    assert back.unscheduled == dict(p.unscheduled) and back.company_gpu_s == pytest.approx(
        dict(p.company_gpu_s)
    )
    assert back.packs[0].resources == {"CPU": 1.0}
    # a team model trained 100 s ago is held by its 1800 s interval
    d2 = Demand.from_records([{"model_id": "acme/search", "pending_tokens": 10, "since_last_s": 100.0}])
    assert plan(d2, inv, PolicyConfig(), 0.0).unscheduled == {"acme/search": "interval"}


def test_capacity_reason_and_waiting_advance_under_overload():
    d = random_demand(5, 3000, 3, 30, frozen_p=0.0, budgets=False)
    d = replace(d, since_last_s=np.full(3000, np.inf), pending_tokens=np.full(3000, 2_000_000))
    p = plan(
        d, Inventory((SliceGroup(slice_type("a10g"), 1),)), PolicyConfig(reserve_serving_fraction=0.0), 0.0
    )
    assert (p.arrays.reason == CAPACITY).sum() > 0
    nxt = advance_waiting(d.waiting_cycles, p.arrays.reason)
    sched = p.arrays.reason == SCHEDULED
    assert np.all(nxt[sched] == 0)
    assert np.array_equal(nxt[~sched], d.waiting_cycles[~sched] + 1)


def _cycle_loop(d: Demand, inv: Inventory, cfg: PolicyConfig, cycles: int, arrive=None):
    """Run the policy for ``cycles`` cycles with every model kept backlogged; returns the
    largest waiting count seen and each company's GPU-seconds."""
    waiting = np.zeros(d.n_models, np.int32)
    usage = np.zeros(d.n_companies)
    since = np.full(d.n_models, np.inf)
    worst = 0
    total = np.zeros(d.n_companies)
    for k in range(cycles):
        cur = replace(
            d,
            waiting_cycles=waiting,
            company_usage_gpu_s=usage,
            since_last_s=since,
            pending_age_s=np.full(d.n_models, 3600.0),
        )
        p = plan(cur, inv, cfg, k * cfg.cycle_s)
        a = p.arrays
        since = since + cfg.cycle_s
        since[a.member_index] = np.maximum(cfg.cycle_s - a.member_finish_s, 0.0)
        usage = usage + a.company_gpu_s
        total += a.company_gpu_s
        waiting = advance_waiting(waiting, a.reason)
        worst = max(worst, int(waiting.max()))
    return worst, total


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.integers(3, 12))
def test_aging_bound_holds_under_sustained_overload(seed, bound):
    # every model always has far more data than the slices can train: fair share alone would
    # leave low-share companies' models waiting; the aging rule must schedule each within B
    d = random_demand(seed, 300, 4, 10, frozen_p=0.0, budgets=False, zero_share=False)
    d = replace(d, pending_tokens=np.full(300, 5_000_000), company_shares=np.array([100.0, 1.0, 1.0, 0.01]))
    cfg = PolicyConfig(
        aging_bound_cycles=bound, reserve_serving_fraction=0.0, tier_min_interval_s=(0.0, 0.0, 0.0)
    )
    inv = Inventory((SliceGroup(slice_type("a10g"), 1), SliceGroup(slice_type("h100-80gb:1g.10gb"), 2)))
    worst, total = _cycle_loop(d, inv, cfg, 3 * bound)
    assert worst < bound  # nobody left out for capacity `bound` cycles in a row
    assert total.sum() > 0


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1.0]))
def test_shares_are_respected_over_many_cycles(seed, age_weight):
    rng = np.random.default_rng(seed)
    n, n_comp = 600, 4
    company = np.repeat(np.arange(n_comp, dtype=np.int32), n // n_comp)
    shares = np.array([1.0, 2.0, 3.0, 6.0])
    d = Demand(
        company=company,
        team=np.full(n, -1, np.int32),
        tier=np.zeros(n, np.int8),
        pending_tokens=rng.integers(5_000_000, 8_000_000, n),
        since_last_s=np.full(n, np.inf),
        frozen=np.zeros(n, bool),
        company_names=[f"c{i}" for i in range(n_comp)],
        company_shares=shares,
    )
    cfg = PolicyConfig(
        aging_bound_cycles=1000,
        reserve_serving_fraction=0.0,
        tier_min_interval_s=(0.0, 0.0, 0.0),
        age_weight=age_weight,
        max_member_tokens=200_000,
    )
    inv = Inventory((SliceGroup(slice_type("a10g"), 2), SliceGroup(slice_type("h100-80gb:2g.20gb"), 1)))
    _, total = _cycle_loop(d, inv, cfg, 30)
    ratio = (total / total.sum()) / (shares / shares.sum())
    assert np.all(np.abs(ratio - 1.0) < 0.1), ratio


def test_fifo_and_round_robin_follow_their_orders():
    n = 40
    d = Demand(
        company=np.zeros(n, np.int32),
        team=np.full(n, -1, np.int32),
        tier=np.zeros(n, np.int8),
        pending_tokens=np.full(n, 3_000_000),
        since_last_s=(1 + np.arange(n, dtype=float)) * 10_000,
        frozen=np.zeros(n, bool),
        company_names=["c"],
        company_shares=np.ones(1),
        pending_age_s=np.arange(n, 0, -1, dtype=float),
    )
    inv = Inventory((SliceGroup(slice_type("a10g"), 1),))
    cfg = PolicyConfig(reserve_serving_fraction=0.0)
    fifo = set(plan_fifo(d, inv, cfg).arrays.member_index.tolist())
    rr = set(plan_round_robin(d, inv, cfg).arrays.member_index.tolist())
    k = len(fifo)
    assert 0 < k < n and fifo == set(range(k))  # oldest pending data first
    assert rr == set(range(n - len(rr), n))  # least recently trained first


def test_bad_input_is_a_clear_error():
    d = random_demand(1, 20, 2, 3)
    with pytest.raises(ValidationError, match="shares must be ≥ 0"):
        replace(d, company_shares=np.array([1.0, -1.0]))
    with pytest.raises(ValidationError, match="team_shares"):
        replace(d, team_shares=np.array([1.0, -2.0, 1.0]))
    with pytest.raises(ValidationError, match="pending_tokens"):
        replace(d, pending_tokens=-np.ones(20, np.int64))
    with pytest.raises(ValidationError, match="shape"):
        replace(d, frozen=np.zeros(3, bool))
    with pytest.raises(ValidationError, match="team"):
        Demand(
            company=np.array([1], np.int32),
            team=np.array([0], np.int32),
            tier=np.array([2], np.int8),
            pending_tokens=[1],
            since_last_s=[1.0],
            frozen=[False],
            company_names=["a", "b"],
            company_shares=[1.0, 1.0],
            team_company=np.array([0], np.int32),
        )
    with pytest.raises(ConfigError, match="unknown slice profile"):
        Inventory.from_entries([{"profile": "tpu-v5"}])
    with pytest.raises(ConfigError, match="empty"):
        Inventory(())
    with pytest.raises(ConfigError, match="empty"):
        Inventory.from_entries([{"profile": "a10g", "count": 0}])
    with pytest.raises(ConfigError, match="reserve_serving_fraction"):
        PolicyConfig(reserve_serving_fraction=1.0)
    with pytest.raises(ValidationError, match="not a fleet plan"):
        Plan.from_json('{"packs": []}')
    with pytest.raises(ValidationError, match="equal length"):
        Plan.from_json(
            '{"format": "fleet.plan/1", "packs": [{"slice_profile": "cpu", "base": "b", '
            '"members": ["a"], "token_budgets": [1, 2]}]}'
        )


def test_memory_model_limits_pack_size():
    # the 1B base (2.5 GB) next to members of ~1.1 GB: a 1g.10gb slice holds a handful, an H100 far more
    n = 200
    d = Demand(
        company=np.zeros(n, np.int32),
        team=np.full(n, -1, np.int32),
        tier=np.zeros(n, np.int8),
        pending_tokens=np.full(n, 4_000),
        since_last_s=np.full(n, np.inf),
        frozen=np.zeros(n, bool),
        company_names=["c"],
        company_shares=np.ones(1),
    )
    cfg = PolicyConfig(reserve_serving_fraction=0.0, default_base=BaseSpec.preset("1b", "default"))
    small = plan(d, Inventory.from_entries([{"profile": "h100:1g.10gb"}]), cfg)
    big = plan(d, Inventory.from_entries([{"profile": "h100-80gb"}]), cfg)
    assert 1 <= max(len(p.members) for p in small.packs) <= 8
    assert max(len(p.members) for p in big.packs) > 30
    # an 8B base does not fit a 1g.10gb slice at all
    none = plan(
        d,
        Inventory.from_entries([{"profile": "h100:1g.10gb"}]),
        replace(cfg, default_base=BaseSpec.preset("8b", "default")),
    )
    assert none.summary["scheduled"] == 0 and set(none.unscheduled.values()) == {"capacity"}
    assert REASONS[CAPACITY] == "capacity"


def test_zero_share_company_uses_idle_capacity_in_full():
    n = 10
    d = Demand(
        company=np.zeros(n, np.int32),
        team=np.full(n, -1, np.int32),
        tier=np.zeros(n, np.int8),
        pending_tokens=np.full(n, 100_000),
        since_last_s=np.full(n, np.inf),
        frozen=np.zeros(n, bool),
        company_names=["free", "paying"],
        company_shares=np.array([0.0, 1.0]),
    )
    p = plan(
        d, Inventory((SliceGroup(slice_type("h100-80gb"), 1),)), PolicyConfig(reserve_serving_fraction=0.0)
    )
    assert p.summary["scheduled"] == n and np.all(p.arrays.member_budget == 100_000)
