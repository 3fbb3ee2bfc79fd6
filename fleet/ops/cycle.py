"""The control loop's one home: every cycle, whatever starts it, is open → plan → execute
(packed Ray Train runs) → gates → publish → usage → drift → close, with a heartbeat.

- ``fleet cycle``: ``cycle_once`` (plans now, or executes a prepared cycle: what a cycle job runs);
- ``fleet train``: ``train_once``, the same path with the packs an operator named;
- ``fleet run``: ``run_loop``, which plans each cycle here (``prepare_cycle``), submits its
  execution as the Ray job ``fleet-cycle-<n>`` (``submit_cycle``), follows it, and closes cycles
  whose job ended without recording it (``reap_ended_cycles``).

Drift joins through ``drift_hooks``: candidates pass the divergence gate before publication,
and newly published versions are scored and acted on after training.

A cycle is safe to kill at any point: publication is one registry transaction per pack,
so nothing is ever half-published, and whatever a killed cycle did not publish is still
pending for the next one, which plans it again. A running cycle records a heartbeat every
``scheduler.cycle_heartbeat_s``; one silent for four beats (its process was killed) is marked
``interrupted`` when the next one starts, and no cycle starts while another is alive.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from fleet.errors import ConflictError, ValidationError
from fleet.train.runner import PackOrder
from fleet.types import RunStatus


@dataclass
class CycleOutcome:
    cycle_id: int
    seconds: float
    summary: dict[str, Any]
    plan: Any = None
    packs: list[Any] = field(default_factory=list)


def _close_interrupted(fl) -> None:
    """Mark cycles (and their pack runs) whose process ended mid-way as failed; what they left
    pending is planned again, and nothing they did not publish was published. A cycle that is
    still alive stops a new one from starting: two would train the same pending data."""
    reg = fl.registry
    stale_s = 4 * fl.cfg.scheduler.cycle_heartbeat_s
    for c in reg.list_cycles(limit=20):
        if c["status"] == RunStatus.RUNNING.value:
            silent = reg.now() - (c.get("heartbeat_at") or c["started_at"])
            if silent < stale_s:
                raise ConflictError(
                    f"cycle {c['id']} is still running (alive {silent:.0f} s ago): wait for it to end, "
                    f"or stop it (a cycle's job: `ray job stop fleet-cycle-{c['id']}`) and retry"
                )
            mark_interrupted(reg, c)
        else:
            _close_runs(reg, c["id"])  # a cycle that recorded its own end before its runs'


def mark_interrupted(reg, cycle: dict[str, Any]) -> None:
    """Close a cycle whose process is gone, and its pack runs."""
    reg.finish_cycle(cycle["id"], RunStatus.FAILED, {**(cycle["summary"] or {}), "interrupted": True})
    _close_runs(reg, cycle["id"])


def _close_runs(reg, cycle_id: int) -> None:
    for run in reg.list_runs(cycle_id=cycle_id):
        if run.status == RunStatus.RUNNING.value:
            reg.finish_run(run.id, RunStatus.FAILED, error="interrupted: its cycle's job ended first")


def plan_cycle(fl, *, now: float | None = None, inventory=None):
    """The scheduler's plan for this moment, and the aging counters it implies (persisted)."""
    from fleet.scheduler import advance_waiting, load_demand, plan_for

    cfg = fl.cfg
    now = time.time() if now is None else now
    demand = load_demand(cfg, fl.registry, now=now)
    result = plan_for(cfg, demand, inventory=inventory, now=now)
    _telemetry(lambda t: (t.record_plan(demand, result), t.record_fairness(fl.registry, cfg, now)))
    if result.arrays is not None and demand.n_models:
        new = advance_waiting(demand.waiting_cycles, result.arrays.reason)
        changed = (new != demand.waiting_cycles).nonzero()[0]
        fl.registry.set_waiting_cycles({demand.ids([i])[0]: int(new[i]) for i in changed.tolist()})
    return result


