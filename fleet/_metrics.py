"""fleet's Ray metrics, declared as data: a :class:`Spec` per metric, made with ``ray.util.metrics``.

Serving, drift and the control loop declare their metrics this way (names, descriptions, bounded tag keys, histogram
boundaries); :func:`make_metrics` creates them in the recording process and refuses a tag outside
the module's allowed set, so that a model id can never become a tag.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spec:
    kind: str  # counter | gauge | histogram
    name: str
    description: str
    tag_keys: tuple[str, ...]
    boundaries: tuple[float, ...] = ()


def make_metrics(specs: Iterable[Spec], allowed_tags: frozenset[str]) -> dict[str, Any]:
    """One ``ray.util.metrics`` Counter or Histogram per spec, by name."""
    from ray.util import metrics

    made: dict[str, Any] = {}
    for spec in specs:
        if not set(spec.tag_keys) <= allowed_tags:
            raise ValueError(f"metric {spec.name} has tags outside {sorted(allowed_tags)}: {spec.tag_keys}")
        if spec.kind == "counter":
            made[spec.name] = metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "gauge":
            made[spec.name] = metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        else:
            made[spec.name] = metrics.Histogram(
                spec.name,
                description=spec.description,
                boundaries=list(spec.boundaries),
                tag_keys=spec.tag_keys,
            )
    return made
