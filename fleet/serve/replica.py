"""``FleetModel``: the model deployment. Each replica holds one copy of the base with a LoRA engine,
an adapter cache over its slots and a continuous batcher.

A request arrives from the ingress with its resolved stack (the registry's active versions,
company first) and Serve's multiplexed model id set to a digest of the stack's key, so that
Serve prefers replicas that already hold that stack. Here: register the id with Serve's multiplex cache (which
reports it for routing), pin the stack's adapters (loading what is missing), decode with every
other request in flight, release the pins when the row has left the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from ray import serve

from fleet.errors import FleetError, UnavailableError, UnsupportedAdapterError
from fleet.lora import AdapterWeights
from fleet.registry import Registry, StackEntry
from fleet.serve.batcher import Batcher, Done, Failed, Job, Token
from fleet.serve.cache import AdapterCache, Lease
from fleet.serve.messages import Completion, ReplicaRequest, StreamDelta, StreamEnd, StreamEvent, StreamStart
from fleet.serve.metrics import ServeMetrics
from fleet.serve.runtime import build_runtime, config_from_args, token_text
from fleet.serve.text import TextStream
from fleet.store import open_store

log = logging.getLogger("fleet.serve")
MODEL_DEPLOYMENT = "FleetModel"


class ModelServer:
    """The replica's machinery without Serve around it (tests drive it directly)."""

    def __init__(self, args: dict[str, Any] | None, *, metrics: ServeMetrics | None = None) -> None:
        cfg = config_from_args(args)
        self.cfg = cfg
        self.runtime = build_runtime(cfg)
        self.engine = self.runtime.engine
        self.tokenizer = self.runtime.tokenizer
        self.registry = Registry.open(cfg, migrate=False)
        self.store = open_store(cfg)
        self.metrics = metrics
        s = cfg.serve
        self.stream_messages_per_s = s.stream_messages_per_s
        self.streams = 0  # open streams: they share the message budget
        self.batcher = Batcher(
            self.engine,
            self.tokenizer,
            max_batch_size=s.max_batch_size,
            batch_wait_s=s.batch_wait_ms / 1000.0,
            max_queue=s.max_queue,
            max_inflight=s.max_inflight_per_company,
            inflight_overrides=s.company_inflight_limits,
            step_tokens=s.step_tokens,
            company_share=s.company_batch_share,
            context_limit=self.runtime.context_limit,
            on_step=metrics.batch_size if metrics else None,
        )
        self.cache = AdapterCache(
            capacity=self.engine.capacity,
            fetch=self._fetch,
            apply=lambda evict, loads: self.batcher.run_engine(self._swap_adapters, evict, loads),
            previous=self._previous,
            on_event=metrics.adapter_event if metrics else None,
        )

    # ------------------------------------------------------------------ requests
    async def generate(self, req: ReplicaRequest) -> Completion:
        """One request to completion: text, finish reason, token counts, optional log-probs."""
        lease = await self.cache.acquire(list(req.entries))
        jobs: list[Job] = []
        try:
            text = TextStream(self.tokenizer, list(req.stop))
            token_ids: list[int] = []
            reason, n_tokens, ttft = "length", 0, None
            if req.max_tokens > 0:
                # Token events only when a stop string has to be watched for; else just the end.
                job = self.batcher.submit(_job(req, lease, tokens=bool(text.stop)))
                jobs.append(job)
                while True:
                    event = await job.events.get()
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, Token):
                        text.add([event.token_id])
                        if text.stopped:  # the row leaves at the next step boundary
                            self.batcher.cancel(job)
                            reason, n_tokens = "stop", len(text.ids)
                            break
                        continue
                    gen = event.generation
                    if text.stop:
                        text.add(gen.token_ids[len(text.ids) :])
                    else:  # nothing to watch for: one decode of the whole completion
                        text = TextStream(self.tokenizer, ids=gen.token_ids)
                    reason = "stop" if text.stopped else gen.finish_reason
                    n_tokens = len(text.ids) if text.stopped else event.completion_tokens
                    break
                ttft = (job.first_token_at or job.submitted_at) - job.submitted_at
                token_ids = list(text.ids)
            final = text.finish()
            logprobs = None
            if req.logprobs is not None:
                logprobs = await self._logprobs(req, lease, token_ids, jobs, first=not jobs)
            return Completion(lease.served_by, len(lease.fallbacks), final, reason, n_tokens, logprobs, ttft)
        finally:
            self._release_when_done(jobs, lease)

    async def stream(self, req: ReplicaRequest) -> AsyncIterator[StreamEvent]:
        """The same, as chunks: ``start`` (who serves it), ``delta`` (text, and the token ids behind
        it), ``end``.

        A delta carries every token generated since the previous one. The first text and the end go
        at once; in between, the replica's open streams share a budget of
        ``serve.stream_messages_per_s`` messages: each stream sends at most one per (open streams ÷
        budget) seconds, at most a second apart. Every message costs the replica, the ingress, the
        HTTP proxy and the client about the same whatever it carries, and one message per token
        would cost them more than the model's own decode step; with few streams a message still
        goes per token.

        A stream the ingress resumes on another replica (the first one died) carries ``resume_ids``
        (tokens generated so far) and ``resume_text`` (text already sent): decoding continues from
        there and the client sees one uninterrupted completion. Stop strings are checked here, over
        the whole completion, so one that straddles the resume point is still found.
        """
        resume_ids = list(req.resume_ids)
        remaining = req.max_tokens - len(resume_ids)
        text = TextStream(self.tokenizer, list(req.stop), ids=resume_ids, sent=req.resume_text)
        lease = await self.cache.acquire(list(req.entries))
        jobs: list[Job] = []
        try:
            if remaining > 0 and not text.stopped:
                prompt = (*req.prompt_ids, *resume_ids)
                jobs.append(
                    self.batcher.submit(
                        _job(replace(req, prompt_ids=prompt, max_tokens=remaining), lease, tokens=True)
                    )
                )
            yield StreamStart(lease.served_by, len(lease.fallbacks))

            def end(reason: str, n_tokens: int) -> StreamEnd:
                return StreamEnd(text.rest(), reason, n_tokens)

            if not jobs:  # resumed right at the length limit, or past a stop string not yet sent
                yield end("stop" if text.stopped else "length", len(resume_ids))
                return
            job, new, last_sent = jobs[0], [], None
            self.streams += 1
            try:
                while True:
                    wait = None  # tokens are waiting: at most until this stream's next message is due
                    if new and last_sent is not None:
                        wait = max(0.0, last_sent + self._stream_interval() - time.perf_counter())
                    try:
                        get = job.events.get()
                        events = [await (get if wait is None else asyncio.wait_for(get, wait))]
                    except TimeoutError:
                        events = []
                    while not job.events.empty():
                        events.append(job.events.get_nowait())
                    for event in events:
                        if isinstance(event, Failed):
                            raise event.error
                        if isinstance(event, Done):
                            gen = event.generation
                            text.add(gen.token_ids[len(text.ids) - len(resume_ids) :])  # the finishing token
                            if text.stopped:
                                yield end("stop", len(text.ids))
                            else:
                                yield end(gen.finish_reason, len(resume_ids) + event.completion_tokens)
                            return
                        new.append(event.token_id)
                        text.add([event.token_id])
                        if text.stopped:
                            self.batcher.cancel(job)
                            yield end("stop", len(text.ids))
                            return
                    now = time.perf_counter()
                    if new and (last_sent is None or now - last_sent >= self._stream_interval()):
                        delta = text.sendable()
                        if delta:
                            yield StreamDelta(delta, tuple(new))
                            new = []
                        last_sent = now  # (all held back: a stop string may start here; wait a turn)
            finally:
                self.streams -= 1
        finally:
            self._release_when_done(jobs, lease)

    def _stream_interval(self) -> float:
        return min(1.0, self.streams / self.stream_messages_per_s)

    def stats(self) -> dict[str, Any]:
        st = self.cache.stats
        return {
            "capacity": self.cache.capacity,
            "resident": self.cache.resident(),
            "hits": st.hits,
            "misses": st.misses,
            "loads": st.loads,
            "evictions": st.evictions,
            "fallbacks": st.fallbacks,
            "failed_loads": dict(st.failed_loads),
            "steps": self.batcher.steps,
            "scored": self.batcher.scored,
            "waiting": self.batcher.waiting,
            "tokens": self.batcher.tokens,
            "max_rows_seen": self.batcher.max_rows_seen,
            "engine_s": self.batcher.engine_s,
            "engine_cpu_s": self.batcher.engine_cpu_s,
            "process_cpu_s": time.process_time(),
            "first_token_p50_s": _quantile(self.batcher.queue_to_first_token, 0.5),
            "first_token_p99_s": _quantile(self.batcher.queue_to_first_token, 0.99),
            "in_flight": self.batcher.load,
        }

    # ------------------------------------------------------------------ internals
    def _release_when_done(self, jobs: list[Job], lease: Lease) -> None:
        """Unpin the adapters once no batch row reads them any more (a waiting job leaves at once)."""
        live = [j for j in jobs if not j.removed]
        for j in live:
            self.batcher.cancel(j)
        live = [j for j in live if not j.removed]
        if not live:
            self.cache.release(lease)
            return
        left = [len(live)]

        def one_gone() -> None:
            left[0] -= 1
            if left[0] == 0:
                self.cache.release(lease)

        for j in live:
            j.when_removed(one_gone)

    async def _logprobs(
        self, req: ReplicaRequest, lease: Lease, gen_ids: list[int], jobs: list[Job], *, first: bool
    ) -> dict[str, Any]:
        """OpenAI's legacy logprobs over the returned tokens (the prompt's too with echo), from one prefill.

        The pass waits in the batcher's queue like any request (a scoring request is admitted, or
        refused, there); only the positions returned are scored, with only the top-k asked for.
        """
        prompt = list(req.prompt_ids)
        start = 0 if req.echo else len(prompt)
        if start >= len(prompt) + len(gen_ids):
            return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        job = Job(
            prompt + list(gen_ids), lease.slots_L, 0, company=req.company,
            score_from=start, top_k=int(req.logprobs or 0),
        )  # fmt: skip
        jobs.append(self.batcher.submit(job, admitted=not first))
        event = await job.events.get()
        if isinstance(event, Failed):
            raise event.error
        return await asyncio.to_thread(self._format_logprobs, prompt + list(gen_ids), start, event.rows)

    def _format_logprobs(self, ids: list[int], start: int, rows: list[dict]) -> dict[str, Any]:
        tok = self.tokenizer
        offset = sum(len(t) for t in tok.batch_decode([[i] for i in ids[:start]], skip_special_tokens=True))
        tokens, token_lp, top, offsets = [], [], [], []
        for row in rows:
            tokens.append(token_text(tok, row["token_id"]))
            token_lp.append(row["logprob"])
            top.append(
                None
                if row["logprob"] is None
                else {token_text(tok, t["token_id"]): t["logprob"] for t in row["top"]}
            )
            offsets.append(offset)
            offset += len(tok.decode([row["token_id"]], skip_special_tokens=True))
        return {"tokens": tokens, "token_logprobs": token_lp, "top_logprobs": top, "text_offset": offsets}

    def _swap_adapters(self, evict: list[str], loads: list[tuple[str, AdapterWeights]]) -> list:
        """On the engine thread: unload ``evict``, then load each adapter (its slot, or why it failed)."""
        for key in evict:
            self.engine.unload(key)
        out: list = []
        for key, weights in loads:
            try:
                out.append(self.engine.load(key, weights))
            except Exception as exc:  # one adapter that does not fit must not fail the others
                out.append(exc)
        return out

    def _fetch(self, entry: StackEntry) -> AdapterWeights:
        """Read, verify (sha256) and parse one version; refuse one that does not fit this engine.

        A store failure that is not about the object (permissions, timeouts, a broken connection)
        becomes UnavailableError, so that the cache stands the previous version in, or answers 503.
        """
        try:
            files = self.store.read_version(entry.uri, entry.sha256)
        except FleetError:
            raise
        except Exception as exc:
            log.warning(
                "reading adapter %s from the store failed: %s: %s", entry.key, type(exc).__name__, exc
            )
            raise UnavailableError(f"the adapter store could not be read ({type(exc).__name__})") from None
        weights = AdapterWeights.from_bytes(files.config, files.weights)
        if weights.rank > self.engine.max_rank:
            raise UnsupportedAdapterError(
                f"adapter {entry.key} has rank {weights.rank}; this deployment's engine holds ranks up to "
                f"{self.engine.max_rank} (lora.rank / tiers.*.schedule.rank)"
            )
        self.engine.check(weights)
        return weights

    def _previous(self, entry: StackEntry) -> list[StackEntry]:
        """Earlier versions of the model that were active once and not rolled back, newest first."""
        earlier = [
            v
            for v in self.registry.versions(entry.model_id)
            if v.version < entry.version
            and v.activated_at is not None
            and v.rolled_back_at is None
            and v.state.can_stand_in
        ]
        earlier.sort(key=lambda v: (v.activated_at, v.version), reverse=True)
        return [StackEntry(v.model_id, v.version, v.sha256, v.uri, v.rank, v.alpha) for v in earlier]


