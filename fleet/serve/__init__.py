"""fleet.serve: every model of the fleet behind one OpenAI-compatible API, on Ray Serve.

Contract (stable):

- ``build(args)`` (import path ``fleet.serve.app:build``): the Serve application builder;
  ``args`` is ``{"config": "/path/fleet.yaml"}`` (optional). Two deployments:
  ``FleetIngress`` (FastAPI: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``,
  ``/healthz``) and ``FleetModel`` (one per base model; replicas, autoscaling and
  ``ray_actor_options`` from ``ServeConfig``).
- ``start(cfg, port=)``: deploy on the connected Ray cluster and return the base URL;
  ``run(cfg, port=, address=)``: what ``fleet serve`` does (start, print, wait for Ctrl-C).
- Responses carry ``X-Fleet-Served-By: <model id>@v<n>`` (or ``base``): the deepest stack level
  that answered. Errors use OpenAI's JSON error shape with 400/401/404/413/429/503; every 429
  carries ``Retry-After``; registry and store trouble is a 503 (or the previous answer), never a 500.
- What one tenant can take from the others is bounded (``ServeConfig``): body size, requests in
  flight per company, key checks per client address, prompt tokens per decode step; waiting
  requests are taken round-robin across companies, and the adapter cache keeps each company a
  share of the slots.
- Building blocks without Ray, for tests and tools: ``Batcher`` (continuous batching over a
  ``DecodeBatch``, per-company round-robin admission), ``AdapterCache`` (adapters in engine slots,
  pinned while in use, a share per company, falling back from corrupt, missing or unreadable
  versions), ``Tenancy``/``RateLimiter``, ``TextStream`` (incremental detokenization with stop
  strings), ``build_runtime``.
"""

from __future__ import annotations

from fleet._lazy import lazy_exports

_EXPORTS = {
    "build": "fleet.serve.app",
    "start": "fleet.serve.app",
    "run": "fleet.serve.app",
    "deployment_options": "fleet.serve.app",
    "Batcher": "fleet.serve.batcher",
    "Job": "fleet.serve.batcher",
    "AdapterCache": "fleet.serve.cache",
    "Lease": "fleet.serve.cache",
    "RateLimiter": "fleet.serve.tenancy",
    "Tenancy": "fleet.serve.tenancy",
    "TextStream": "fleet.serve.text",
    "build_runtime": "fleet.serve.runtime",
    "SERVED_BY": "fleet.serve.ingress",
}
__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
