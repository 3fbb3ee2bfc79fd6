"""Training as an operator starts it: packs from model ids or a plan file, live progress, a summary."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fleet.errors import ValidationError
from fleet.train.launch import Gate, PackOutcome, run_packs
from fleet.train.pack import PackSpec, build_pack
from fleet.types import TIERS, level_of


def packs_of_models(cfg, model_ids: Sequence[str]) -> list[dict]:
    """``fleet train`` with model ids: packs of at most ``scheduler.max_pack_members``, in order."""
    size = cfg.scheduler.max_pack_members
    return [{"members": list(model_ids[i : i + size])} for i in range(0, len(model_ids), size)]


def read_plan_file(path: str | Path) -> list[dict]:
    """The packs of a plan written by ``fleet schedule --json``."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValidationError(f"{p}: no such plan file") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(f"{p}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    packs = doc.get("packs") if isinstance(doc, dict) else None
    if not isinstance(packs, list) or not all(
        isinstance(pk, dict) and isinstance(pk.get("members"), list) for pk in packs
    ):
        raise ValidationError(f"{p}: not a fleet plan (expected an object with a 'packs' list of members)")
    return packs


@contextmanager
def heartbeat(reg, cycle_id: int, every_s: float) -> Iterator[None]:
    """Record the cycle's heartbeat every ``every_s`` while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            try:
                reg.beat_cycle(cycle_id)
            except Exception:  # noqa: BLE001 - a missed beat is retried; the cycle goes on
                import logging

                logging.getLogger(__name__).warning("cycle %s: heartbeat failed", cycle_id, exc_info=True)

    reg.beat_cycle(cycle_id)
    thread = threading.Thread(target=beat, name=f"fleet-cycle-{cycle_id}-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def stages(packs: list[dict]) -> list[list[dict]]:
    """Each pack split by level into companies, then teams, then individuals.

    A child adapter learns on top of its ancestors' active adapters; an ancestor trained in the
    same cycle must therefore be published before its descendants train, or they would be served
    on top of an ancestor they never saw.
    """
    out: list[list[dict]] = [[], [], []]
    for p in packs:
        members = list(p.get("members") or [])
        budgets = p.get("token_budgets")
        by_level: dict[int, list[int]] = {}
        for i, m in enumerate(members):
            by_level.setdefault(TIERS.index(level_of(m).value), []).append(i)
        for level, idx in sorted(by_level.items()):
            out[level].append(
                {
                    **p,
                    "members": [members[i] for i in idx],
                    "token_budgets": [budgets[i] for i in idx] if budgets else None,
                }
            )
    return [s for s in out if s]


def train_packs(
    fl, packs: list[dict], *, cycle_id: int, steps=None, console=None, gates: Sequence[Gate] = ()
) -> tuple[list[PackOutcome], list[PackSpec]]:
    """Train a plan's packs in level stages (companies, teams, individuals), packs of a stage
    concurrently. Every pack of the first stage is checked before anything runs; later stages are
    built when they start, on top of the versions the stages before them published."""
    outcomes: list[PackOutcome] = []
    specs: list[PackSpec] = []
    n = 0
    for k, stage in enumerate(stages(packs)):
        built = []
        for p in stage:
            try:
                built.append(
                    build_pack(
                        fl,
                        list(p["members"]),
                        cycle_id=cycle_id,
                        index=n,
                        token_budgets=p.get("token_budgets"),
                        slice_profile=p.get("slice_profile"),
                        resources=p.get("resources"),
                        steps=steps,
                    )
                )
            except ValidationError:
                if k == 0:
                    raise
                # A member may have been frozen by the monitor or trained meanwhile: skip the pack.
                continue
            n += 1
        if built:
            specs += built
            outcomes += _run_with_progress(fl, built, console, gates)
    return outcomes, specs


def summary_of(outcomes: Sequence[PackOutcome], **extra) -> dict:
    return {
        "packs": len(outcomes),
        "trained": sum(len(o.members) for o in outcomes),
        "published": sum(o.published for o in outcomes),
        "rejected": sum(o.rejected for o in outcomes),
        "failed_packs": sum(1 for o in outcomes if o.error),
        **extra,
    }


def _run_with_progress(fl, specs: list[PackSpec], console: Console | None, gates) -> list[PackOutcome]:
    if console is None:
        return run_packs(fl, specs, gates=gates)
    cols = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=console, transient=False) as prog:
        tasks = {
            s.name: prog.add_task(f"{s.name} ({len(s.members)} models)", total=s.steps, info="starting")
            for s in specs
        }

        def show(board: dict[str, dict]) -> None:
            for name, st in board.items():
                if name in tasks and "step" in st:
                    prog.update(
                        tasks[name], completed=st["step"], info=f"loss {st.get('loss', float('nan')):.3f}"
                    )
                elif name in tasks:
                    prog.update(tasks[name], info=st.get("phase", "starting"))

        outcomes = run_packs(fl, specs, gates=gates, on_progress=show)
        for o in outcomes:
            prog.update(
                tasks[o.name],
                completed=o.steps if not o.error else prog.tasks[tasks[o.name]].completed,
                info="failed" if o.error else "done",
            )
    return outcomes


def render_outcomes(outcomes: Sequence[PackOutcome], console: Console) -> None:
    t = Table(title="training runs")
    for col in (
        "run",
        "members",
        "steps",
        "tokens",
        "held-out before → after",
        "published",
        "rejected",
        "time",
    ):
        t.add_column(col, justify="left" if col == "run" else "right")
    for o in outcomes:
        if o.error:
            failed = Text(f"failed: {o.error}", style="red")
            t.add_row(o.name, "-", "-", "-", failed, "0", "0", f"{o.seconds:.0f}s")
            continue
        ms = [m.metrics for m in o.members]
        before = sum(m["heldout_before"] for m in ms) / len(ms)
        after = sum(m["heldout_after"] for m in ms) / len(ms)
        t.add_row(
            o.name,
            str(len(o.members)),
            str(o.steps),
            f"{sum(m['tokens'] for m in ms):,}",
            f"{before:.3f} → {after:.3f}",
            str(o.published),
            str(o.rejected),
            f"{o.seconds:.0f}s",
        )
    console.print(t)
    rejected = [(m.model_id, m.reason) for o in outcomes for m in o.members if not m.published]
    for mid, why in rejected[:10]:
        console.print(f"  rejected {mid}: {why}")
