"""``fleet serve``."""

from __future__ import annotations

import typer

from fleet.cli import _common as common

app = typer.Typer()


@app.command()
def serve(
    port: int = typer.Option(None, "--port", help="HTTP port (default: serve.port)."),
    address: str = typer.Option(None, "--address", help="Ray cluster to join (default: local Ray)."),
) -> None:
    """Serve every model behind an OpenAI-compatible API on Ray Serve (until Ctrl-C)."""
    from fleet.serve import run

    run(common.config(), port=port, address=address, echo=common.console.print)
