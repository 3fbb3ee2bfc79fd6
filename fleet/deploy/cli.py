"""``fleet k8s render``."""

from __future__ import annotations

import typer

from fleet import _cli_common as common


def register(app: typer.Typer) -> None:
    k8s = typer.Typer(help="Kubernetes (KubeRay) manifests from the fleet config.", no_args_is_help=True)

    @k8s.command()
    def render(
        overlay: str = typer.Option(None, "--overlay", help="dev or prod (default: all)."),
        out: str = typer.Option("k8s", "--out"),
    ) -> None:
        """Render the KubeRay manifests from the fleet config."""
        common.not_built("fleet k8s render")

    app.add_typer(k8s, name="k8s")
