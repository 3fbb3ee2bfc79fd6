"""``fleet drift scan|watch|report``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    drift = typer.Typer(help="Measure and act on how far models drift.", no_args_is_help=True)

    @drift.command()
    def scan(models: list[str] = typer.Option(None, "--models")) -> None:
        """Score versions not yet scored."""
        common.not_built("fleet drift scan")

    @drift.command()
    def watch(every: str = typer.Option("10m", "--every")) -> None:
        """Scan periodically as a Ray job."""
        common.not_built("fleet drift watch")

    @drift.command()
    def report(
        json_out: bool = typer.Option(False, "--json"),
        plot: str = typer.Option(None, "--plot"),
    ) -> None:
        """Per-tier distributions, worst offenders, recent actions."""
        common.not_built("fleet drift report")

    app.add_typer(drift, name="drift")
