"""fleet.train: packs of adapters fine-tuned together on one copy of the base, on Ray Train.

The contract (the control loop, ``fleet.ops.cycle``, is its caller)::

    orders = packs_of_models(cfg, model_ids)        # [PackOrder]: or a plan's packs
    outcomes, specs = train_packs(fl, orders, cycle_id=n, gates=[...])   # level stages, Ray Train
    summary_of(outcomes); render_outcomes(outcomes, console)
    heartbeat(registry, cycle_id, every_s)          # context manager

- ``PackOrder``: one pack to train (members, token budgets, slice, Ray resources); what a cycle
  stores as its plan;
- ``build_pack(fl, members, ...) -> PackSpec`` (members' schedules, data, ancestors), and
  ``run_packs(fl, specs, gates=...) -> [PackOutcome]`` (one Ray Train run per pack; a gate is
  ``gate(member, metrics, adapter) -> (publish?, reason)``; ``heldout_gate`` is always first);
- ``train_pack_loop``: the packed training step, without Ray (tests call it directly);
- ``ensure_forms``: the training forms of each item (written by the base, or by template).

Names resolve lazily: ``import fleet.train`` does not load torch or Ray.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "PackOrder": "fleet.train.runner",
    "packs_of_models": "fleet.train.runner",
    "train_packs": "fleet.train.runner",
    "summary_of": "fleet.train.runner",
    "render_outcomes": "fleet.train.runner",
    "heartbeat": "fleet.train.runner",
    "stages": "fleet.train.runner",
    "PackSpec": "fleet.train.pack",
    "MemberSpec": "fleet.train.pack",
    "build_pack": "fleet.train.pack",
    "PackOutcome": "fleet.train.launch",
    "MemberOutcome": "fleet.train.launch",
    "Gate": "fleet.train.launch",
    "heldout_gate": "fleet.train.launch",
    "run_packs": "fleet.train.launch",
    "resources_of": "fleet.train.pack",
    "train_pack_loop": "fleet.train.loop",
    "ensure_forms": "fleet.train.augment",
    "with_context": "fleet.train.augment",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
