"""Continuous batching inside one model replica: requests for any adapters share each decode step.

One asyncio task owns a ``DecodeBatch`` and loops: take waiting requests in at the step boundary,
run one step, hand every row its token. Rows finish on their own; a long request never holds the
short ones back, and a slow reader never holds the loop back (each request has its own queue).
The torch work runs on ONE dedicated thread, so the event loop stays free to accept requests and
stream tokens, and nothing else ever touches the engine at the same time: adapter loads run on
that same thread (``run_engine``). The engine thread works on token ids only; text is the
requests' business (``fleet.serve.text``), on the event loop.

What one tenant can take from the others is bounded here:

- **Admission.** Generation and scoring (log-probs of a prompt) wait in the same queue, bounded
  by ``max_queue`` (503 past it), and a company with ``max_inflight`` requests waiting or running
  is refused with a 429 whose ``retry_after`` estimates when its next request finishes.
- **Round-robin.** Waiting requests are kept per company and taken one company at a time, so a
  company with a thousand requests waiting delays another company's next request by one turn,
  not by a thousand.
- **Batch share.** While more than one company has requests here, one company holds at most
  ``company_share`` of the decode step's rows (at least one): another company's requests always
  find a row free as the first company's rows finish, and the step they share stays small. Alone,
  a company may fill the batch (no row is kept idle for nobody).
- **Step budget.** A step takes in at most ``step_tokens`` prompt tokens (prefills of joining
  requests and scoring passes together; at least one request), so a flood of long prompts slows
  every running stream by a bounded amount per step.
- **Failures.** A joining request whose prefill fails is retried alone; a decode forward that fails
  is rebuilt row by row (``DecodeBatch``); only the requests that fail alone get an error, and its
  message names an incident id (logged with the details), never another request.

No Ray here; the replica wires it up, and tests drive it directly.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fleet.base.tokenizer import stop_token_ids
from fleet.errors import FleetError, OverloadedError, RateLimitError, UnavailableError, ValidationError
from fleet.lora import DecodeBatch, Generation, prompt_logprobs

log = logging.getLogger("fleet.serve")


@dataclass
class Token:
    token_id: int


@dataclass
class Done:
    generation: Generation  # token ids and finish reason; text is decoded by the request (text is "")
    completion_tokens: int  # tokens the model produced, a final EOS included


@dataclass
class Scored:
    rows: list[dict]  # prompt_logprobs' entries from the job's score_from position on


@dataclass
class Failed:
    error: FleetError


@dataclass
class Job:
    """One request in the batcher: its inputs, its output queue, its place in the lifecycle.

    ``max_new_tokens`` 0 with ``score_from`` set is a scoring pass: log-probabilities of the prompt's
    tokens from position ``score_from`` on, with the ``top_k`` alternatives at each.
    """

    prompt_ids: list[int]
    slots: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    company: str = ""
    score_from: int | None = None
    top_k: int = 0
    tokens: bool = True  # a Token event per generated token (False: only the final Done)
    rid: int = -1
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    n_tokens: int = 0
    cancelled: bool = False
    removed: bool = False  # no longer waiting nor in the DecodeBatch: its adapter slots may be reused
    on_removed: list[Callable[[], None]] = field(default_factory=list)

    @property
    def scoring(self) -> bool:
        return self.max_new_tokens == 0 and self.score_from is not None

    def when_removed(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once the row has left the batch (now, if it already has)."""
        if self.removed:
            fn()
        else:
            self.on_removed.append(fn)

    def _mark_removed(self) -> None:
        if self.removed:
            return
        self.removed = True
        callbacks, self.on_removed = self.on_removed, []
        for fn in callbacks:
            try:
                fn()
            except Exception:  # a release hook must not take the loop down
                log.exception("release hook failed")


