"""``fleet adapters import|export`` and ``fleet generate``."""

from __future__ import annotations

import typer

from fleet.cli import _common as common

app = typer.Typer()

adapters = typer.Typer(help="Import and export adapters in PEFT's LoRA format.", no_args_is_help=True)


@adapters.command("import")
def import_(model_id: str, peft_dir: str) -> None:
    """Publish a PEFT LoRA directory as MODEL_ID's new active version."""
    from fleet.handles import Fleet
    from fleet.lora import import_peft

    v, new = import_peft(Fleet(common.config()), model_id, peft_dir)
    if new:
        common.console.print(f"imported {peft_dir} as {v.key} (rank {v.rank}), now active")
    else:
        common.console.print(
            f"{peft_dir} holds the same adapter as {v.key}: nothing stored, {v.key} is active"
        )


@adapters.command("export")
def export(
    model_id: str,
    out_dir: str,
    stack: bool = typer.Option(False, "--stack", help="Export company+team+individual as one LoRA."),
) -> None:
    """Write MODEL_ID's active adapter (or its whole stack) as a PEFT directory."""
    from fleet.handles import Fleet
    from fleet.lora import export_peft

    what = export_peft(Fleet(common.config()), model_id, out_dir, stack=stack)
    common.console.print(f"exported {what} to {out_dir}")


app.add_typer(adapters, name="adapters")


@app.command()
def generate(
    model_id: str,
    prompt: str = typer.Option(..., "--prompt", help="Prompt text."),
    max_tokens: int = typer.Option(32, "--max-tokens", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0),
    logprobs: int = typer.Option(0, "--logprobs", min=0, help="Top-k alternatives per prompt token."),
    json_out: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Complete PROMPT with MODEL_ID's active stack through the serving engine."""
    from fleet.handles import Fleet
    from fleet.lora import generate_for

    out = generate_for(
        Fleet(common.config()),
        model_id,
        prompt,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=logprobs,
    )
    if json_out:
        common.print_json(out)
    else:
        common.console.print(common.styled((out["served_by"], "dim"), " ", prompt, (out["text"], "bold")))
