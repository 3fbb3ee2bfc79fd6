"""fleet.divergence: how far every model drifts from the base and from its parent, and what to do.

Contract (stable)::

    # the control loop's hooks
    gate = publication_gate(fl)            # gate(member, metrics, adapter) -> (publish?, reason)
    counts = scan_after_training(fl, cycle_id, outcomes)   # {"scored", "warned", "frozen", "rolled_back"}

    # operators
    res = scan(fl, models=None, probe_set=None)   # ScanResult: counts, versions, skipped, errors
    unfreeze(fl, model_id, reason)
    client, job_id, meta = submit_watch(fl, every_s=600)   # the watch loop as a Ray job
    rep = build_report(fl); plot_report(rep, "drift.png"); render_report(rep, console)

    # building blocks
    probe = ensure_probe_set(fl)            # ProbeSet: rows + the base's cached top-k log-probs
    FunctionScorer(engine, probe, fetch, batch_models=4, base_norms=...).score([ScoreItem(...)])

- Metrics (pure, no registry, no Ray): ``fleet.divergence.metrics`` (weight space from r×r Grams,
  function space from log-probs, the top-k cache and its bounds).
- Policy (pure): ``fleet.divergence.policy`` — ``DriftMetrics``, ``DriftSample``, ``Decision``,
  ``DriftPolicy``, ``gate``, ``decide``, ``population_stats``; the decision table is in its docstring.
- Operator metrics: ``fleet.divergence.telemetry`` (Ray metrics tagged by tier, base model,
  relation and action kind only; ``SPECS``, ``ALLOWED_TAGS``).

Names resolve lazily: ``fleet --help`` does not import torch.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "publication_gate": "fleet.divergence.monitor",
    "scan_after_training": "fleet.divergence.monitor",
    "scan": "fleet.divergence.monitor",
    "score_and_act": "fleet.divergence.monitor",
    "unfreeze": "fleet.divergence.monitor",
    "ScanResult": "fleet.divergence.monitor",
    "submit_watch": "fleet.divergence.watch",
    "watch_loop": "fleet.divergence.watch",
    "build_report": "fleet.divergence.report",
    "plot_report": "fleet.divergence.report",
    "render_report": "fleet.divergence.report",
    "ProbeSet": "fleet.divergence.probes",
    "FunctionScorer": "fleet.divergence.scoring",
    "ScoreItem": "fleet.divergence.scoring",
    "VersionScore": "fleet.divergence.scoring",
    "DriftMetrics": "fleet.divergence.policy",
    "DriftSample": "fleet.divergence.policy",
    "Decision": "fleet.divergence.policy",
    "DriftPolicy": "fleet.divergence.policy",
    "decide": "fleet.divergence.policy",
    "gate": "fleet.divergence.policy",
    "population_stats": "fleet.divergence.policy",
    "ensure_probe_set": "fleet.divergence.probes:ensure",
    "follow": "fleet.divergence.watch",
    "local_cluster": "fleet.divergence.watch",
}

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
