"""The simulator and its figures of merit, on small fleets."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleet.scheduler import SimConfig, simulate
from fleet.scheduler.metrics import jain, jain_vs_shares, percentiles, water_fill
from fleet.scheduler.simulate import plot_reports
from fleet.scheduler.synthetic import synthetic_fleet


def test_water_fill_and_jain():
    # demands below the level are met in full, the rest split by weight
    x = water_fill(10.0, np.array([1.0, 1.0, 2.0]), np.array([1.0, 100.0, 100.0]))
    assert x == pytest.approx([1.0, 3.0, 6.0])
    assert water_fill(5.0, np.ones(2), np.array([1.0, 2.0])) == pytest.approx([1.0, 2.0])
    assert water_fill(4.0, np.array([0.0, 1.0]), np.array([9.0, 9.0])) == pytest.approx([0.0, 4.0])
    assert jain(np.ones(5)) == pytest.approx(1.0)
    assert jain(np.array([1.0, 0, 0, 0])) == pytest.approx(0.25)
    # usage exactly the share-weighted max-min split: perfectly fair
    assert jain_vs_shares(
        np.array([1.0, 3.0, 6.0]), np.array([1.0, 1.0, 2.0]), np.array([1.0, 100, 100])
    ) == pytest.approx(1.0)
    assert (
        jain_vs_shares(np.array([6.0, 3.0, 1.0]), np.array([1.0, 1.0, 2.0]), np.array([100.0, 100, 100]))
        < 0.8
    )
    assert np.isnan(percentiles(np.zeros(0))[0])


def test_synthetic_fleet_shape():
    f = synthetic_fleet(5000, seed=3)
    assert f.n_models == 5000
    assert np.bincount(f.tier, minlength=3)[0] == f.n_companies  # one company model each
    sizes = np.bincount(f.company)
    assert sizes[0] > 5 * np.median(sizes) and sizes[0] > 10 * sizes[-1]  # Zipf: a giant and a long tail
    assert np.all(f.team_company[f.team[f.team >= 0]] == f.company[f.team >= 0])
    g = f.calibrated(1e6)
    assert g.expected_tokens_per_cycle() == pytest.approx(1e6)
    idx, tokens = g.arrivals(np.random.default_rng(0))
    assert len(idx) > 0 and tokens.min() >= 1
    d = f.demand(pending_tokens=np.zeros(5000, np.int64), since_last_s=np.zeros(5000))
    assert d.n_models == 5000 and d.n_teams == len(f.team_company)


@pytest.fixture(scope="module")
def small_runs():
    cfg = SimConfig(models=10_000, slices=4, hours=12.0, load=1.5, seed=1)
    return {p: simulate(cfg, p) for p in ("fleet", "fifo", "round-robin")}


def test_simulated_overload_fleet_vs_baselines(small_runs):
    fleet, fifo = small_runs["fleet"], small_runs["fifo"]
    assert fleet.cycles == 72 and len(fleet.series["utilization"]) == 72
    assert fleet.starved == 0  # the aging guarantee
    assert fifo.starved > 0  # oldest-first lets low-data models wait past the bound under overload
    assert fleet.utilization > 0.9 and fifo.utilization > 0.9
    assert fleet.jain > 0.95 > fifo.jain  # FIFO gives heavy senders more than their share
    # fleet's individuals are fresher at the tail, not only at the median
    assert fleet.freshness_s["individual"]["p99"] < fifo.freshness_s["individual"]["p99"]
    for r in small_runs.values():
        for tier in ("company", "team", "individual", "all"):
            p50, p99 = r.freshness_s[tier]["p50"], r.freshness_s[tier]["p99"]
            assert 0 < p50 <= p99
    d = fleet.to_dict()
    assert (
        "series" not in d
        and d["policy"] == "fleet"
        and fleet.to_dict(series=True)["series"]["hour"][1] == pytest.approx(1 / 6)
    )


def test_simulation_is_deterministic():
    cfg = SimConfig(models=800, slices=3, hours=1.0, seed=5)
    a, b = simulate(cfg), simulate(cfg)
    same = [json.dumps(r.to_dict(series=True) | {"wall_s": 0}, sort_keys=True) for r in (a, b)]  # NaN-safe
    assert same[0] == same[1]


def test_plot(small_runs, tmp_path):
    out = plot_reports(list(small_runs.values()), str(tmp_path / "sim.png"))
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