def record_usage(fl, outcomes: Sequence[Any], packs: Sequence[Any], now: float) -> float:
    """GPU-seconds (full-H100 equivalents) each company and model used, split by tokens trained."""
    from fleet.scheduler.inventory import slice_type

    cfg = fl.cfg
    by_company: dict[tuple[str, str], float] = {}
    by_model: dict[str, float] = {}
    spec_of = {p.name: p for p in packs}
    total = 0.0
    for o in outcomes:
        if o.error or not o.members:
            continue
        pack = spec_of[o.name]
        speed = slice_type(pack.slice_profile).speed if pack.slice_profile else slice_type("cpu").speed
        gpu_s = o.seconds * speed
        total += gpu_s
        tokens = sum(max(1, m.metrics.get("tokens", 0)) for m in o.members)
        for m in o.members:
            share = gpu_s * max(1, m.metrics.get("tokens", 0)) / tokens
            by_model[m.model_id] = by_model.get(m.model_id, 0.0) + share
            key = (m.model_id.split("/")[0], m.tier)
            by_company[key] = by_company.get(key, 0.0) + share
    fl.registry.record_usage(
        [
            {"company_id": c, "tier": t, "gpu_seconds": s, "recorded_at": now}
            for (c, t), s in by_company.items()
        ]
    )
    fl.registry.record_model_usage(by_model, now=now, half_life_s=cfg.scheduler.usage_half_life_s)
    by_tier: dict[str, float] = {}
    for (_, tier), s in by_company.items():
        by_tier[tier] = by_tier.get(tier, 0.0) + s
    _telemetry(lambda t: t.record_training(outcomes, by_tier))
    return total


def _telemetry(fn) -> None:
    """Metrics go to Ray's exporter when this process is connected to Ray; never fail a cycle."""
    import ray

    if not ray.is_initialized():
        return
    from fleet.ops import telemetry

    try:
        fn(telemetry)
    except Exception:  # noqa: BLE001 - metrics are best effort
        import logging

        logging.getLogger(__name__).warning("could not record metrics", exc_info=True)


def _register(fl, kind: str) -> int:
    """A new running cycle, unless another is alive (two would train the same pending data)."""
    reg = fl.registry
    _close_interrupted(fl)
    cycle_id = reg.start_cycle()
    # Two processes may both have found no live cycle: the older cycle goes on, this one yields.
    first = [
        c["id"] for c in reg.list_cycles(limit=20) if c["id"] < cycle_id and c["status"] == RunStatus.RUNNING
    ]
    if first:
        reg.finish_cycle(
            cycle_id, RunStatus.FAILED, {"kind": kind, "error": f"cycle {first[-1]} started first"}
        )
        raise ConflictError(f"cycle {first[-1]} started at the same time and goes on; this one stopped")
    return cycle_id


def orders_of(plan) -> list[PackOrder]:
    """The packs of a scheduler ``Plan`` as training orders."""
    return [
        PackOrder(tuple(p.members), tuple(p.token_budgets), p.slice_profile, dict(p.resources))
        for p in plan.packs
    ]


def stored_orders(stored: dict[str, Any]) -> list[PackOrder]:
    """The packs of a plan a cycle stored: a scheduler plan (``Plan.from_dict``), or the
    ``{"packs": [order, ...]}`` of a ``fleet train`` cycle."""
    from fleet.scheduler import Plan

    if "format" in stored:
        return orders_of(Plan.from_dict(stored))
    return [PackOrder.from_dict(p, f"stored pack {i}") for i, p in enumerate(stored.get("packs") or [])]


def read_plan_file(path: str | Path) -> list[PackOrder]:
    """The packs of a plan written by ``fleet schedule --json`` (``fleet train --pack-file``)."""
    from fleet.scheduler import Plan

    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ValidationError(f"{p}: no such plan file") from None
    except OSError as exc:
        raise ValidationError(f"{p}: cannot be read ({exc.strerror})") from None
    try:
        return orders_of(Plan.from_json(text))
    except ValidationError as exc:
        raise ValidationError(f"{p}: {exc.message}") from None


def open_cycle(fl, packs: Sequence[PackOrder], *, kind: str = "train") -> int:
    """A cycle over packs an operator named (``fleet train``) instead of planned ones: registered
    like any cycle, with the packs stored as its plan, so that :func:`execute_cycle` gates,
    publishes, scores and accounts for them exactly as it does for a planned cycle."""
    cycle_id = _register(fl, kind)
    scheduled = sum(len(p.members) for p in packs)
    plan = {"packs": [p.to_dict() for p in packs]}
    fl.registry.update_cycle(cycle_id, {"kind": kind, "scheduled": scheduled, "plan": plan})
    return cycle_id


def prepare_cycle(fl, *, now: float | None = None, inventory=None) -> tuple[int, Any]:
    """Open a cycle and store its plan in the registry (what its Ray job will train)."""
    reg = fl.registry
    now = time.time() if now is None else now
    cycle_id = _register(fl, "cycle")
    try:
        result = plan_cycle(fl, now=now, inventory=inventory)
    except BaseException as exc:
        reg.finish_cycle(cycle_id, RunStatus.FAILED, {"kind": "cycle", "error": str(exc)[:500]})
        raise
    counts = result.reason_counts()
    reg.update_cycle(
        cycle_id,
        {
            "kind": "cycle",
            "scheduled": sum(len(p.members) for p in result.packs),
            "reasons": {k: v for k, v in counts.items() if v},
            "plan": result.to_dict(include_unscheduled=False),
        },
    )
    return cycle_id, result


