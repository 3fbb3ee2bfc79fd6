"""Which adapters a replica holds in its engine slots: an LRU with pins, shared across stacks.

A request's stack (company, team, individual versions) is *acquired* before it decodes and
*released* when its row has left the batch; a pinned adapter is never evicted, so a slot a live
row reads cannot change under it. Adapters are keyed by version (``acme@v3``), so the company
adapter that sits in every stack of that company is loaded once per replica, and a newly
promoted version is simply a new key (the old one ages out).

Loading follows Ray Serve's multiplex cache: check, lock, check again, evict the least recently
used unpinned adapter, load, count it. Fetching (store read, sha256 check, parsing) happens
before the lock and is shared by concurrent requests for the same key; only slot bookkeeping and
the copy into the engine hold the lock.

A version whose object is corrupt or missing is never served: it is remembered as bad for
``retry_bad_s``, the previous active version of that model stands in for it, or, when there is
none, the level is dropped and the ancestors answer. A store that cannot be read right now
(permissions, timeouts: ``UnavailableError``) is the store's trouble, not the version's: the
previous version stands in for ``retry_unavailable_s``, and without one the request gets a 503
rather than an answer from fewer levels. Every such fallback is logged and counted.

Eviction keeps every company a share of the slots: the adapters to evict are taken first from the
requesting company itself once it holds its share (``capacity`` ÷ companies with adapters
resident), then from companies above their share, least recently used first, and only then from
anyone. One company cycling through its many models churns its own adapters, not the others'.

No Ray here; the replica wires it to its engine thread and store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetError, OverloadedError, UnavailableError
from fleet.registry import StackEntry

log = logging.getLogger("fleet.serve")


@dataclass(frozen=True)
class Lease:
    """Adapters pinned for one request: the entries actually served and their slots, company first."""

    entries: tuple[StackEntry, ...]
    slots: tuple[int, ...]
    fallbacks: tuple[str, ...] = ()  # keys that could not be served and were replaced or dropped

    @property
    def served_by(self) -> str:
        return self.entries[-1].key if self.entries else "base"

    @property
    def slots_L(self) -> list[int]:
        """The DecodeBatch row's slots (-1 alone for the base)."""
        return list(self.slots) or [-1]


@dataclass
class _Bad:
    substitute: StackEntry | None
    until: float


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    fallbacks: int = 0
    failed_loads: Counter = field(default_factory=Counter)


