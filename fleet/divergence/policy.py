"""Drift policy: what to do about each model's drift, decided as data (no registry, no Ray).

Inputs are :class:`DriftSample` s (one model version's metrics, its tier, whether it is a candidate
or the active version, and its drift history: state and strikes), the tier's hard caps
(``DriftCaps``) and the tier's population statistics; the output is a list of :class:`Decision` s
that the monitor applies to the registry in one transaction per model.

**Rules.** A *hard cap* is violated when ``kl > max_kl``, ``rel_weight_norm > max_rel_weight_norm``,
``top1_agreement < min_top1_agreement`` or ``general_dnll > max_general_dnll`` (a NaN counts as a
violation: fail closed; a missing metric is not checked). The *population rule* flags a value
beyond ``mean ± k·σ`` of the tier's accepted (active) models for that metric (``+`` where higher is
worse, ``−`` for top-1 agreement), once at least ``min_population`` of them have it; σ is the
population standard deviation and the comparison is strict.

**Decision table** (one row per sample, checked top to bottom):

==========  ===========================  ========================  ==========================
subject     condition                    action                    state after / strikes
==========  ===========================  ========================  ==========================
candidate   over a hard cap              REJECT                    unchanged / +1
candidate   within the hard caps         none (may be published)   unchanged / unchanged
active      over a hard cap, an earlier  ROLLBACK (to the          WARNED, FROZEN stays / +1
            version exists               previous active version)
active      over a hard cap, no earlier  FREEZE (nothing to roll   FROZEN / +1
            version, not frozen          back to; stop training)
active      same, already frozen         none                      FROZEN / unchanged
active      over the population rule,    WARN                      WARNED / +1
            not frozen
active      over the population rule,    none                      FROZEN / unchanged
            frozen
active      within everything            none                      OK, FROZEN stays / 0
==========  ===========================  ========================  ==========================

**Strikes.** REJECT, ROLLBACK and WARN are strikes; when a model's consecutive strikes reach
``freeze_after`` a FREEZE decision follows the strike's own decision (a model whose training keeps
producing outliers stops training). A clean scan of the active version resets the count. Nothing
here unfreezes: ``DriftAction.UNFREEZE`` is an operator's decision. Candidates are judged by the hard
caps alone (the training gate, :func:`gate`); the population rule needs the version in service.

Deterministic: decisions come in the order of the samples, reasons are fixed-format strings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleet.config import DivergenceConfig, DriftCaps, FleetConfig
from fleet.errors import ConfigError
from fleet.types import TIERS, DriftAction, DriftState

# (metric, DriftCaps field, +1 if higher is worse / -1 if lower is worse)
METRICS: tuple[tuple[str, str, int], ...] = (
    ("kl", "max_kl", +1),
    ("rel_weight_norm", "max_rel_weight_norm", +1),
    ("top1_agreement", "min_top1_agreement", -1),
    ("general_dnll", "max_general_dnll", +1),
)
STRIKES: frozenset[DriftAction] = frozenset({DriftAction.REJECT, DriftAction.ROLLBACK, DriftAction.WARN})


@dataclass(frozen=True)
class DriftMetrics:
    """One model version's drift; None where not measured (e.g. weight space only, before scoring)."""

    kl: float | None = None
    """Mean per-token KL(base ‖ model) on the probe set, nats."""
    rel_weight_norm: float | None = None
    """‖ΔW‖_F / ‖W₀‖_F over all adapted modules."""
    top1_agreement: float | None = None
    """Share of probe tokens where the model's argmax is the base's."""
    general_dnll: float | None = None
    """Rise of NLL on general held-out text over the base, nats/token."""

    def get(self, name: str) -> float | None:
        return getattr(self, name)


@dataclass(frozen=True)
class DriftSample:
    """What the policy needs to know about one evaluated model version."""

    model_id: str
    version: int
    tier: str
    metrics: DriftMetrics
    candidate: bool = False
    """True at publication time (the gate); False for the active version in a scan."""
    state: DriftState = DriftState.OK
    """The model's drift state before this evaluation."""
    strikes: int = 0
    """Consecutive strikes before this evaluation (see the module docstring)."""
    has_previous: bool = False
    """Whether an earlier version exists to roll back to."""


@dataclass(frozen=True)
class Decision:
    model_id: str
    version: int
    action: DriftAction | None
    """None: nothing to do (the sample is recorded with the model's history all the same)."""
    reason: str
    state: DriftState
    """The model's drift state after this decision."""
    strikes: int
    """Consecutive strikes after this decision (persist it for the next evaluation)."""


@dataclass(frozen=True)
class MetricStats:
    count: int
    mean: float
    std: float


@dataclass(frozen=True)
class DriftPolicy:
    """The population rule and the strike limit (hard caps come per tier from ``DriftCaps``)."""

    population_sigma: float = 3.0
    """Flag a value beyond mean ± k·σ of the tier's accepted models."""
    min_population: int = 20
    """The population rule applies once a tier has this many accepted models with the metric."""
    freeze_after: int = 3
    """Consecutive strikes (warn, rollback, reject) that freeze a model's training."""
    caps: Mapping[str, DriftCaps] = field(default_factory=lambda: {t: DriftCaps() for t in TIERS})
    """Hard caps per tier."""

    def __post_init__(self) -> None:
        if self.freeze_after < 1:
            raise ConfigError(f"freeze_after must be >= 1, got {self.freeze_after}")
        if self.min_population < 2:
            raise ConfigError(f"min_population must be >= 2, got {self.min_population}")

    @classmethod
    def from_config(cls, cfg: FleetConfig, freeze_after: int = 3) -> DriftPolicy:
        div: DivergenceConfig = cfg.divergence
        return cls(
            population_sigma=div.population_sigma,
            min_population=div.min_population,
            freeze_after=freeze_after,
            caps={t: cfg.tier(t).drift for t in TIERS},
        )

    def caps_for(self, tier: str) -> DriftCaps:
        try:
            return self.caps[str(getattr(tier, "value", tier))]
        except KeyError:
            raise ConfigError(f"no drift caps for tier {tier!r}; tiers are {', '.join(TIERS)}") from None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def cap_violations(metrics: DriftMetrics, caps: DriftCaps) -> list[str]:
    """Every hard cap the metrics break, as reasons (empty: within the caps)."""
    out = []
    for name, cap_field, sign in METRICS:
        value, cap = metrics.get(name), getattr(caps, cap_field)
        if value is None:
            continue
        if math.isnan(value):
            out.append(f"{name} is NaN (treated as over {cap_field})")
        elif (value - cap) * sign > 0:
            out.append(f"{name} {_fmt(value)} {'>' if sign > 0 else '<'} {cap_field} {_fmt(cap)}")
    return out


