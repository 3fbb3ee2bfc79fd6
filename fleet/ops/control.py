"""The control loop as operators run it: ``fleet cycle`` (one cycle here) and ``fleet run``
(cycles as Ray jobs, on a timer). Drift joins here: candidates pass the divergence gate before
publication, and newly published versions are scored and acted on after training."""

from __future__ import annotations

import time

from rich.console import Console

from fleet.ops.cycle import CycleOutcome, execute_cycle, open_cycle, run_cycle


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
    fl, packs: list[dict], *, steps: int | None = None, console: Console | None = None
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
    from fleet.ops.cycle import submit_cycle

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
