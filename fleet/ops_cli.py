"""``fleet run``, ``fleet sweep``, ``fleet eval``: the control loop and its proof."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    @app.command()
    def run(
        every: str = typer.Option(None, "--every", help="Run a cycle every interval (10m, 1h)."),
        once: bool = typer.Option(False, "--once", help="Run one cycle and exit."),
    ) -> None:
        """The control loop: plan, train, score drift, promote, as Ray jobs."""
        common.not_built("fleet run")

    @app.command()
    def sweep(
        tier: str = typer.Option(..., "--tier"),
        samples: int = typer.Option(4, "--samples"),
        models: int = typer.Option(4, "--models"),
        apply: bool = typer.Option(False, "--apply"),
    ) -> None:
        """Ray Tune sweep over a tier's learning schedule."""
        common.not_built("fleet sweep")

    @app.command("eval")
    def eval_(
        models: int = typer.Option(20, "--models"),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Measure private-fact recall, tokens saved, leakage and forgetting."""
        common.not_built("fleet eval")