def gate(candidate: DriftMetrics, caps: DriftCaps) -> tuple[bool, str]:
    """The training gate hook: may this candidate version be published under these caps?"""
    broken = cap_violations(candidate, caps)
    return (False, "; ".join(broken)) if broken else (True, "within the hard drift caps")


def population_stats(samples: Iterable[DriftSample]) -> dict[str, dict[str, MetricStats]]:
    """Per tier and metric: count, mean and σ of the accepted (non-candidate) samples' finite values."""
    values: dict[str, dict[str, list[float]]] = {}
    for s in samples:
        if s.candidate:
            continue
        per = values.setdefault(str(getattr(s.tier, "value", s.tier)), {})
        for name, _, _ in METRICS:
            v = s.metrics.get(name)
            if v is not None and math.isfinite(v):
                per.setdefault(name, []).append(v)
    out: dict[str, dict[str, MetricStats]] = {}
    for tier, per in sorted(values.items()):
        out[tier] = {}
        for name, vs in sorted(per.items()):
            mean = math.fsum(vs) / len(vs)
            var = math.fsum((v - mean) ** 2 for v in vs) / len(vs)
            out[tier][name] = MetricStats(len(vs), mean, math.sqrt(var))
    return out


def population_outliers(
    metrics: DriftMetrics, stats: Mapping[str, MetricStats], policy: DriftPolicy
) -> list[str]:
    """Every metric beyond mean ± k·σ of an active population, as reasons."""
    out = []
    k = policy.population_sigma
    for name, _, sign in METRICS:
        value, st = metrics.get(name), stats.get(name)
        if value is None or st is None or st.count < policy.min_population or math.isnan(value):
            continue
        limit = st.mean + sign * k * st.std
        if (value - limit) * sign > 0:
            rel = "mean + " if sign > 0 else "mean − "
            out.append(
                f"{name} {_fmt(value)} {'>' if sign > 0 else '<'} {_fmt(limit)} "
                f"({rel}{_fmt(k)}σ of {st.count} accepted: {_fmt(st.mean)} ± {_fmt(st.std)})"
            )
    return out


def _judge(
    s: DriftSample, policy: DriftPolicy, stats: Mapping[str, MetricStats]
) -> tuple[DriftAction | None, DriftState, int, str]:
    """``(action, state after, strikes after, reason)`` for one sample: the rows of the table."""
    hard = cap_violations(s.metrics, policy.caps_for(s.tier))
    frozen = s.state is DriftState.FROZEN
    if s.candidate:
        if hard:
            return DriftAction.REJECT, s.state, s.strikes + 1, "; ".join(hard)
        return None, s.state, s.strikes, "candidate within the hard caps"
    if hard:
        reason = "; ".join(hard)
        if s.has_previous:
            return (
                DriftAction.ROLLBACK,
                DriftState.FROZEN if frozen else DriftState.WARNED,
                s.strikes + 1,
                reason,
            )
        reason += "; no previous version to roll back to"
        if frozen:
            return None, DriftState.FROZEN, s.strikes, reason + "; already frozen"
        return DriftAction.FREEZE, DriftState.FROZEN, s.strikes + 1, reason
    outliers = population_outliers(s.metrics, stats, policy)
    if not outliers:
        return None, DriftState.FROZEN if frozen else DriftState.OK, 0, "within caps and population"
    if frozen:
        return None, DriftState.FROZEN, s.strikes, "already frozen; " + "; ".join(outliers)
    return DriftAction.WARN, DriftState.WARNED, s.strikes + 1, "; ".join(outliers)


def decide(
    samples: Iterable[DriftSample],
    policy: DriftPolicy | None = None,
    population: Mapping[str, Mapping[str, MetricStats]] | None = None,
) -> list[Decision]:
    """Decisions for every sample, following the table in the module docstring.

    ``population``: per tier and metric statistics of the accepted models (from
    :func:`population_stats` over the tier's latest active samples); None computes them from
    ``samples`` themselves.
    """
    policy = policy or DriftPolicy()
    samples = list(samples)
    if population is None:
        population = population_stats(samples)
    out: list[Decision] = []
    for s in samples:
        stats = population.get(str(getattr(s.tier, "value", s.tier)), {})
        action, state, strikes, reason = _judge(s, policy, stats)
        out.append(Decision(s.model_id, s.version, action, reason, state, strikes))
        if action in STRIKES and strikes >= policy.freeze_after and state is not DriftState.FROZEN:
            reason = f"{strikes} consecutive drift strikes (freeze_after={policy.freeze_after})"
            out.append(
                Decision(s.model_id, s.version, DriftAction.FREEZE, reason, DriftState.FROZEN, strikes)
            )
    return out
