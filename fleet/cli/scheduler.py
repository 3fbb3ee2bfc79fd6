"""``fleet schedule``, ``fleet cycle``, ``fleet simulate``."""

from __future__ import annotations

from typing import Any

import typer

from fleet.cli import _common as common

SIM_POLICIES = ("fleet", "fifo", "round-robin")


app = typer.Typer()


@app.command()
def schedule(
    json_out: bool = typer.Option(
        False, "--json", help="Print the plan as JSON (for `fleet train --pack-file`)."
    ),
) -> None:
    """Plan which models train next and pack them onto slices."""
    from fleet.scheduler import load_demand

    cfg = common.config()
    demand = load_demand(cfg)  # before touching Ray: without demand there is nothing to plan
    plan_and_show(cfg, demand, json_out=json_out)


@app.command()
def cycle(
    steps: int = typer.Option(None, "--steps", help="Override every member's schedule length."),
    cycle_id: int = typer.Option(
        None, "--cycle-id", help="Execute this prepared cycle (what a cycle job runs)."
    ),
) -> None:
    """Schedule, train the packs, score drift, record usage: one cycle, in this process."""
    from fleet.handles import Fleet
    from fleet.ops import cycle_once

    out = cycle_once(Fleet(common.config()), cycle_id=cycle_id, steps=steps, console=common.console)
    s = out.summary
    common.console.print(
        f"cycle {out.cycle_id}: {s.get('packs', 0)} packs, {s.get('trained', 0)} trained, "
        f"{s.get('published', 0)} published, {s.get('rejected', 0)} rejected, "
        f"{s.get('rolled_back', 0)} rolled back, {s.get('gpu_s', 0):.1f} GPU-s, {out.seconds:.0f} s"
    )
    if s.get("failed_packs"):
        raise typer.Exit(3)


@app.command()
def simulate(
    models: int = typer.Option(100_000, "--models", min=2, help="Models in the synthetic fleet."),
    slices: int = typer.Option(
        32, "--slices", min=1, help="Slices in the synthetic (mixed MIG/full) inventory."
    ),
    hours: float = typer.Option(24.0, "--hours", min=0.01, help="Simulated hours."),
    policy: str = typer.Option(
        "all", "--policy", help="fleet, fifo, round-robin, or all (fleet and both baselines)."
    ),
    load: float = typer.Option(
        1.3, "--load", min=0.01, help="Offered load: arriving tokens over training capacity."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic fleet and its data arrival."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of freshness and utilization over time."),
) -> None:
    """Replay the scheduling policy over a synthetic fleet."""
    run_simulation(
        models=models,
        slices=slices,
        hours=hours,
        policy=policy,
        load=load,
        seed=seed,
        json_out=json_out,
        plot=plot,
    )


def plan_and_show(
    cfg: Any, demand: Any, *, json_out: bool, inventory: Any = None, now: float | None = None
) -> Any:
    """Plan ``demand`` with the configured policy and print it (a table, or JSON)."""
    from fleet.scheduler import plan_for

    result = plan_for(cfg, demand, inventory=inventory, now=now)
    show_plan(result, demand, json_out=json_out)
    return result


def show_plan(result: Any, demand: Any = None, *, json_out: bool) -> None:
    if json_out:
        common.print_json(result.to_dict())
        return
    from fleet.scheduler import print_plan

    print_plan(result, demand, common.console)


def run_simulation(
    *,
    models: int,
    slices: int,
    hours: float,
    policy: str,
    load: float,
    seed: int,
    json_out: bool,
    plot: str | None,
) -> list[Any]:
    from fleet.errors import ValidationError
    from fleet.scheduler import PolicyConfig, SimConfig, plot_reports, simulate

    names = list(SIM_POLICIES) if policy == "all" else [policy]
    unknown = [n for n in names if n not in SIM_POLICIES]
    if unknown:
        raise ValidationError(f"unknown policy {unknown[0]!r}; use one of {', '.join(SIM_POLICIES)} or all")
    cfg = common.config()
    sim = SimConfig(
        models=models,
        slices=slices,
        hours=hours,
        load=load,
        seed=seed,
        policy=PolicyConfig.from_fleet_config(cfg),
    )
    reports = []
    for name in names:
        with common.err_console.status(f"simulating {name} …"):
            reports.append(simulate(sim, name))
    if plot:
        plot_reports(reports, plot)
    if json_out:
        common.print_json({"reports": [r.to_dict() for r in reports], "plot": plot})
    else:
        from fleet.scheduler import sim_table

        common.console.print(sim_table(reports))
        if plot:
            common.console.print(f"plot written to {plot}")
    return reports
