"""``fleet run``, ``fleet sweep``, ``fleet eval``: the control loop and its proof."""

from __future__ import annotations

import typer

from fleet.cli import _common as common

app = typer.Typer()


@app.command()
def run(
    every: str = typer.Option(None, "--every", help="Run a cycle every interval (90s, 10m, 1h)."),
    once: bool = typer.Option(False, "--once", help="Run one cycle and exit."),
    steps: int = typer.Option(None, "--steps", help="Override every member's schedule length."),
) -> None:
    """The control loop: each cycle planned here and trained as the Ray job fleet-cycle-<n>."""
    from fleet.errors import ValidationError
    from fleet.handles import Fleet
    from fleet.ops import run_loop

    if not once and not every:
        raise ValidationError("give --once, or --every INTERVAL (e.g. --every 10m)")
    every_s = common.parse_interval(every) if every else None
    results = run_loop(
        Fleet(common.config()),
        every_s=every_s,
        once=once,
        steps=steps,
        config_path=common._state["config_path"],
        console=common.console,
    )
    if any(r["status"] != "SUCCEEDED" for r in results):
        raise typer.Exit(3)


@app.command()
def sweep(
    tier: str = typer.Option(..., "--tier", help="company, team or individual."),
    samples: int = typer.Option(4, "--samples", help="Trials."),
    models: int = typer.Option(4, "--models", help="Models of the tier each trial trains."),
    apply: bool = typer.Option(False, "--apply", help="Store the winner as the tier's schedule."),
    steps: int = typer.Option(None, "--steps", help="Steps per trial (default: the tier's schedule)."),
    plot: str = typer.Option(None, "--plot", help="Write a PNG of the trials."),
    json_out: bool = typer.Option(False, "--json"),
) -> None:
    """Ray Tune sweep over a tier's learning schedule (ASHA stops bad trials early)."""
    from fleet.handles import Fleet
    from fleet.ops import run_sweep

    fl = Fleet(common.config())
    res = run_sweep(
        fl,
        tier=tier,
        samples=samples,
        models=models,
        apply=apply,
        steps=steps,
        plot=plot or str(fl.cfg.data_path / f"sweep-{tier}.png"),
        console=None if json_out else common.console,
    )
    if json_out:
        from dataclasses import asdict

        common.print_json(asdict(res))


@app.command("eval")
def eval_(
    models: int = typer.Option(20, "--models", help="Models to ask, sampled among the facts' models."),
    facts: str = typer.Option(None, "--facts", help="Facts file (default: the demo's)."),
    json_out: bool = typer.Option(False, "--json"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Recall from held-out questions alone against the base, BM25 and whole-context baselines;
    prompt tokens, forgetting, leakage and memory."""
    from fleet.handles import Fleet
    from fleet.ops import evaluate, read_facts, render_eval

    fl = Fleet(common.config())
    path = facts or str(fl.cfg.data_path / "demo" / "facts.jsonl")
    say = None if json_out else (lambda msg: common.console.print(f"[dim]{msg}[/]"))
    res = evaluate(fl, read_facts(path), models=models, seed=seed, progress=say)
    if json_out:
        common.print_json(res)
    else:
        render_eval(res, common.console)


monitoring = typer.Typer(help="Operators' dashboards for fleet's Ray metrics.", no_args_is_help=True)


@monitoring.command("dashboard")
def dashboard(out: str = typer.Option("-", "--out", help="File to write (default: stdout).")) -> None:
    """The Grafana dashboard JSON for fleet's metrics (import it beside Ray's dashboards)."""
    from pathlib import Path

    from fleet.ops import dashboard_json

    text = dashboard_json()
    if out == "-":
        print(text, end="")
    else:
        Path(out).write_text(text)
        common.console.print(f"wrote {out}")


app.add_typer(monitoring, name="monitoring")
