"""The shipped Grafana dashboard queries only metrics that fleet's code defines, by labels they carry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import fleet
from fleet.ops.dashboard import PANELS, build_dashboard, metric_names, render_json

SOURCE = "\n".join(
    p.read_text() for p in Path(fleet.__file__).parent.rglob("*.py") if p.name != "dashboard.py"
)


def _definition(name: str) -> str:
    """The source text that defines metric ``name`` (its Spec or Gauge/Counter/Histogram call)."""
    m = re.search(rf'"{name}"[^\n]*(?:\n[^\n]*){{0,2}}', SOURCE)
    assert m, f"dashboard queries {name}, which no fleet module defines"
    return m.group(0)


def test_every_dashboard_metric_is_defined_by_fleet():
    names = metric_names()
    assert {"fleet_serve_requests", "fleet_scheduler_queue_depth", "fleet_drift_kl", "fleet_cycles"} <= names
    for name in names:
        _definition(name)


def test_grouping_labels_are_tags_of_their_metric():
    for _, items in PANELS:
        for _, _, exprs, _ in items:
            for expr, _ in exprs:
                for labels, name in re.findall(r"by \(([^)]*)\) \(\w*\(?ray_(fleet_[a-z0-9_]+)", expr):
                    base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                    definition = _definition(base)
                    for label in (x.strip() for x in labels.split(",")):
                        if label != "le":
                            assert f'"{label}"' in definition, f"{base} has no tag {label!r}: {definition}"


def test_dashboard_json_is_valid_and_every_panel_answers_a_question():
    board = json.loads(render_json())
    assert board == build_dashboard()
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len(panels) == sum(len(items) for _, items in PANELS)
    assert all(p["description"].endswith("?") and p["targets"] for p in panels)
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])


def test_shipped_dashboard_file_is_the_rendering():
    shipped = Path(__file__).resolve().parents[1] / "k8s" / "grafana" / "fleet-dashboard.json"
    assert shipped.read_text() == render_json(), (
        "run: fleet monitoring dashboard --out k8s/grafana/fleet-dashboard.json"
    )
