"""A synthetic fleet for the simulator, the benchmarks and the tests.

- Companies have Zipf-distributed sizes (P(rank r) ∝ r^−s): a few giants, a long tail of
  small ones. Each has one company model and teams of about ``team_size`` seats, each team
  one team model plus individuals (team sizes Zipf-distributed within the company too).
- Shares are seat-based: a company's share is its seats times a plan level drawn from
  {1, 2, 4, 8}; a team's share within its company is its seats.
- Data arrival is heavy-tailed: per cycle a model receives new data with probability
  p_i = rate_tier × I_company × LogNormal(0, 0.75), with I_company = plan level ×
  LogNormal(0, ``intensity_sigma``): companies on bigger plans send more data, but not in
  proportion, so some send more than their share pays for; an arrival carries
  scale_tier × LogNormal(0, 0.5) × (1 + Lomax(α = 1.5)) tokens (infinite variance). Tier
  rates are 3 : 2 : 1 and tier scales 50 : 10 : 1 (company documents are large and frequent,
  an individual's conversations small).
- ``calibrated(tokens)`` rescales all arrival sizes to an expected total per cycle (the
  simulator's offered load).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fleet.scheduler.demand import Demand

PARETO_ALPHA = 1.5
PLAN_LEVELS = np.array([1.0, 2.0, 4.0, 8.0])
PLAN_LEVEL_P = np.array([0.4, 0.3, 0.2, 0.1])
TIER_RATE = np.array([3.0, 2.0, 1.0])  # relative arrival probability: company, team, individual
TIER_SCALE = np.array([50.0, 10.0, 1.0])  # relative tokens per arrival
TIER_RANK = np.array([16, 8, 8], dtype=np.int16)


@dataclass(frozen=True, eq=False)
class SyntheticFleet:
    company: np.ndarray  # (N,) int32
    team: np.ndarray  # (N,) int32, -1 for company models
    tier: np.ndarray  # (N,) int8
    team_company: np.ndarray  # (T,) int32
    company_shares: np.ndarray  # (C,)
    team_shares: np.ndarray  # (T,)
    rank: np.ndarray  # (N,) int16
    frozen: np.ndarray  # (N,) bool
    arrival_p: np.ndarray  # (N,) probability of new data per cycle
    token_scale: np.ndarray  # (N,) tokens per arrival / 3 (the Lomax mean is 2)

    @property
    def n_models(self) -> int:
        return len(self.company)

    @property
    def n_companies(self) -> int:
        return len(self.company_shares)

    @property
    def company_names(self) -> tuple[str, ...]:
        return tuple(f"c{i}" for i in range(self.n_companies))

    def expected_tokens_per_cycle(self) -> float:
        return float((self.arrival_p * self.token_scale).sum() * (1.0 + 1.0 / (PARETO_ALPHA - 1.0)))

    def calibrated(self, tokens_per_cycle: float) -> SyntheticFleet:
        """The same fleet with arrival sizes scaled to ``tokens_per_cycle`` expected tokens."""
        return replace(
            self, token_scale=self.token_scale * (tokens_per_cycle / self.expected_tokens_per_cycle())
        )

    def arrivals(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One cycle of data arrival: (model indices, tokens each)."""
        idx = np.flatnonzero(rng.random(self.n_models) < self.arrival_p)
        tokens = self.token_scale[idx] * (1.0 + rng.pareto(PARETO_ALPHA, len(idx)))
        return idx, np.maximum(tokens, 1.0).astype(np.int64)

    def demand(self, **columns: np.ndarray) -> Demand:
        """A Demand of this fleet with the given per-model state columns (pending_tokens, …)."""
        return Demand(
            company=self.company,
            team=self.team,
            tier=self.tier,
            frozen=columns.pop("frozen", self.frozen),
            company_names=self.company_names,
            company_shares=self.company_shares,
            team_company=self.team_company,
            team_shares=self.team_shares,
            team_names=tuple(f"t{i}" for i in range(len(self.team_company))),
            rank=self.rank,
            **columns,
        )


def zipf_sizes(total: int, groups: int, s: float, rng: np.random.Generator) -> np.ndarray:
    """``groups`` sizes ≥ 1 summing to ``total``, Zipf-distributed (largest first)."""
    w = 1.0 / np.arange(1, groups + 1) ** s
    return 1 + rng.multinomial(total - groups, w / w.sum())


def synthetic_fleet(
    n_models: int,
    *,
    seed: int = 0,
    models_per_company: int = 400,
    team_size: int = 25,
    zipf_s: float = 1.1,
    arrival_rate: float = 0.01,
    frozen_fraction: float = 0.002,
    intensity_sigma: float = 0.5,
) -> SyntheticFleet:
    if n_models < 2:
        raise ValueError("a synthetic fleet needs at least 2 models")
    rng = np.random.default_rng(seed)
    n_comp = max(2, min(n_models // 2, round(n_models / models_per_company)))
    sizes = zipf_sizes(n_models, n_comp, zipf_s, rng)
    company, team, tier, team_company, team_shares = [], [], [], [], []
    n_teams = 0
    for c, size in enumerate(sizes.tolist()):
        company.append(np.full(size, c, np.int32))
        rest = size - 1
        teams = min(rest, math.ceil(rest / team_size)) if rest else 0
        t_tier = [np.zeros(1, np.int8)]
        t_team = [np.full(1, -1, np.int32)]
        if teams:
            seats = zipf_sizes(rest, teams, zipf_s, rng)  # team model + individuals
            ids = n_teams + np.arange(teams, dtype=np.int32)
            t_team.append(np.repeat(ids, seats))
            first = np.zeros(rest, bool)
            first[np.concatenate(([0], np.cumsum(seats)[:-1]))] = True
            t_tier.append(np.where(first, 1, 2).astype(np.int8))
            team_company.append(np.full(teams, c, np.int32))
            team_shares.append(seats.astype(np.float64))
            n_teams += teams
        team.append(np.concatenate(t_team))
        tier.append(np.concatenate(t_tier))
    company_a = np.concatenate(company)
    tier_a = np.concatenate(tier)
    level = rng.choice(PLAN_LEVELS, n_comp, p=PLAN_LEVEL_P)
    intensity = level * rng.lognormal(0.0, intensity_sigma, n_comp)
    p = arrival_rate * TIER_RATE[tier_a] * intensity[company_a] * rng.lognormal(0.0, 0.75, n_models)
    scale = TIER_SCALE[tier_a] * rng.lognormal(0.0, 0.5, n_models)
    return SyntheticFleet(
        company=company_a,
        team=np.concatenate(team),
        tier=tier_a,
        team_company=np.concatenate(team_company) if team_company else np.zeros(0, np.int32),
        company_shares=sizes * level,
        team_shares=np.concatenate(team_shares) if team_shares else np.zeros(0),
        rank=TIER_RANK[tier_a],
        frozen=rng.random(n_models) < frozen_fraction,
        arrival_p=np.minimum(p, 0.9),
        token_scale=scale,
    )
