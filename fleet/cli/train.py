"""``fleet train``."""

from __future__ import annotations

import typer

from fleet.cli import _common as common

app = typer.Typer()


@app.command()
def train(
    model_ids: list[str] = typer.Argument(None, help="Models to train (packed together)."),
    pack_file: str = typer.Option(None, "--pack-file", help="A plan from `fleet schedule --json`."),
    steps: int = typer.Option(None, "--steps", help="Override every member's schedule length."),
    json_out: bool = typer.Option(False, "--json", help="Print the outcome as JSON."),
) -> None:
    """Train packs of models on Ray Train (one run per pack, packs run concurrently), gated,
    published, scored for drift and accounted for exactly as in a cycle."""
    from fleet.errors import ValidationError
    from fleet.handles import Fleet
    from fleet.ops import read_plan_file, train_once
    from fleet.train import packs_of_models
    from fleet.types import validate_id

    if bool(model_ids) == bool(pack_file):
        raise ValidationError("name the models to train, or give --pack-file (not both)")
    for model_id in model_ids or []:
        validate_id(model_id)
    fl = Fleet(common.config())
    packs = read_plan_file(pack_file) if pack_file else packs_of_models(fl.cfg, list(model_ids))
    outcomes = train_once(fl, packs, steps=steps, console=None if json_out else common.console).packs
    if json_out:
        from dataclasses import asdict

        common.print_json([{**asdict(o), "status": o.status.value} for o in outcomes])
    failed = [o for o in outcomes if o.error]
    if failed:
        raise typer.Exit(3)
