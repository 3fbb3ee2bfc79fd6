"""Continuous batching inside one model replica: requests for any adapters share each decode step.

One asyncio task owns a ``DecodeBatch`` and loops: take waiting requests in at the step boundary
(up to ``max_batch_size`` rows; an idle batch waits ``batch_wait_s`` for company first), run one
step, hand every row its token. Rows finish on their own; a long request never holds the short
ones back, and a slow reader never holds the loop back (each request has its own unbounded
queue). The torch work runs on ONE dedicated thread, so the event loop stays free to accept
requests and stream tokens, and nothing else ever touches the engine at the same time: adapter
loads and log-prob passes are queued on that same thread (``run_engine``).

No Ray here; the replica wires it up, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fleet.errors import FleetError, OverloadedError, UnavailableError, ValidationError
from fleet.lora import DecodeBatch, Generation

log = logging.getLogger("fleet.serve")


@dataclass
class Token:
    token_id: int


@dataclass
class Done:
    generation: Generation
    completion_tokens: int  # tokens the model produced, a final EOS included


@dataclass
class Failed:
    error: FleetError


@dataclass
class Job:
    """One request in the batcher: its inputs, its output queue, its place in the lifecycle."""

    prompt_ids: list[int]
    slots: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    rid: int = -1
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    n_tokens: int = 0
    cancelled: bool = False
    removed: bool = False  # no longer in the DecodeBatch: its adapter slots may be reused
    on_removed: list[Callable[[], None]] = field(default_factory=list)

    def when_removed(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the row has left the batch (now, if it already has)."""
        if self.removed:
            fn()
        else:
            self.on_removed.append(fn)

    def _mark_removed(self) -> None:
        self.removed = True
        callbacks, self.on_removed = self.on_removed, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a release hook must not take the loop down
                log.exception("release hook failed")


class Batcher:
    """The decode loop of one replica. ``submit`` a ``Job``, read its ``events``; ``cancel`` it if the reader leaves."""

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        *,
        max_batch_size: int,
        batch_wait_s: float,
        max_queue: int,
        context_limit: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.context_limit = context_limit
        self._on_step = on_step
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-engine")
        self._batch = DecodeBatch(engine, tokenizer)
        self._waiting: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._to_cancel: set[int] = set()
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.steps = 0
        self.tokens = 0
        self.max_rows_seen = 0
        self.engine_s = 0.0  # time spent in engine steps (prefill + decode)
        self.queue_to_first_token: deque[float] = deque(maxlen=4096)  # recent submit → first token, s

    # ------------------------------------------------------------------ public
    @property
    def load(self) -> int:
        """Requests waiting or decoding."""
        return len(self._waiting) + len(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    def submit(self, job: Job) -> Job:
        """Queue a request for the next step boundary; OverloadedError when the queue is full."""
        self._validate(job)
        if self.load >= self.max_queue:
            raise OverloadedError(
                f"this replica is busy ({self.load} requests in flight, limit {self.max_queue}); retry shortly"
            )
        self._start()
        job.rid = next(self._ids)
        self._waiting.append(job)
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The reader went away: drop the request at the next step boundary."""
        if job.removed or job.cancelled:
            return
        job.cancelled = True
        if job.rid in self._running:
            self._to_cancel.add(job.rid)
            if self._wake is not None:
                self._wake.set()
        # A waiting job is dropped (and marked removed) when the loop reaches it.

    async def run_engine(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the engine thread, between decode steps."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ loop
    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="fleet-batcher")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._waiting:
                self._wake.clear()
                await self._wake.wait()
            if not self._running and len(self._waiting) < self.max_batch_size and self.batch_wait_s > 0:
                # An idle batch waits a moment so that a burst prefills together.
                await asyncio.sleep(self.batch_wait_s)
            admit: list[Job] = []
            while self._waiting and len(self._running) + len(admit) < self.max_batch_size:
                job = self._waiting.popleft()
                if job.cancelled:
                    job._mark_removed()
                    continue
                admit.append(job)
            for job in admit:
                self._running[job.rid] = job
            cancels = [rid for rid in self._to_cancel if rid in self._running]
            self._to_cancel.clear()
            if not self._running:
                continue
            t0 = time.perf_counter()
            try:
                outputs, results = await loop.run_in_executor(
                    self._executor, self._engine_step, admit, cancels
                )
            except Exception as exc:  # the step failed: fail its rows, start over with a fresh batch
                log.exception("decode step failed; failing %d request(s)", len(self._running))
                self._reset(exc)
                continue
            self.engine_s += time.perf_counter() - t0
            for rid in cancels:
                job = self._running.pop(rid, None)
                if job is not None:
                    job._mark_removed()
            self._dispatch(outputs, results)

    def _engine_step(self, admit: list[Job], cancels: list[int]):
        for rid in cancels:
            self._batch.cancel(rid)
        if admit:
            self._batch.add_many(
                [
                    (j.rid, j.prompt_ids, j.slots, j.max_new_tokens, j.temperature, j.top_p, j.stop, j.seed)
                    for j in admit
                ]
            )
        outputs = self._batch.step() if self._batch.active else []
        results = {o.request_id: self._batch.results.pop(o.request_id) for o in outputs if o.finished}
        return outputs, results

    def _dispatch(self, outputs, results) -> None:
        now = time.perf_counter()
        self.steps += 1
        self.tokens += len(outputs)
        self.max_rows_seen = max(self.max_rows_seen, len(outputs))
        if self._on_step is not None and outputs:
            self._on_step(len(outputs))
        for out in outputs:
            job = self._running.get(out.request_id)
            if job is None:
                continue
            job.n_tokens += 1
            if job.first_token_at is None:
                job.first_token_at = now
                self.queue_to_first_token.append(now - job.submitted_at)
            if out.finished:
                del self._running[out.request_id]
                job._mark_removed()
                job.events.put_nowait(Done(results[out.request_id], job.n_tokens))
            else:
                job.events.put_nowait(Token(out.token_id))

    def _reset(self, exc: Exception) -> None:
        error = (
            exc if isinstance(exc, FleetError) else UnavailableError(f"the model failed a decode step: {exc}")
        )
        for job in self._running.values():
            job._mark_removed()
            job.events.put_nowait(Failed(error))
        self._running.clear()
        self._batch = DecodeBatch(self.engine, self.tokenizer)

    def _validate(self, job: Job) -> None:
        """What DecodeBatch would refuse, refused here, per request, before it can fail a shared prefill."""
        if not job.prompt_ids:
            raise ValidationError("the prompt is empty", param="prompt")
        if job.max_new_tokens < 1:
            raise ValidationError("max_tokens must be at least 1 to generate", param="max_tokens")
        if job.temperature < 0 or not 0 < job.top_p <= 1:
            raise ValidationError("need temperature >= 0 and 0 < top_p <= 1", param="temperature")
        if any(not s for s in job.stop):
            raise ValidationError("stop strings must be non-empty", param="stop")
        if not 1 <= len(job.slots) <= 3:
            raise ValidationError(f"a stack has 1 to 3 levels, got {len(job.slots)}")
        limit = self.context_limit or self._batch.max_positions
        if limit and len(job.prompt_ids) + job.max_new_tokens > limit:
            raise ValidationError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_new_tokens}) exceeds the "
                f"context of {limit} tokens",
                param="max_tokens",
            )
