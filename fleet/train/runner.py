"""Training packs of a cycle: ``PackOrder`` (what a cycle stores and trains), level stages, live\nprogress, a summary."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from fleet.errors import ValidationError
from fleet.train.launch import Gate, PackOutcome, run_packs
from fleet.train.pack import PackSpec, build_pack
from fleet.types import TIERS, level_of


@dataclass(frozen=True)
class PackOrder:
    """One pack to train, as a cycle stores it and ``train_packs`` takes it: a pack of the
    scheduler's plan, or models an operator named (``fleet train``)."""

    members: tuple[str, ...]
    token_budgets: tuple[int, ...] | None = None
    slice_profile: str | None = None
    resources: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.token_budgets is not None and len(self.token_budgets) != len(self.members):
            raise ValidationError(
                f"a pack of {len(self.members)} members has {len(self.token_budgets)} token budgets"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "members": list(self.members),
            "token_budgets": None if self.token_budgets is None else list(self.token_budgets),
            "slice_profile": self.slice_profile,
            "resources": dict(self.resources),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "pack") -> PackOrder:
        members = d.get("members") if isinstance(d, Mapping) else None
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ValidationError(f"{where}: 'members' must be a list of model ids")
        budgets = d.get("token_budgets")
        try:
            return cls(
                tuple(members),
                None if budgets is None else tuple(int(b) for b in budgets),
                None if d.get("slice_profile") is None else str(d["slice_profile"]),
                {str(k): float(v) for k, v in dict(d.get("resources") or {}).items()},
            )
        except (TypeError, ValueError) as exc:
            raise ValidationError(f"{where}: {exc}") from None


def packs_of_models(cfg, model_ids: Sequence[str]) -> list[PackOrder]:
    """``fleet train`` with model ids: packs of at most ``scheduler.max_pack_members``, in order."""
    size = cfg.scheduler.max_pack_members
    return [PackOrder(tuple(model_ids[i : i + size])) for i in range(0, len(model_ids), size)]


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


def stages(packs: Sequence[PackOrder]) -> list[list[PackOrder]]:
    """Each pack split by level into companies, then teams, then individuals.

    A child adapter learns on top of its ancestors' active adapters; an ancestor trained in the
    same cycle must therefore be published before its descendants train, or they would be served
    on top of an ancestor they never saw.
    """
    out: list[list[PackOrder]] = [[], [], []]
    for p in packs:
        by_level: dict[int, list[int]] = {}
        for i, m in enumerate(p.members):
            by_level.setdefault(TIERS.index(level_of(m).value), []).append(i)
        for level, idx in sorted(by_level.items()):
            out[level].append(
                replace(
                    p,
                    members=tuple(p.members[i] for i in idx),
                    token_budgets=tuple(p.token_budgets[i] for i in idx) if p.token_budgets else None,
                )
            )
    return [s for s in out if s]


def train_packs(
    fl, packs: Sequence[PackOrder], *, cycle_id: int, steps=None, console=None, gates: Sequence[Gate] = ()
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
                        list(p.members),
                        cycle_id=cycle_id,
                        index=n,
                        token_budgets=list(p.token_budgets) if p.token_budgets else None,
                        slice_profile=p.slice_profile,
                        resources=dict(p.resources) or None,
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
