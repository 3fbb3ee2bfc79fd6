"""``fleet train``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        model_ids: list[str] = typer.Argument(None, help="Models to train (packed together)."),
        pack_file: str = typer.Option(None, "--pack-file", help="A plan from `fleet schedule --json`."),
        steps: int = typer.Option(None, "--steps", help="Override every member's schedule length."),
        json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
    ) -> None:
        """Train packs of models on Ray Train (one run per pack, packs run concurrently)."""
        from fleet.context import Fleet
        from fleet.errors import ValidationError
        from fleet.train.runner import train_models, train_plan_file

        if bool(model_ids) == bool(pack_file):
            raise ValidationError("name the models to train, or give --pack-file (not both)")
        fl = Fleet(common.config())
        console = None if json_out else common.console
        if pack_file:
            outcomes = train_plan_file(fl, pack_file, steps=steps, console=console)
        else:
            outcomes = train_models(fl, list(model_ids), steps=steps, console=console)
        if json_out:
            from dataclasses import asdict

            common.print_json([{**asdict(o), "status": o.status.value} for o in outcomes])
        failed = [o for o in outcomes if o.error]
        if failed:
            raise typer.Exit(3)