class AdapterCache:
    """LRU of adapters in engine slots. All methods run on the replica's event loop."""

    def __init__(
        self,
        *,
        capacity: int,
        fetch: Callable[[StackEntry], Any],
        apply: Callable[[list[str], list[tuple[str, Any]]], Awaitable[list[int | BaseException]]],
        previous: Callable[[StackEntry], list[StackEntry]],
        retry_bad_s: float = 60.0,
        retry_unavailable_s: float = 5.0,
        wait_s: float = 30.0,
        on_event: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``fetch`` (blocking; run in a worker thread) reads and verifies one version's weights;
        ``apply(evict, load)`` unloads keys and loads ``(key, weights)`` pairs in the engine, in that
        order, on the engine thread, returning each load's slot (or its exception); calls run in the
        order they are made. ``previous`` (blocking) lists a model's earlier active versions, newest first.
        """
        self.capacity = capacity
        self._fetch_sync = fetch
        self._apply = apply
        self._previous = previous
        self.retry_bad_s = retry_bad_s
        self.retry_unavailable_s = retry_unavailable_s
        self.wait_s = wait_s
        self._on_event = on_event or (lambda kind, status: None)
        self._clock = clock
        self._slots: OrderedDict[str, int] = OrderedDict()  # resident key → slot, least recently used first
        self._installing: dict[str, asyncio.Future] = {}  # key → its queued engine load
        self._pins: Counter[str] = Counter()
        self._bad: dict[str, _Bad] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self._lock = asyncio.Lock()
        self._freed = asyncio.Event()
        self.stats = CacheStats()

    # ------------------------------------------------------------------ public
    def resident(self) -> list[str]:
        return list(self._slots)

    def pinned(self, key: str) -> int:
        return self._pins[key]

    async def acquire(self, entries: Sequence[StackEntry]) -> Lease:
        """Pin the stack's adapters (loading what is missing) and return their slots."""
        wanted, known_bad = self._substituted(entries)
        if all(e.key in self._slots for e in wanted):  # fast path: everything resident
            return self._pin(wanted, known_bad)
        usable, fallbacks = await self._usable(wanted, known_bad)
        deadline = self._clock() + self.wait_s
        while True:
            for i, (e, w) in enumerate(usable):  # resident when first seen, evicted since: read it again
                if w is None and not self._held(e.key):
                    usable[i] = (e, await self._fetch(e))
            freed = self._freed
            async with self._lock:
                # Check again: meanwhile other requests may have loaded, or queued, what this one needs.
                # Nothing below awaits, so the decision and the reservation are one atomic step.
                missing = [(e, w) for e, w in usable if not self._held(e.key)]
                keys = {e.key for e, _ in usable}
                free = self.capacity - len(self._slots) - len(self._installing)
                evictable = [k for k in self._slots if self._pins[k] == 0 and k not in keys]
                if any(w is None for _, w in missing):
                    continue  # evicted between our read and now: read it again
                if len(missing) <= free + len(evictable):
                    for k in keys:  # pinned first: our own evictions must not take them
                        self._pins[k] += 1
                    if missing:
                        victims = self._victims(evictable, len(missing) - free, _company(usable[0][0].key))
                        self._reserve([(e.key, w) for e, w in missing], victims)
                    hits = len(usable) - len(missing)
                    self.stats.hits += hits
                    self.stats.misses += len(missing)
                    for kind, n in (("hit", hits), ("miss", len(missing))):
                        for _ in range(n):
                            self._on_event(kind, "ok")
                    waits = {id(f): f for k in keys if (f := self._installing.get(k)) is not None}
                    break
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise OverloadedError(
                    f"all {self.capacity} adapter slots of this replica are in use by running requests; retry shortly"
                )
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                pass
        try:
            for fut in waits.values():
                await asyncio.shield(fut)
            missing_now = [k for k in keys if k not in self._slots]
            if missing_now:
                raise UnavailableError(f"adapter {missing_now[0]} could not be loaded into the engine")
        except BaseException:
            for k in keys:
                self._unpin(k)
            raise
        used = tuple(e for e, _ in usable)
        for e in used:
            self._slots.move_to_end(e.key)
        return Lease(used, tuple(self._slots[e.key] for e in used), fallbacks)

    def release(self, lease: Lease) -> None:
        for e in lease.entries:
            self._unpin(e.key)

    # ------------------------------------------------------------------ internals
    def _pin(self, entries: list[StackEntry], fallbacks: list[str]) -> Lease:
        for e in entries:
            self._pins[e.key] += 1
            self._slots.move_to_end(e.key)
            self.stats.hits += 1
            self._on_event("hit", "ok")
        return Lease(tuple(entries), tuple(self._slots[e.key] for e in entries), tuple(fallbacks))

    def _unpin(self, key: str) -> None:
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]
            freed, self._freed = self._freed, asyncio.Event()
            freed.set()

    def _victims(self, evictable: list[str], n: int, requester: str) -> list[str]:
        """``n`` of the unpinned ``evictable`` keys (least recently used first) to evict for ``requester``."""
        if n <= 0:
            return []
        held = Counter(_company(k) for k in (*self._slots, *self._installing))
        share = max(1, self.capacity // len(set(held) | {requester}))
        left = list(evictable)
        out: list[str] = []
        while len(out) < n and left:
            if held[requester] >= share:
                pick = next((k for k in left if _company(k) == requester), None)
            else:
                pick = None
            if pick is None:
                over = [k for k in left if held[_company(k)] > share]
                pick = over[0] if over else left[0]
            left.remove(pick)
            held[_company(pick)] -= 1
            out.append(pick)
        return out

    def _substituted(self, entries: Sequence[StackEntry]) -> tuple[list[StackEntry], list[str]]:
        """Replace versions known to be bad by their stand-ins (or drop them)."""
        now = self._clock()
        out, fallbacks = [], []
        for e in entries:
            bad = self._bad.get(e.key)
            if bad is not None and bad.until <= now:
                del self._bad[e.key]
                bad = None
            if bad is None:
                out.append(e)
                continue
            fallbacks.append(e.key)
            if bad.substitute is not None:
                out.append(bad.substitute)
        return out, fallbacks

    async def _usable(
        self, entries: list[StackEntry], fallbacks: list[str]
    ) -> tuple[list[tuple[StackEntry, Any]], tuple[str, ...]]:
        """Each level's entry to serve with its fetched weights (None when already resident)."""
        pending = [None if self._held(e.key) else asyncio.ensure_future(self._fetch(e)) for e in entries]
        usable: list[tuple[StackEntry, Any]] = []
        fallbacks = list(fallbacks)
        for e, fut in zip(entries, pending, strict=True):
            if fut is None:
                usable.append((e, None))
                continue
            try:
                usable.append((e, await fut))
            except FleetError as exc:
                sub = await self._fall_back(e, exc)
                fallbacks.append(e.key)
                if sub is not None:
                    usable.append(sub)
        return usable, tuple(fallbacks)

    async def _fall_back(self, entry: StackEntry, exc: FleetError) -> tuple[StackEntry, Any] | None:
        """A version cannot be served: find the previous active version that can, or drop the level."""
        reason = {"integrity_error": "corrupt", "not_found": "missing", "unavailable": "unavailable"}.get(
            exc.code, "invalid"
        )
        hold = self.retry_unavailable_s if reason == "unavailable" else self.retry_bad_s
        self.stats.failed_loads[reason] += 1
        self.stats.fallbacks += 1
        self._on_event("load", reason)
        log.warning("adapter %s cannot be served (%s): %s", entry.key, reason, exc)
        try:
            earlier = await asyncio.to_thread(self._previous, entry)
        except Exception as lookup_error:  # registry unreachable: drop the level for now
            log.warning("could not list earlier versions of %s: %s", entry.model_id, lookup_error)
            earlier = []
        for prev in earlier:
            try:
                weights = None if self._held(prev.key) else await self._fetch(prev)
            except FleetError as prev_exc:
                log.warning("earlier version %s cannot be served either: %s", prev.key, prev_exc)
                continue
            self._bad[entry.key] = _Bad(prev, self._clock() + hold)
            self._on_event("fallback", "previous_version")
            log.warning("serving %s in place of %s", prev.key, entry.key)
            return prev, weights
        if reason == "unavailable":  # the store's trouble: no answer from fewer levels, a 503
            raise UnavailableError(
                "the adapter store cannot be read right now; retry shortly",
                retry_after=self.retry_unavailable_s,
            ) from None
        self._bad[entry.key] = _Bad(None, self._clock() + hold)
        self._on_event("fallback", "ancestor")
        log.warning("serving %s without its own adapter (its ancestors' only)", entry.model_id)
        return None

    async def _fetch(self, entry: StackEntry) -> Any:
        """Read and verify one version; concurrent requests for the same key share one read."""
        fut = self._inflight.get(entry.key)
        if fut is None:
            fut = asyncio.ensure_future(asyncio.to_thread(self._fetch_sync, entry))
            self._inflight[entry.key] = fut
            fut.add_done_callback(lambda _f, k=entry.key: self._inflight.pop(k, None))
        return await asyncio.shield(fut)

    def _held(self, key: str) -> bool:
        return key in self._slots or key in self._installing

    def _reserve(self, loads: list[tuple[str, Any]], victims: list[str]) -> None:
        """Queue one engine call that evicts ``victims`` and loads ``loads`` (called under the lock).

        The slots are accounted for now, so calls queue in the order they were decided and each
        finds room in the engine. The task itself records the outcome before it completes, so
        whoever sees it done sees the table updated, even if the request that made it has gone.
        """
        for k in victims:
            del self._slots[k]
            self.stats.evictions += 1
            self._on_event("evict", "ok")
        task = asyncio.ensure_future(self._install(victims, loads))
        for k, _ in loads:
            self._installing[k] = task

    async def _install(self, victims: list[str], loads: list[tuple[str, Any]]) -> None:
        try:
            results: list[Any] = list(await self._apply(victims, loads))
        except BaseException as exc:  # recorded per key below, never lost
            results = [exc] * len(loads)
        for (k, _), slot in zip(loads, results, strict=True):
            del self._installing[k]
            if isinstance(slot, int):
                self._slots[k] = slot
                self.stats.loads += 1
                self._on_event("load", "ok")
            else:
                log.error("loading adapter %s into the engine failed: %s", k, slot)
        freed, self._freed = self._freed, asyncio.Event()
        freed.set()


def _company(key: str) -> str:
    """The company of an adapter key (``acme/search@v3`` → ``acme``)."""
    return key.split("@", 1)[0].split("/", 1)[0]