def execute_cycle(
    fl,
    cycle_id: int,
    *,
    console: Console | None = None,
    steps: int | None = None,
    gates: Sequence[Any] = (),
    after_training=None,
) -> CycleOutcome:
    """Train a prepared cycle's packs, record usage, let ``after_training(fl, cycle_id, outcomes)``
    score drift and act on it (its counts join the cycle's summary), and close the cycle."""
    from fleet.train.runner import heartbeat, render_outcomes, summary_of, train_packs

    reg = fl.registry
    row = reg.get_cycle(cycle_id)
    summary: dict[str, Any] = dict(row["summary"] or {})
    plan = summary.get("plan")
    if plan is None:
        raise ValidationError(
            f"cycle {cycle_id} has no stored plan; start cycles with `fleet run` or `fleet cycle`"
        )
    t0 = row["started_at"]
    with heartbeat(reg, cycle_id, fl.cfg.scheduler.cycle_heartbeat_s):
        try:
            packs_in = stored_orders(plan)
            outcomes, specs = (
                train_packs(fl, packs_in, cycle_id=cycle_id, steps=steps, console=console, gates=gates)
                if packs_in
                else ([], [])
            )
            summary.update(summary_of(outcomes))
            summary["gpu_s"] = round(record_usage(fl, outcomes, specs, time.time()), 3)
            if after_training is not None:
                summary.update(after_training(fl, cycle_id, outcomes) or {})
            summary.setdefault("rolled_back", 0)
            status = RunStatus.FAILED if summary.get("failed_packs") else RunStatus.SUCCEEDED
            if console is not None and outcomes:
                render_outcomes(outcomes, console)
        except BaseException as exc:
            why = {"error": str(exc)[:500] or type(exc).__name__}
            if not isinstance(exc, Exception):  # stopped (a signal, Ctrl-C): what is pending stays so
                why["interrupted"] = True
            reg.finish_cycle(cycle_id, RunStatus.FAILED, {**summary, **why})
            raise
    seconds = time.time() - t0
    summary["seconds"] = round(seconds, 2)
    reg.finish_cycle(cycle_id, status, summary)
    _telemetry(lambda t: t.record_cycle(status.value, seconds, summary))
    return CycleOutcome(cycle_id, seconds, summary, plan, outcomes)


def run_cycle(
    fl,
    *,
    console: Console | None = None,
    steps: int | None = None,
    gates: Sequence[Any] = (),
    after_training=None,
    inventory=None,
) -> CycleOutcome:
    """A whole cycle in this process: prepare (plan) then execute (train, usage, drift)."""
    cycle_id, result = prepare_cycle(fl, inventory=inventory)
    if console is not None:
        from fleet.scheduler.render import print_plan

        print_plan(result, None, console)
    return execute_cycle(
        fl, cycle_id, console=console, steps=steps, gates=gates, after_training=after_training
    )


# ------------------------------------------------------------- cycles as Ray jobs
def reap_ended_cycles(fl, client) -> list[int]:
    """Close running cycles whose job has already ended (stopped, killed) without recording it,
    so that the next cycle need not wait for their heartbeat to go stale."""
    from fleet._ray import TERMINAL, job_status

    closed = []
    for c in fl.registry.list_cycles(limit=20):
        if RunStatus(c["status"]).is_terminal:
            continue
        try:
            status = job_status(client, f"fleet-cycle-{c['id']}")
        except Exception:  # noqa: BLE001 - not a job (an in-process cycle), or not submitted yet
            continue
        if status in TERMINAL:
            mark_interrupted(fl.registry, c)
            closed.append(c["id"])
    return closed


