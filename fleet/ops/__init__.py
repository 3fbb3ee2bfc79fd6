"""fleet.ops: where the subsystems meet. A cycle reads the scheduler's plan, runs training,
gates and publishes, scores drift and records usage, all through the registry.

- ``cycle_once`` (``fleet cycle``), ``train_once`` (``fleet train``), ``run_loop`` (``fleet run``:
  cycles as Ray jobs), ``read_plan_file``; everything else of a cycle is in ``fleet.ops.cycle``;
- ``evaluate`` / ``read_facts`` / ``write_facts`` (``fleet eval``);
- ``run_sweep`` (``fleet sweep``: Ray Tune over a tier's learning schedule);
- ``build_dashboard`` (``fleet monitoring``: Grafana over fleet's Ray metrics).

Names resolve lazily: ``import fleet.ops`` does not load torch or Ray.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "cycle_once": "fleet.ops.cycle",
    "train_once": "fleet.ops.cycle",
    "run_loop": "fleet.ops.cycle",
    "read_plan_file": "fleet.ops.cycle",
    "CycleOutcome": "fleet.ops.cycle",
    "evaluate": "fleet.ops.evaluate",
    "read_facts": "fleet.ops.evaluate",
    "write_facts": "fleet.ops.evaluate",
    "run_sweep": "fleet.ops.sweep",
    "SweepResult": "fleet.ops.sweep",
    "build_dashboard": "fleet.ops.dashboard",
    "render_eval": "fleet.ops.evaluate:render",
    "render_sweep": "fleet.ops.sweep:render",
    "dashboard_json": "fleet.ops.dashboard:render_json",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
