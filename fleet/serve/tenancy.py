"""Who is asking and what answers them: API keys, per-company rate limits, model → stack.

The ingress asks the registry, and caches answers for ``serve.stack_cache_s`` seconds: that is
how long a promotion (or a revoked key) takes to be seen. Registry calls are blocking SQL, so
they run in worker threads, never on the event loop.

A key sees only its company's models. Another company's model, an unknown model and a malformed
id all get the same 404, decided without a query for foreign ids, so neither the answer nor its
timing tells one from another.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fleet.errors import AuthError, InvalidIdError, NotFoundError, RateLimitError
from fleet.registry import Registry, Stack
from fleet.serve.protocol import model_not_found
from fleet.types import validate_id

_CACHE_ENTRIES = 100_000


class _TTLCache:
    """A bounded LRU whose entries expire ``ttl`` seconds after they were stored."""

    def __init__(self, ttl: float, clock: Callable[[], float], size: int = _CACHE_ENTRIES) -> None:
        self.ttl, self._clock, self._size = ttl, clock, size
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()

    def get(self, key: Any) -> Any | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return hit[1]

    def put(self, key: Any, value: Any) -> None:
        if self.ttl <= 0:
            return
        self._data[key] = (self._clock() + self.ttl, value)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)


class RateLimiter:
    """A token bucket per company: ``rps`` requests per second on average, bursts of ``burst``.

    ``overrides`` gives some companies their own rate; their burst keeps the same length in
    seconds (burst / rps), at least one request.
    """

    def __init__(
        self,
        rps: float,
        burst: int,
        overrides: dict[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rps, self.burst = rps, burst
        self.overrides = dict(overrides or {})
        self._clock = clock
        self._buckets: dict[str, list[float]] = {}  # company → [tokens, last refill]

    def limits(self, company: str) -> tuple[float, float]:
        rps = self.overrides.get(company)
        if rps is None:
            return self.rps, float(self.burst)
        return rps, float(max(1, math.floor(self.burst * rps / self.rps)))

    def check(self, company: str) -> None:
        rps, burst = self.limits(company)
        now = self._clock()
        bucket = self._buckets.setdefault(company, [burst, now])
        bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rps)
        bucket[1] = now
        if bucket[0] < 1:
            wait = (1 - bucket[0]) / rps
            raise RateLimitError(
                f"rate limit of {rps:g} requests/s for company {company!r} exceeded; retry in {wait:.2f}s",
                retry_after=wait,
            )
        bucket[0] -= 1


def bearer_key(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


class Tenancy:
    """API key → company and model id → active stack, cached; blocking registry calls off the loop."""

    def __init__(
        self, registry: Registry, *, cache_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self._keys = _TTLCache(cache_s, clock)
        self._stacks = _TTLCache(cache_s, clock)

    async def company(self, authorization: str | None) -> str:
        """The company of the request's bearer key (AuthError: missing, malformed, unknown or revoked)."""
        key = bearer_key(authorization)
        if key is None:
            raise AuthError(
                "missing API key: send 'Authorization: Bearer <key>' (create one with `fleet keys create`)"
            )
        company = self._keys.get(key)
        if company is None:
            company = await asyncio.to_thread(self.registry.authenticate, key)
            self._keys.put(key, company)
        return company

    def check_access(self, company: str, model: str) -> None:
        """404 for a malformed id or another company's model, without touching the registry."""
        try:
            validate_id(model)
        except InvalidIdError:
            raise model_not_found(model) from None
        if model.split("/", 1)[0] != company:
            raise model_not_found(model)

    async def stack(self, company: str, model: str) -> Stack:
        """The model's active stack (individual → team → company → base), as of ``cache_s`` ago at most."""
        self.check_access(company, model)
        stack = self._stacks.get(model)
        if stack is None:
            try:
                stack = await asyncio.to_thread(self.registry.active_stack, model)
            except NotFoundError:
                raise model_not_found(model) from None
            self._stacks.put(model, stack)
        return stack

    async def models(self, company: str) -> list[Any]:
        return await asyncio.to_thread(self.registry.list_models, company=company)

    async def model(self, company: str, model: str) -> Any:
        self.check_access(company, model)
        try:
            return await asyncio.to_thread(self.registry.get_model, model)
        except NotFoundError:
            raise model_not_found(model) from None
