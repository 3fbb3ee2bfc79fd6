"""Shared pieces of fleet's command line: the loaded config, the console, error exits.

Command modules (``fleet/cli/<group>.py``) import only this and
typer at module level; heavy imports (torch, ray) happen inside the commands so
that ``fleet --help`` stays fast.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.text import Text

from fleet.config import FleetConfig, load_config
from fleet.errors import ValidationError

# Markup off: ids, questions, completions, file names and error messages are printed as they are
# (a "[/]" in them never crashes the CLI, and "[a-z0-9]" in an id rule never vanishes). fleet's own
# styling goes through `styled`, which never parses its text. An error is one line, however long.
console = Console(highlight=False, markup=False)
err_console = Console(stderr=True, highlight=False, markup=False, soft_wrap=True)


def styled(*parts: str | tuple[str, str]) -> Text:
    """Text from plain strings and ``(text, style)`` pairs; nothing in it is read as markup."""
    return Text.assemble(*parts)


_state: dict[str, Any] = {"config_path": None, "config": None}


def set_config_path(path: str | None) -> None:
    _state["config_path"] = path
    _state["config"] = None


def config() -> FleetConfig:
    """The configuration of this invocation (loaded once)."""
    if _state["config"] is None:
        _state["config"] = load_config(_state["config_path"])
    return _state["config"]


def print_json(obj: Any) -> None:
    """Machine-readable output: one JSON document on stdout, nothing else."""
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def not_built(what: str) -> None:
    """Commands whose capability has not landed yet fail clearly instead of pretending."""
    from fleet.errors import NotBuiltError

    raise NotBuiltError(f"{what} is not built in this release of fleet yet")


def parse_interval(text: str) -> float:
    """'90s', '10m', '1h', '2d' or plain seconds → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = (text or "").strip().lower()
    try:
        value = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except (ValueError, KeyError):
        raise ValidationError(f"interval {text!r}: use a number with s, m, h or d (e.g. 10m)") from None
    if value <= 0:
        raise ValidationError(f"interval {text!r} must be positive")
    return value
