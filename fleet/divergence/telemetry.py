"""Drift metrics for operators through ``ray.util.metrics`` (Prometheus endpoint, dashboard).

Histograms of KL, relative ‖ΔW‖ and top-1 agreement, and counters of scored versions and of
actions. Tags are bounded values only: the tier, the base model, the relation (base | parent) and,
for actions, their kind. A model id is NEVER a tag: 10⁵ models × histogram buckets would be
millions of series. Per-model scores live in the registry (``fleet drift report``).

Recording is a no-op in a process that is not connected to Ray (e.g. ``fleet drift scan`` run
locally without a cluster): the registry still holds every sample.
"""

from __future__ import annotations

from fleet._metrics import Spec, make_metrics
from fleet.types import TIERS

ALLOWED_TAGS = frozenset({"tier", "base_model", "relation", "action"})
RELATIONS = ("base", "parent")

_KL = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 5.0, 10.0)
_REL = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
_TOP1 = (0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 1.0)


# fmt: off
SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("histogram", "fleet_drift_kl", "Mean per-token KL(reference || model) on the probe set, nats (reference: the base or the parent stack).", ("tier", "base_model", "relation"), _KL),
        Spec("histogram", "fleet_drift_rel_weight_norm", "||dW||_F / ||W0||_F: the stack vs the base, or the distance to the parent's stack.", ("tier", "base_model", "relation"), _REL),
        Spec("histogram", "fleet_drift_top1_agreement", "Share of probe tokens where the model's argmax is the reference's.", ("tier", "base_model", "relation"), _TOP1),
        Spec("counter", "fleet_drift_models_scored", "Model versions scored on a probe set.", ("tier", "base_model")),
        Spec("counter", "fleet_drift_actions", "Drift actions taken, by kind (warn, freeze, rollback, reject, unfreeze).", ("tier", "base_model", "action")),
    )
}
# fmt: on


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return ray.is_initialized()


class DriftTelemetry:
    """The drift metrics of one process; created lazily, only once connected to Ray."""

    def __init__(self) -> None:
        self._m: dict[str, object] | None = None

    def _metrics(self) -> dict[str, object] | None:
        if self._m is None and _ray_connected():
            self._m = make_metrics(SPECS.values(), ALLOWED_TAGS)
        return self._m

    @staticmethod
    def _tier(tier: str) -> str:
        return tier if tier in TIERS else "unknown"

    def scored(self, tier: str, base_model: str, relation: str, sample: dict) -> None:
        """One sample (a row of ``divergence_samples``): its KL, relative norm and agreement."""
        m = self._metrics()
        if m is None:
            return
        tags = {"tier": self._tier(tier), "base_model": base_model, "relation": relation}
        for name, key in (("fleet_drift_kl", "kl"), ("fleet_drift_rel_weight_norm", "rel_weight_norm"),
                          ("fleet_drift_top1_agreement", "top1")):  # fmt: skip
            value = sample.get(key)
            if value is not None and value == value:  # skip missing and NaN
                m[name].observe(float(value), tags=tags)
        if relation == "base":
            m["fleet_drift_models_scored"].inc(1, tags={"tier": tags["tier"], "base_model": base_model})

    def action(self, tier: str, base_model: str, action: str) -> None:
        m = self._metrics()
        if m is None:
            return
        m["fleet_drift_actions"].inc(
            1, tags={"tier": self._tier(tier), "base_model": base_model, "action": str(action)}
        )


TELEMETRY = DriftTelemetry()
