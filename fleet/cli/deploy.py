"""``fleet k8s render`` and ``fleet cluster-yaml``: deployment files from the fleet config."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from fleet.cli import _common as common

app = typer.Typer()

k8s = typer.Typer(help="Kubernetes (KubeRay) manifests from the fleet config.", no_args_is_help=True)


@k8s.command()
def render(
    overlay: str = typer.Option(None, "--overlay", help="dev or prod (default: all)."),
    out: str = typer.Option("k8s", "--out", help="Directory of the kustomize tree."),
) -> None:
    """Render the KubeRay manifests (kustomize base + overlays) from the fleet config."""
    from fleet.deploy import write_k8s

    written = write_k8s(common.config(), Path(out), [overlay] if overlay else None)
    common.console.print(f"wrote {len(written)} files under {out}/")


app.add_typer(k8s, name="k8s")


@app.command("cluster-yaml")
def cluster_yaml(
    out: str = typer.Option("cluster.yaml", "--out", help="File to write; - prints it."),
) -> None:
    """Render the Ray cluster launcher's cluster.yaml (AWS) from the fleet config."""
    from fleet.deploy import render_cluster_yaml

    text = render_cluster_yaml(common.config())
    if out == "-":
        sys.stdout.write(text)
        return
    Path(out).write_text(text)
    common.console.print(f"wrote {out}")