def submit_cycle(fl, client, *, config_path: str | None, steps: int | None = None) -> tuple[int, str, dict]:
    """Plan a cycle here, then submit its execution as the job ``fleet-cycle-<n>``."""
    from fleet._ray import submit_job

    reap_ended_cycles(fl, client)
    cycle_id, result = prepare_cycle(fl)
    packs = result.packs
    members = sum(len(p.members) for p in packs)
    name = f"fleet-cycle-{cycle_id}"
    args = ["cycle", "--cycle-id", str(cycle_id)] + (["--steps", str(steps)] if steps else [])
    meta = {"cycle_id": cycle_id, "packs": len(packs), "models": members, "fleet": "cycle"}
    try:
        submit_job(client, fl.cfg, name=name, args=args, metadata=meta, config_path=config_path)
    except Exception as exc:
        # Nothing will run it: close the cycle now rather than leave it "running" until it goes stale.
        summary = {**(fl.registry.get_cycle(cycle_id)["summary"] or {}), "error": f"not submitted: {exc}"}
        fl.registry.finish_cycle(cycle_id, RunStatus.FAILED, summary)
        raise
    return cycle_id, name, meta


# ------------------------------------------------------------------ entry points
def drift_hooks(fl):
    """The divergence monitor's gate (publication) and scan (after training)."""
    from fleet.divergence.monitor import publication_gate, scan_after_training

    return [publication_gate(fl)], scan_after_training


def cycle_once(
    fl, *, cycle_id: int | None = None, steps: int | None = None, console: Console | None = None
) -> CycleOutcome:
    gates, after = drift_hooks(fl)
    if cycle_id is not None:
        return execute_cycle(fl, cycle_id, console=console, steps=steps, gates=gates, after_training=after)
    return run_cycle(fl, console=console, steps=steps, gates=gates, after_training=after)


def train_once(
    fl, packs: Sequence[PackOrder], *, steps: int | None = None, console: Console | None = None
) -> CycleOutcome:
    """``fleet train``: packs an operator named, through a cycle's own path (held-out and divergence
    gates before publication, drift scan and usage accounting after), one cycle at a time."""
    gates, after = drift_hooks(fl)
    cycle_id = open_cycle(fl, packs, kind="train")
    return execute_cycle(fl, cycle_id, console=console, steps=steps, gates=gates, after_training=after)


def run_loop(
    fl,
    *,
    every_s: float | None,
    once: bool,
    config_path: str | None,
    steps: int | None = None,
    console: Console,
    max_cycles: int | None = None,
) -> list[dict]:
    """Plan and submit each cycle as the Ray job ``fleet-cycle-<n>``, wait for it, repeat."""
    from fleet._ray import ensure_ray, job_client

    url = ensure_ray(fl.cfg, dashboard=True)
    if url:
        console.print(f"Ray dashboard: {url}  (jobs fleet-cycle-<n>, Train runs pack-<n>-<k>)")
    client = job_client(fl.cfg, url)
    done: list[dict] = []
    while True:
        t0 = time.time()
        cycle_id, name, meta = submit_cycle(fl, client, config_path=config_path, steps=steps)
        console.print(f"submitted {name}: {meta['packs']} packs, {meta['models']} models")
        status = _follow_cycle(fl, client, cycle_id, name, meta, console)
        row = fl.registry.get_cycle(cycle_id)
        s = row["summary"] or {}
        console.print(
            f"{name} {status.lower()}: {s.get('published', 0)} published, {s.get('rejected', 0)} rejected, "
            f"{s.get('rolled_back', 0)} rolled back, {time.time() - t0:.0f} s"
        )
        if status != "SUCCEEDED":
            logs = client.get_job_logs(name)
            from rich.text import Text

            tail = "\n".join(logs.splitlines()[-15:])
            console.print(Text.assemble((f"{name} failed", "red"), "; last log lines:\n", tail))
        done.append(
            {
                "cycle_id": cycle_id,
                "job": name,
                "status": status,
                **{k: s.get(k) for k in ("packs", "published", "rejected", "rolled_back")},
            }
        )
        if once or not every_s or (max_cycles and len(done) >= max_cycles):
            return done
        time.sleep(max(0.0, every_s - (time.time() - t0)))


def _follow_cycle(fl, client, cycle_id: int, name: str, meta: dict, console: Console) -> str:
    """Wait for the cycle's job, with a progress bar of its models whose pack run has finished
    (read from the registry, where the job records its runs)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from fleet._ray import wait_job

    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as prog:
        task = prog.add_task(f"{name}: pending", total=max(1, int(meta.get("models") or 0)))

        def poll(status: str) -> None:
            runs = fl.registry.list_runs(cycle_id=cycle_id, limit=10_000)
            finished = [r for r in runs if r.finished_at]
            prog.update(
                task,
                completed=sum(len(r.members) for r in finished),
                description=f"{name}: {status.lower()}, pack runs {len(finished)} finished / {len(runs)} started",
            )

        status = wait_job(client, name, on_poll=poll)
        poll(status)
    return status
