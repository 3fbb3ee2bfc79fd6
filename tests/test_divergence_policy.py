"""The drift policy's decision table, strikes, population rule and training gate."""

from __future__ import annotations

import math

import pytest

from fleet.config import DriftCaps, FleetConfig
from fleet.divergence.policy import (
    Decision,
    DriftMetrics,
    DriftPolicy,
    DriftSample,
    MetricStats,
    decide,
    gate,
    population_stats,
)
from fleet.errors import ConfigError
from fleet.types import DriftAction, DriftState

CAPS = DriftCaps(max_kl=2.0, max_rel_weight_norm=1.0, min_top1_agreement=0.2, max_general_dnll=1.0)
POLICY = DriftPolicy(
    population_sigma=3.0,
    min_population=20,
    freeze_after=3,
    caps={t: CAPS for t in ("company", "team", "individual")},
)
OK = DriftMetrics(kl=0.5, rel_weight_norm=0.1, top1_agreement=0.8, general_dnll=0.05)


def _sample(model="acme/search/ann", **kw) -> DriftSample:
    kw.setdefault("tier", "individual")
    kw.setdefault("version", 2)
    kw.setdefault("metrics", OK)
    return DriftSample(model_id=model, **kw)


def _population(n: int, kl_values=None, tier="individual") -> list[DriftSample]:
    kls = kl_values or [0.4 + 0.01 * (i % 10) for i in range(n)]
    return [
        _sample(f"acme/p/m{i}", tier=tier, metrics=DriftMetrics(kl=v, top1_agreement=0.8))
        for i, v in enumerate(kls)
    ]


def _only(decisions: list[Decision], model: str) -> list[Decision]:
    return [d for d in decisions if d.model_id == model]


def test_gate_rejects_any_cap_and_names_it():
    assert gate(OK, CAPS) == (True, "within the hard drift caps")
    ok, reason = gate(DriftMetrics(kl=2.5, top1_agreement=0.1), CAPS)
    assert (
        not ok and "kl 2.5 > max_kl 2" in reason and "top1_agreement 0.1 < min_top1_agreement 0.2" in reason
    )
    # a missing metric is not checked; a NaN fails closed
    assert gate(DriftMetrics(rel_weight_norm=0.3), CAPS)[0]
    ok, reason = gate(DriftMetrics(general_dnll=math.nan), CAPS)
    assert not ok and "NaN" in reason


def test_decision_table():
    over = DriftMetrics(kl=3.0)
    samples = [
        _sample("c/reject", candidate=True, metrics=over),
        _sample("c/publish", candidate=True),
        _sample("a/rollback", metrics=over, has_previous=True),
        _sample("a/first", metrics=over, has_previous=False),
        _sample("a/first-frozen", metrics=over, state=DriftState.FROZEN, strikes=1),
        _sample("a/clean", state=DriftState.WARNED, strikes=2),
        _sample("a/frozen-clean", state=DriftState.FROZEN, strikes=2),
    ]
    got = {d.model_id: (d.action, d.state, d.strikes) for d in decide(samples, POLICY)}
    assert got == {
        "c/reject": (DriftAction.REJECT, DriftState.OK, 1),
        "c/publish": (None, DriftState.OK, 0),
        "a/rollback": (DriftAction.ROLLBACK, DriftState.WARNED, 1),
        "a/first": (DriftAction.FREEZE, DriftState.FROZEN, 1),
        "a/first-frozen": (None, DriftState.FROZEN, 1),
        "a/clean": (None, DriftState.OK, 0),
        "a/frozen-clean": (None, DriftState.FROZEN, 0),
    }


def test_population_rule_warns_only_with_enough_peers():
    outlier = _sample("acme/x/out", metrics=DriftMetrics(kl=1.5, top1_agreement=0.8))  # under the hard cap
    small = decide([*_population(10), outlier], POLICY)
    assert _only(small, "acme/x/out")[0].action is None  # 11 < min_population: rule inactive
    big = decide([*_population(40), outlier], POLICY)
    (d,) = _only(big, "acme/x/out")
    assert d.action is DriftAction.WARN and d.state is DriftState.WARNED and d.strikes == 1
    assert d.reason.startswith("kl 1.5 > ") and "mean + 3σ of 41 accepted" in d.reason
    # nobody else in the population is flagged
    assert all(x.action is None for x in big if x.model_id != "acme/x/out")


