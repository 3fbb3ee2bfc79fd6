"""Shared helpers of fleet's benchmark scripts: results JSON, tables, memory."""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).resolve().parent / "results"
console = Console(highlight=False)


def write_results(name: str, figures: dict[str, Any]) -> Path:
    """Merge ``figures`` into ``bench/results/<name>.json`` (stable keys read by tooling)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(figures)
    old["_machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path.write_text(json.dumps(old, indent=2, sort_keys=True) + "\n")
    return path


def table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """rows: (case, figure, target)."""
    t = Table(title=title)
    t.add_column("case")
    t.add_column("measured", justify="right")
    t.add_column("target", justify="right")
    for row in rows:
        t.add_row(*row)
    console.print(t)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q))