def _quantile(values, q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _job(req: ReplicaRequest, lease: Lease, *, tokens: bool) -> Job:
    return Job(
        prompt_ids=list(req.prompt_ids),
        slots=lease.slots_L,
        max_new_tokens=req.max_tokens,
        temperature=float(req.temperature),
        top_p=float(req.top_p),
        seed=req.seed,
        company=req.company,
        tokens=tokens,
    )


@serve.deployment(name=MODEL_DEPLOYMENT)
class FleetModel:
    """The Serve deployment around ``ModelServer`` (one per base model)."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.server = ModelServer(args, metrics=ServeMetrics(MODEL_DEPLOYMENT))
        n = self.server.cfg.serve.adapter_slots

        async def route_only(stack_key: str) -> str:
            # Serve's multiplex cache only records which stacks this replica serves (the router
            # prefers replicas that hold a request's stack); AdapterCache does the loading, per
            # adapter, so that stacks sharing a company adapter share its slot.
            return stack_key

        self._register_stack = serve.multiplexed(max_num_models_per_replica=n)(route_only)

    async def _route(self) -> None:
        stack_key = serve.get_multiplexed_model_id()
        if stack_key:
            await self._register_stack(stack_key)

    async def generate(self, req: ReplicaRequest) -> Completion:
        await self._route()
        return await self.server.generate(req)

    async def stream(self, req: ReplicaRequest) -> AsyncIterator[StreamEvent]:
        await self._route()
        async for chunk in self.server.stream(req):
            yield chunk

    async def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def check_health(self) -> None:
        if not self.server.batcher.alive():
            raise FleetError("the replica's decode loop has stopped")


__all__ = ["MODEL_DEPLOYMENT", "FleetModel", "ModelServer"]