def test_population_rule_is_per_tier_and_lower_is_worse_for_agreement():
    stats = {
        "team": {"top1_agreement": MetricStats(count=50, mean=0.8, std=0.05)},
        "individual": {"kl": MetricStats(count=50, mean=0.2, std=0.01)},
    }
    low = _sample("t/low", tier="team", metrics=DriftMetrics(top1_agreement=0.6, kl=0.9))
    high = _sample("t/high", tier="team", metrics=DriftMetrics(top1_agreement=0.99, kl=0.9))
    got = decide([low, high], POLICY, population=stats)
    assert got[0].action is DriftAction.WARN and "top1_agreement 0.6 < 0.65" in got[0].reason
    assert got[1].action is None  # kl 0.9 is judged against the team's stats, which have none


def test_repeated_strikes_freeze():
    stats = {"individual": {"kl": MetricStats(count=50, mean=0.2, std=0.01)}}
    warn = DriftMetrics(kl=0.5)
    d1 = decide([_sample(metrics=warn, strikes=0)], POLICY, stats)
    assert [d.action for d in d1] == [DriftAction.WARN]
    d3 = decide([_sample(metrics=warn, strikes=2, state=DriftState.WARNED)], POLICY, stats)
    assert [(d.action, d.state) for d in d3] == [
        (DriftAction.WARN, DriftState.WARNED),
        (DriftAction.FREEZE, DriftState.FROZEN),
    ]
    assert "3 consecutive drift strikes" in d3[1].reason
    # a rollback is a strike too; a frozen model is not frozen twice
    d_rb = decide([_sample(metrics=DriftMetrics(kl=5.0), has_previous=True, strikes=2)], POLICY, stats)
    assert [d.action for d in d_rb] == [DriftAction.ROLLBACK, DriftAction.FREEZE]
    frozen = decide(
        [_sample(metrics=DriftMetrics(kl=5.0), has_previous=True, strikes=5, state=DriftState.FROZEN)],
        POLICY,
        stats,
    )
    assert [(d.action, d.state) for d in frozen] == [(DriftAction.ROLLBACK, DriftState.FROZEN)]
    # a frozen outlier gets no new warning
    quiet = decide([_sample(metrics=warn, strikes=4, state=DriftState.FROZEN)], POLICY, stats)
    assert [(d.action, d.state, d.strikes) for d in quiet] == [(None, DriftState.FROZEN, 4)]


def test_population_stats_use_accepted_finite_values_only():
    samples = [
        _sample("a", metrics=DriftMetrics(kl=1.0)),
        _sample("b", metrics=DriftMetrics(kl=3.0)),
        _sample("c", metrics=DriftMetrics(kl=math.nan)),
        _sample("d", metrics=DriftMetrics(kl=100.0), candidate=True),
        _sample("e", tier="team", metrics=DriftMetrics(kl=7.0)),
    ]
    stats = population_stats(samples)
    assert stats["individual"]["kl"] == MetricStats(count=2, mean=2.0, std=1.0)
    assert stats["team"]["kl"] == MetricStats(count=1, mean=7.0, std=0.0)


def test_decisions_are_deterministic_and_in_sample_order():
    samples = [*_population(30), _sample("z/last", metrics=DriftMetrics(kl=9.0), has_previous=True)]
    a, b = decide(samples, POLICY), decide(list(samples), POLICY)
    assert a == b
    assert [d.model_id for d in a] == [s.model_id for s in samples]


def test_policy_config_from_fleet_config_and_validation():
    cfg = FleetConfig.model_validate(
        {
            "divergence": {"population_sigma": 2.5, "min_population": 7},
            "tiers": {"team": {"drift": {"max_kl": 0.7}}},
        }
    )
    p = DriftPolicy.from_config(cfg, freeze_after=5)
    assert (p.population_sigma, p.min_population, p.freeze_after) == (2.5, 7, 5)
    assert p.caps_for("team").max_kl == 0.7 and p.caps_for("company").max_kl == 2.0
    with pytest.raises(ConfigError, match="tier"):
        p.caps_for("galaxy")
    with pytest.raises(ConfigError, match="freeze_after"):
        DriftPolicy(freeze_after=0)
