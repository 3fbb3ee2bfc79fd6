"""``fleet train``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    @app.command()
    def train(
        model_ids: list[str] = typer.Argument(None, help="Models to train as one pack."),
        pack_file: str = typer.Option(None, "--pack-file", help="A plan from `fleet schedule --json`."),
    ) -> None:
        """Train packs of models on Ray Train (one run per pack)."""
        common.not_built("fleet train")
