"""Serving metrics through ``ray.util.metrics`` (exported by Ray's Prometheus endpoint, shown in the dashboard).

Tags are bounded: the deployment, the model's tier and a status (an HTTP status code or a small
fixed vocabulary). A model id is NEVER a tag: a million models would be a million time series.
Per-model figures live in the registry and the logs.
"""

from __future__ import annotations

from fleet._metrics import Spec, make_metrics

ALLOWED_TAGS = frozenset({"deployment", "tier", "status"})
TIERS = ("company", "team", "individual", "unknown")

_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000]
_ROWS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


# fmt: off
SPECS: dict[str, Spec] = {
    s.name: s
    for s in (
        Spec("counter", "fleet_serve_requests", "HTTP requests answered, by tier and status code.", ("deployment", "tier", "status")),
        Spec("counter", "fleet_serve_errors", "Requests answered with an error, by tier and status code.", ("deployment", "tier", "status")),
        Spec("histogram", "fleet_serve_latency_ms", "Request latency, ms (to the last byte).", ("deployment", "tier"), tuple(_MS)),
        Spec("histogram", "fleet_serve_ttft_ms", "Time to the first generated token, ms.", ("deployment", "tier"), tuple(_MS)),
        Spec("counter", "fleet_serve_prompt_tokens", "Prompt tokens of answered requests.", ("deployment", "tier")),
        Spec("counter", "fleet_serve_completion_tokens", "Generated tokens of answered requests.", ("deployment", "tier")),
        Spec("counter", "fleet_serve_adapter_loads", "Adapter loads into engine slots, by outcome (ok, corrupt, missing, invalid).", ("deployment", "status")),
        Spec("counter", "fleet_serve_adapter_cache_hits", "Stack levels found resident in the replica's slots.", ("deployment",)),
        Spec("counter", "fleet_serve_adapter_cache_misses", "Stack levels that had to be loaded.", ("deployment",)),
        Spec("counter", "fleet_serve_adapter_evictions", "Adapters evicted (least recently used) to make room.", ("deployment",)),
        Spec("counter", "fleet_serve_adapter_fallbacks", "Versions not served (corrupt/missing), by what stood in (previous_version, ancestor).", ("deployment", "status")),
        Spec("histogram", "fleet_serve_batch_size", "Rows in each decode step.", ("deployment",), tuple(_ROWS)),
    )
}
# fmt: on


class ServeMetrics:
    """The metrics of one Serve deployment's replica (created inside the replica's process)."""

    def __init__(self, deployment: str) -> None:
        self.deployment = deployment
        self._m = make_metrics(SPECS.values(), ALLOWED_TAGS)
        for metric in self._m.values():
            metric.set_default_tags({"deployment": deployment})

    # ------------------------------------------------------------------ ingress
    def request(
        self,
        tier: str,
        status: int,
        latency_s: float,
        *,
        ttft_s: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
    ) -> None:
        tier = tier if tier in TIERS else "unknown"
        tags = {"tier": tier, "status": str(int(status))}
        self._m["fleet_serve_requests"].inc(1, tags=tags)
        if status >= 400:
            self._m["fleet_serve_errors"].inc(1, tags=tags)
            return
        self._m["fleet_serve_latency_ms"].observe(latency_s * 1000.0, tags={"tier": tier})
        if ttft_s is not None:
            self._m["fleet_serve_ttft_ms"].observe(ttft_s * 1000.0, tags={"tier": tier})
        if prompt_tokens:
            self._m["fleet_serve_prompt_tokens"].inc(prompt_tokens, tags={"tier": tier})
        if completion_tokens:
            self._m["fleet_serve_completion_tokens"].inc(completion_tokens, tags={"tier": tier})

    # ------------------------------------------------------------------ replica
    def adapter_event(self, kind: str, status: str) -> None:
        """Hook for AdapterCache: kind ∈ hit, miss, load, evict, fallback."""
        if kind == "hit":
            self._m["fleet_serve_adapter_cache_hits"].inc(1)
        elif kind == "miss":
            self._m["fleet_serve_adapter_cache_misses"].inc(1)
        elif kind == "load":
            self._m["fleet_serve_adapter_loads"].inc(1, tags={"status": status})
        elif kind == "evict":
            self._m["fleet_serve_adapter_evictions"].inc(1)
        elif kind == "fallback":
            self._m["fleet_serve_adapter_fallbacks"].inc(1, tags={"status": status})

    def batch_size(self, rows: int) -> None:
        self._m["fleet_serve_batch_size"].observe(rows)
