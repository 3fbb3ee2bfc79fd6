"""``fleet schedule``, ``fleet cycle``, ``fleet simulate``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    @app.command()
    def schedule(json_out: bool = typer.Option(False, "--json", help="Print the plan as JSON.")) -> None:
        """Plan which models train next and pack them onto slices."""
        common.not_built("fleet schedule")

    @app.command()
    def cycle() -> None:
        """Schedule, train the packs, record usage: one cycle."""
        common.not_built("fleet cycle")

    @app.command()
    def simulate(
        models: int = typer.Option(10_000, "--models"),
        slices: int = typer.Option(64, "--slices"),
        hours: float = typer.Option(24.0, "--hours"),
        policy: str = typer.Option("fleet", "--policy", help="fleet, fifo or round-robin."),
        json_out: bool = typer.Option(False, "--json"),
        plot: str = typer.Option(None, "--plot", help="Write a PNG of freshness and utilization."),
    ) -> None:
        """Replay the scheduling policy over a synthetic fleet."""
        common.not_built("fleet simulate")