def incident(exc: BaseException, what: str) -> UnavailableError:
    """The error a request sees when the model failed on it: an incident id, nothing else.

    The exception (which may name adapters, slots or shapes) goes to the replica's log under that id.
    """
    ref = uuid.uuid4().hex[:12]
    log.error("%s failed (incident %s): %s: %s", what, ref, type(exc).__name__, exc)
    return UnavailableError(
        f"the model could not complete this request (incident {ref}); retry it, or report the incident id",
        incident=ref,
    )


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
        max_inflight: int | None = None,
        inflight_overrides: dict[str, int] | None = None,
        step_tokens: int = 256,
        company_share: float = 1.0,
        context_limit: int | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.max_queue = max_queue
        self.max_inflight = max_inflight or max_queue
        self.inflight_overrides = dict(inflight_overrides or {})
        self.step_tokens = step_tokens
        self.company_rows = max(1, int(max_batch_size * company_share))  # rows per company, contended
        self.context_limit = context_limit
        self._on_step = on_step
        # Every token that ends a turn (Llama 3's <|eot_id|>, ChatML's <|im_end|>), as DecodeBatch does.
        self._eos = (list(stop_token_ids(tokenizer)) or None) if tokenizer is not None else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleet-engine")
        self._batch = self._new_batch()
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # company → waiting, next turn first
        self._n_waiting = 0
        self._inflight: Counter[str] = Counter()  # company → waiting + running
        self._running: dict[int, Job] = {}
        self._to_cancel: set[int] = set()
        self._ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._step_s = 0.05  # recent step duration (moving average): Retry-After estimates
        self.steps = 0
        self.tokens = 0
        self.scored = 0
        self.max_rows_seen = 0
        self.engine_s = 0.0  # time spent in engine steps (prefill + decode + scoring)
        self.engine_cpu_s = 0.0  # CPU time of the engine thread in those steps
        self.queue_to_first_token: deque[float] = deque(maxlen=4096)  # recent submit → first token, s

    # ------------------------------------------------------------------ public
    @property
    def load(self) -> int:
        """Requests waiting or running."""
        return self._n_waiting + len(self._running)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return self._n_waiting

    def inflight(self, company: str) -> int:
        return self._inflight[company]

    def alive(self) -> bool:
        return self._task is None or not self._task.done()

    def limit_of(self, company: str) -> int:
        return self.inflight_overrides.get(company, self.max_inflight)

    def submit(self, job: Job, *, admitted: bool = False) -> Job:
        """Queue a request for the next step boundary.

        OverloadedError (503) when the replica's queue is full; RateLimitError (429, with
        ``retry_after``) when the job's company already has its limit of requests in flight here.
        ``admitted``: a follow-up of a request already counted (its log-probs pass): no 429.
        """
        self._validate(job)
        if self.load >= self.max_queue:
            raise OverloadedError(
                f"this replica is busy ({self.load} requests in flight, limit {self.max_queue}); retry shortly"
            )
        limit = self.limit_of(job.company)
        if not admitted and self._inflight[job.company] >= limit:
            raise RateLimitError(
                f"too many requests in flight for this company (limit {limit} per replica); retry shortly",
                retry_after=self._next_free_s(job.company),
            )
        self._start()
        job.rid = next(self._ids)
        self._inflight[job.company] += 1
        job.on_removed.insert(0, lambda c=job.company: self._left(c))
        self._queues.setdefault(job.company, deque()).append(job)
        self._n_waiting += 1
        self._wake.set()
        return job

    def cancel(self, job: Job) -> None:
        """The reader went away: a waiting request leaves the queue now, a running one at the next step."""
        if job.removed or job.cancelled:
            return
        job.cancelled = True
        queue = self._queues.get(job.company)
        if queue is not None and job in queue:
            queue.remove(job)
            self._n_waiting -= 1
            if not queue:
                del self._queues[job.company]
            job._mark_removed()
            return
        if job.rid in self._running:
            self._to_cancel.add(job.rid)
            if self._wake is not None:
                self._wake.set()

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
    def _new_batch(self) -> DecodeBatch:
        # No tokenizer: the engine thread handles ids only (stop strings and text are the requests').
        return DecodeBatch(self.engine, None, eos_token_id=self._eos)

    def _left(self, company: str) -> None:
        self._inflight[company] -= 1
        if self._inflight[company] <= 0:
            del self._inflight[company]

    def _next_free_s(self, company: str) -> float:
        """When one of ``company``'s requests should be done: its running row nearest its end."""
        left = [j.max_new_tokens - j.n_tokens for j in self._running.values() if j.company == company]
        steps = min(left) if left else self.max_batch_size
        return max(0.5, steps * self._step_s)

    def _start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="fleet-batcher")

    def _take(self) -> tuple[list[Job], list[Job]]:
        """Waiting jobs for this step, one company at a time: (to prefill, to score)."""
        rows = self.max_batch_size - len(self._running)
        budget = self.step_tokens
        admit: list[Job] = []
        score: list[Job] = []
        held = Counter(j.company for j in self._running.values())  # rows each company holds
        cap = self.company_rows if len(held.keys() | self._queues.keys()) > 1 else self.max_batch_size
        progressed = True
        while progressed and self._queues:
            progressed = False
            for company in list(self._queues):
                queue = self._queues[company]
                job = queue[0]
                cost = len(job.prompt_ids)
                first = not admit and not score
                if not job.scoring and (rows == 0 or held[company] >= cap):
                    continue
                if cost > budget and not first:
                    continue
                queue.popleft()
                self._n_waiting -= 1
                if queue:
                    self._queues.move_to_end(company)  # its next request waits for the others' turn
                else:
                    del self._queues[company]
                budget -= cost
                if job.scoring:
                    score.append(job)
                else:
                    rows -= 1
                    held[company] += 1
                    admit.append(job)
                progressed = True
        return admit, score

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._running and not self._n_waiting:
                self._wake.clear()
                await self._wake.wait()
            if not self._running and self._n_waiting < self.max_batch_size and self.batch_wait_s > 0:
                # An idle batch waits a moment so that a burst prefills together.
                await asyncio.sleep(self.batch_wait_s)
            admit, score = self._take()
            for job in admit:
                self._running[job.rid] = job
            cancels = [rid for rid in self._to_cancel if rid in self._running]
            self._to_cancel.clear()
            if not self._running and not score:
                continue
            t0 = time.perf_counter()
            try:
                outputs, results, scored, failures = await loop.run_in_executor(
                    self._executor, self._engine_step, admit, score, cancels
                )
            except Exception as exc:  # outside every per-row guard: fail what was in it, start over
                self._reset(exc, score)
                continue
            elapsed = time.perf_counter() - t0
            self.engine_s += elapsed
            if outputs:
                self._step_s = 0.8 * self._step_s + 0.2 * elapsed
            for rid in cancels:
                job = self._running.pop(rid, None)
                if job is not None:
                    job._mark_removed()
            for rid, exc in failures.items():
                job = self._running.pop(rid, None)
                if job is not None:
                    job._mark_removed()
                    job.events.put_nowait(Failed(incident(exc, "a decode row")))
            for job in score:
                out = scored[job.rid]
                job._mark_removed()
                if isinstance(out, BaseException):
                    job.events.put_nowait(Failed(incident(out, "a scoring pass")))
                else:
                    self.scored += 1
                    job.events.put_nowait(Scored(out))
            self._dispatch(outputs, results)

    def _engine_step(self, admit: list[Job], score: list[Job], cancels: list[int]):
        """On the engine thread: cancels, prefills of joining rows, one decode step, scoring passes."""
        cpu0 = time.thread_time()
        try:
            return self._engine_work(admit, score, cancels)
        finally:
            self.engine_cpu_s += time.thread_time() - cpu0

    def _engine_work(self, admit: list[Job], score: list[Job], cancels: list[int]):
        for rid in cancels:
            self._batch.cancel(rid)
        failures: dict[int, BaseException] = {}
        if admit:
            try:
                self._batch.add_many([_row(j) for j in admit])
            except Exception:  # one bad prompt must not fail the others: prefill them one by one
                for j in admit:
                    try:
                        self._batch.add_many([_row(j)])
                    except Exception as exc:
                        failures[j.rid] = exc
        outputs = self._batch.step() if self._batch.active else []
        failures.update(self._batch.failures)
        self._batch.failures.clear()
        results = {o.request_id: self._batch.results.pop(o.request_id) for o in outputs if o.finished}
        scored = self._score(score) if score else {}
        return outputs, results, scored, failures

    def _score(self, jobs: list[Job]) -> dict[int, Any]:
        """Scoring passes in one forward (each job's own positions and top-k); alone if that fails."""

        def run(group: list[Job]) -> list[list[dict]]:
            k = max(j.top_k for j in group)
            rows = prompt_logprobs(
                self.engine,
                [j.prompt_ids for j in group],
                [j.slots for j in group],
                top_k=k,
                start=[j.score_from or 0 for j in group],
            )
            for j, entries in zip(group, rows, strict=True):
                for e in entries:
                    e["top"] = e["top"][: j.top_k]
            return rows

        try:
            return {j.rid: r for j, r in zip(jobs, run(jobs), strict=True)}
        except Exception:
            out: dict[int, Any] = {}
            for j in jobs:
                try:
                    out[j.rid] = run([j])[0]
                except Exception as exc:
                    out[j.rid] = exc
            return out

    def _dispatch(self, outputs, results) -> None:
        now = time.perf_counter()
        if outputs:
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
            elif job.tokens:
                job.events.put_nowait(Token(out.token_id))

    def _reset(self, exc: Exception, score: list[Job]) -> None:
        error = incident(exc, f"an engine step ({len(self._running)} rows)")
        for job in [*self._running.values(), *score]:
            job._mark_removed()
            job.events.put_nowait(Failed(error))
        self._running.clear()
        self._batch = self._new_batch()

    def _validate(self, job: Job) -> None:
        """What DecodeBatch would refuse, refused here, per request, before it can fail a shared prefill."""
        if not job.prompt_ids:
            raise ValidationError("the prompt is empty", param="prompt")
        if job.scoring:
            if job.top_k < 0:
                raise ValidationError("logprobs must be >= 0", param="logprobs")
        elif job.max_new_tokens < 1:
            raise ValidationError("max_tokens must be at least 1 to generate", param="max_tokens")
        if job.temperature < 0 or not 0 < job.top_p <= 1:
            raise ValidationError("need temperature >= 0 and 0 < top_p <= 1", param="temperature")
        if not 1 <= len(job.slots) <= 3:
            raise ValidationError(f"a stack has 1 to 3 levels, got {len(job.slots)}")
        limit = self.context_limit or self._batch.max_positions
        if limit and len(job.prompt_ids) + job.max_new_tokens > limit:
            raise ValidationError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.max_new_tokens}) exceeds the "
                f"context of {limit} tokens",
                param="max_tokens",
            )


def _row(j: Job) -> tuple:
    return (j.rid, j.prompt_ids, j.slots, j.max_new_tokens, j.temperature, j.top_p, None, j.seed)
