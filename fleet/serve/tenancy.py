"""Who is asking and what answers them: API keys, per-company rate limits, model → stack.

The ingress asks the registry, and caches answers for ``serve.stack_cache_s`` seconds: that is
how long a promotion (or a revoked key) takes to be seen. Registry calls are blocking SQL, so
they run in worker threads, never on the event loop.

A key sees only its company's models. Another company's model, an unknown model and a malformed
id all get the same 404, decided without a query for foreign ids, so neither the answer nor its
timing tells one from another.

Keys cost the registry as little as an attacker can make them: a key without the shape of a
fleet key is refused before any lookup; an unknown prefix (or a wrong key) is remembered for
``bad_key_cache_s`` and refused again without one; and every request whose key has not been seen
valid lately spends from its client address's bucket (``preauth_rps``), so one address cannot
make the registry check more than that many keys per second (429 past it). Keys seen valid
lately never wait on that bucket: a flood of bad keys from a shared address does not lock out
the good ones.

When the registry cannot answer (an outage, a timeout), a key or stack seen in the last
``_RETAIN_S`` seconds is used as it was last seen; anything else is a 503 (``UnavailableError``),
never a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from fleet.errors import (
    AuthError,
    FleetError,
    InvalidIdError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
)
from fleet.registry import Registry, Stack, key_prefix, well_formed_key
from fleet.serve.protocol import model_not_found
from fleet.types import validate_id

log = logging.getLogger("fleet.serve")
_CACHE_ENTRIES = 100_000
_RETAIN_S = 300.0  # how long a good answer is kept to bridge a registry outage (and to vouch for a key)
_REGISTRY_TIMEOUT_S = 10.0


class _TTLCache:
    """A bounded LRU whose entries are fresh for ``ttl`` seconds and kept ``retain`` seconds for ``stale``."""

    def __init__(
        self, ttl: float, clock: Callable[[], float], size: int = _CACHE_ENTRIES, retain: float = 0.0
    ) -> None:
        self.ttl, self.retain, self._clock, self._size = ttl, max(retain, ttl), clock, size
        self._data: OrderedDict[Any, tuple[float, Any]] = OrderedDict()  # key → (stored at, value)

    def get(self, key: Any) -> Any | None:
        """The value if it is fresh."""
        hit = self._entry(key)
        return hit[1] if hit is not None and hit[0] + self.ttl > self._clock() else None

    def stale(self, key: Any) -> Any | None:
        """The value however old (within ``retain``)."""
        hit = self._entry(key)
        return None if hit is None else hit[1]

    def put(self, key: Any, value: Any) -> None:
        if self.retain <= 0:
            return
        self._data[key] = (self._clock(), value)
        self._data.move_to_end(key)
        while len(self._data) > self._size:
            self._data.popitem(last=False)

    def drop(self, key: Any) -> None:
        self._data.pop(key, None)

    def _entry(self, key: Any) -> tuple[float, Any] | None:
        hit = self._data.get(key)
        if hit is None:
            return None
        if hit[0] + self.retain <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return hit


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
        *,
        label: str = "company",
    ) -> None:
        self.rps, self.burst = rps, burst
        self.overrides = dict(overrides or {})
        self.label = label
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # who → [tokens, last refill]

    def limits(self, company: str) -> tuple[float, float]:
        rps = self.overrides.get(company)
        if rps is None:
            return self.rps, float(self.burst)
        return rps, float(max(1, math.floor(self.burst * rps / self.rps)))

    def check(self, company: str) -> None:
        rps, burst = self.limits(company)
        now = self._clock()
        bucket = self._buckets.get(company)
        if bucket is None:
            bucket = self._buckets[company] = [burst, now]
            while len(self._buckets) > _CACHE_ENTRIES:  # bounded: the oldest bucket goes
                self._buckets.popitem(last=False)
        bucket[0] = min(burst, bucket[0] + (now - bucket[1]) * rps)
        bucket[1] = now
        if bucket[0] < 1:
            wait = (1 - bucket[0]) / rps
            who = f"company {company!r}" if self.label == "company" else self.label
            raise RateLimitError(
                f"rate limit of {rps:g} requests/s for {who} exceeded; retry in {wait:.2f}s",
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
        self,
        registry: Registry,
        *,
        cache_s: float,
        bad_key_s: float = 10.0,
        preauth: RateLimiter | None = None,
        timeout_s: float = _REGISTRY_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.timeout_s = timeout_s
        self._keys = _TTLCache(cache_s, clock, retain=_RETAIN_S)
        self._stacks = _TTLCache(cache_s, clock, retain=_RETAIN_S)
        self._bad_prefixes = _TTLCache(bad_key_s, clock)
        self._bad_keys = _TTLCache(bad_key_s, clock)
        self._preauth = preauth
        self._pending: dict[str, asyncio.Future] = {}
        self.lookups = 0  # key lookups that reached the registry

    async def company(self, authorization: str | None, client: str | None = None) -> str:
        """The company of the request's bearer key (AuthError: missing, malformed, unknown or revoked;
        RateLimitError: ``client`` has spent its key checks; UnavailableError: registry down)."""
        key = bearer_key(authorization)
        if key is None:
            raise AuthError(
                "missing API key: send 'Authorization: Bearer <key>' (create one with `fleet keys create`)"
            )
        company = self._keys.get(key)
        if company is not None:
            return company
        pending = self._pending.get(key)
        if pending is not None:  # the same key is being checked right now: share that answer
            return await asyncio.shield(pending)
        vouched = self._keys.stale(key)  # valid a moment ago: no pre-authentication charge
        if vouched is None and self._preauth is not None:
            self._preauth.check(client or "unknown")
        if not well_formed_key(key):
            raise AuthError("invalid API key")
        prefix = key_prefix(key)
        if self._bad_prefixes.get(prefix) is not None or self._bad_keys.get(key) is not None:
            raise AuthError("invalid API key")
        lookup = asyncio.ensure_future(self._lookup(key, prefix, vouched))
        self._pending[key] = lookup
        lookup.add_done_callback(lambda _f: self._pending.pop(key, None))
        return await asyncio.shield(lookup)

    async def _lookup(self, key: str, prefix: str, vouched: str | None) -> str:
        self.lookups += 1
        try:
            company = await self._ask(self.registry.authenticate, key)
        except AuthError as exc:
            self._keys.drop(key)
            reason = exc.context.get("reason") if isinstance(exc.context, dict) else None
            (self._bad_prefixes if reason == "unknown_prefix" else self._bad_keys).put(
                prefix if reason == "unknown_prefix" else key, True
            )
            raise AuthError("invalid API key") from None
        except UnavailableError:
            if vouched is not None:
                return vouched
            raise
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
        """The model's active stack (individual → team → company → base), as of ``cache_s`` ago at most
        (or, while the registry cannot answer, as last seen)."""
        self.check_access(company, model)
        stack = self._stacks.get(model)
        if stack is None:
            try:
                stack = await self._ask(self.registry.active_stack, model)
            except NotFoundError:
                raise model_not_found(model) from None
            except UnavailableError:
                stack = self._stacks.stale(model)
                if stack is None:
                    raise
                log.warning("registry unavailable: serving the last stack seen for a model")
                return stack
            self._stacks.put(model, stack)
        return stack

    async def models(self, company: str) -> list[Any]:
        return await self._ask(self.registry.list_models, company=company)

    async def model(self, company: str, model: str) -> Any:
        self.check_access(company, model)
        try:
            return await self._ask(self.registry.get_model, model)
        except NotFoundError:
            raise model_not_found(model) from None

    async def _ask(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A registry call in a worker thread; trouble that is not an answer becomes UnavailableError."""
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args, **kwargs), self.timeout_s)
        except FleetError:
            raise
        except Exception as exc:  # the database is down, locked, unreachable or too slow
            log.warning(
                "registry call %s failed: %s: %s", getattr(fn, "__name__", fn), type(exc).__name__, exc
            )
            raise UnavailableError("the registry is unavailable; retry shortly", retry_after=1.0) from None
