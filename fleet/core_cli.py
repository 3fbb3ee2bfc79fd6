"""Core commands: init, tenants, keys, ingest, base, status, demo."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    pass
