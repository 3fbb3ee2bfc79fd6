"""``fleet adapters import|export`` and ``fleet generate``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    adapters = typer.Typer(help="Import and export adapters in PEFT's LoRA format.", no_args_is_help=True)

    @adapters.command("import")
    def import_(model_id: str, peft_dir: str) -> None:
        """Publish a PEFT LoRA directory as MODEL_ID's new active version."""
        common.not_built("fleet adapters import")

    @adapters.command("export")
    def export(
        model_id: str,
        out_dir: str,
        stack: bool = typer.Option(False, "--stack", help="Export company+team+individual as one LoRA."),
    ) -> None:
        """Write MODEL_ID's active adapter (or whole stack) as a PEFT directory."""
        common.not_built("fleet adapters export")

    app.add_typer(adapters, name="adapters")

    @app.command()
    def generate(
        model_id: str,
        prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
        max_tokens: int = typer.Option(32, "--max-tokens"),
        temperature: float = typer.Option(0.0, "--temperature"),
        logprobs: int = typer.Option(0, "--logprobs", help="Top-k alternatives per prompt token."),
        json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ) -> None:
        """Complete PROMPT with MODEL_ID's active stack through the serving engine."""
        common.not_built("fleet generate")
