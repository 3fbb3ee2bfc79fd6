"""``FleetModel``: the model deployment. Each replica holds one copy of the base with a LoRA engine,
an adapter cache over its slots and a continuous batcher.

A request arrives from the ingress with its resolved stack (the registry's active versions,
company first) and Serve's multiplexed model id set to a digest of the stack's key, so that
Serve prefers replicas that already hold that stack. Here: register the id with Serve's multiplex cache (which
reports it for routing), pin the stack's adapters (loading what is missing), decode with every
other request in flight, release the pins when the row has left the batch.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from fleet.errors import FleetError, UnsupportedAdapterError
from fleet.lora import AdapterWeights, Generation, prompt_logprobs
from fleet.registry import Registry, StackEntry
from fleet.serve.batcher import Batcher, Done, Failed, Job
from fleet.serve.cache import AdapterCache, Lease
from fleet.serve.metrics import ServeMetrics
from fleet.serve.runtime import build_runtime, config_from_args, token_text
from fleet.store import open_store
from fleet.types import AdapterState

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
        self.batcher = Batcher(
            self.engine,
            self.tokenizer,
            max_batch_size=s.max_batch_size,
            batch_wait_s=s.batch_wait_ms / 1000.0,
            max_queue=s.max_queue,
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
    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request to completion: text, finish reason, token counts, optional log-probs."""
        lease = await self.cache.acquire(_entries(req))
        job: Job | None = None
        try:
            gen, n_tokens, ttft = Generation([], "", "length"), 0, None
            if req["max_tokens"] > 0:
                job = self.batcher.submit(_job(req, lease))
                while True:
                    event = await job.events.get()
                    if isinstance(event, Done):
                        gen, n_tokens = event.generation, event.completion_tokens
                        ttft = (job.first_token_at or job.submitted_at) - job.submitted_at
                        break
                    if isinstance(event, Failed):
                        raise event.error
            logprobs = None
            if req.get("logprobs") is not None:
                logprobs = await self._logprobs(req, lease, gen)
            return {
                "served_by": lease.served_by,
                "fallbacks": len(lease.fallbacks),
                "text": gen.text,
                "finish_reason": gen.finish_reason,
                "completion_tokens": n_tokens,
                "logprobs": logprobs,
                "ttft_s": ttft,
            }
        finally:
            self._release_when_done(job, lease)

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The same, as chunks: ``start`` (who serves it), ``delta`` (text, and the token ids behind
        it), ``end``.

        A stream the ingress resumes on another replica (the first one died) carries ``resume_ids``
        (tokens generated so far) and ``resume_text`` (text already sent): decoding continues from
        there and the client sees one uninterrupted completion. Stop strings are checked here, token
        by token over the whole completion, so one that straddles the resume point is still found.
        """
        resume_ids = [int(t) for t in req.get("resume_ids") or []]
        emitted = str(req.get("resume_text") or "")
        stop = list(req.get("stop") or [])
        longest = max((len(s) for s in stop), default=0)
        remaining = int(req["max_tokens"]) - len(resume_ids)
        lease = await self.cache.acquire(_entries(req))
        job: Job | None = None
        try:
            if remaining > 0:
                prompt = list(req["prompt_ids"]) + resume_ids
                job = self.batcher.submit(
                    _job({**req, "prompt_ids": prompt, "max_tokens": remaining, "stop": []}, lease)
                )
            yield {"type": "start", "served_by": lease.served_by, "fallbacks": len(lease.fallbacks)}
            ids = list(resume_ids)
            checked = len(self.tokenizer.decode(ids)) if ids else 0

            def take(token: int) -> str | None:
                """Add a token; the completion's final text if it now contains a stop string."""
                nonlocal checked
                ids.append(token)
                text = self.tokenizer.decode(ids)
                hit = _first_stop(text, stop, max(0, checked - longest))
                checked = len(text)
                return None if hit is None else text[:hit]

            def end(final: str, reason: str, n_tokens: int) -> dict[str, Any]:
                tail = final[len(emitted) :] if final.startswith(emitted) else ""
                return {"type": "end", "text": tail, "finish_reason": reason, "completion_tokens": n_tokens}

            if job is None:  # resumed right at the length limit
                yield end(self.tokenizer.decode(ids), "length", len(ids))
                return
            while True:
                events = [await job.events.get()]
                while not job.events.empty():
                    events.append(job.events.get_nowait())
                new: list[int] = []
                for event in events:
                    if isinstance(event, Failed):
                        raise event.error
                    if isinstance(event, Done):
                        gen = event.generation
                        for token in gen.token_ids[len(ids) - len(resume_ids) :]:  # the finishing token
                            if (final := take(token)) is not None:
                                yield end(final, "stop", len(ids))
                                return
                        n_tokens = len(resume_ids) + event.completion_tokens
                        yield end(self.tokenizer.decode(ids), gen.finish_reason, n_tokens)
                        return
                    new.append(event.token_id)
                    if (final := take(event.token_id)) is not None:
                        yield end(final, "stop", len(ids))
                        return
                text = self.tokenizer.decode(ids)
                # Text a stop string may still swallow waits. So does a final U+FFFD: it may be an
                # incomplete UTF-8 sequence that the next token completes (lossy decoding turns an
                # incomplete tail into exactly one U+FFFD; earlier ones are final).
                safe = text[: len(text) - longest + 1] if longest > 1 else text
                safe = safe[:-1] if safe.endswith("\ufffd") else safe
                delta = safe[len(emitted) :] if len(safe) > len(emitted) and safe.startswith(emitted) else ""
                emitted += delta
                yield {"type": "delta", "text": delta, "ids": new}
        finally:
            self._release_when_done(job, lease)

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
            "tokens": self.batcher.tokens,
            "max_rows_seen": self.batcher.max_rows_seen,
            "engine_s": self.batcher.engine_s,
            "first_token_p50_s": _quantile(self.batcher.queue_to_first_token, 0.5),
            "first_token_p99_s": _quantile(self.batcher.queue_to_first_token, 0.99),
            "in_flight": self.batcher.load,
        }

    # ------------------------------------------------------------------ internals
    def _release_when_done(self, job: Job | None, lease: Lease) -> None:
        """Unpin the adapters once no batch row reads them any more."""
        if job is None or job.removed:
            self.cache.release(lease)
            return
        self.batcher.cancel(job)
        job.when_removed(lambda: self.cache.release(lease))

    async def _logprobs(self, req: dict[str, Any], lease: Lease, gen: Generation) -> dict[str, Any]:
        """OpenAI's legacy logprobs over the returned tokens (the prompt's too with echo), from one prefill."""
        prompt = list(req["prompt_ids"])
        ids = prompt + list(gen.token_ids)
        k = int(req["logprobs"])
        rows = await self.batcher.run_engine(
            lambda: prompt_logprobs(self.engine, [ids], [lease.slots_L], top_k=k)[0]
        )
        start = 0 if req.get("echo") else len(prompt)
        tokens, token_lp, top, offsets = [], [], [], []
        offset = 0
        for i, row in enumerate(rows):
            text = token_text(self.tokenizer, row["token_id"])
            if i >= start:
                tokens.append(text)
                token_lp.append(row["logprob"])
                top.append(
                    None
                    if row["logprob"] is None
                    else {token_text(self.tokenizer, t["token_id"]): t["logprob"] for t in row["top"]}
                )
                offsets.append(offset)
            offset += len(self.tokenizer.decode([row["token_id"]], skip_special_tokens=True))
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
        """Read, verify (sha256) and parse one version; refuse one that does not fit this engine."""
        files = self.store.read_version(entry.uri, entry.sha256)
        weights = AdapterWeights.from_bytes(files.config, files.weights)
        if weights.rank > self.engine.max_rank:
            raise UnsupportedAdapterError(
                f"adapter {entry.key} has rank {weights.rank}; this deployment's engine holds ranks up to "
                f"{self.engine.max_rank} (lora.rank / tiers.*.schedule.rank)"
            )
        layers = self.engine.layers
        for name, (A, B) in weights.modules().items():
            layer = layers.get(name)
            if layer is None or A.shape[1] != layer.d_in or B.shape[0] != layer.d_out:
                raise UnsupportedAdapterError(f"adapter {entry.key} does not fit this base at {name}")
        return weights

    def _previous(self, entry: StackEntry) -> list[StackEntry]:
        """Earlier versions of the model that were active once and not rolled back, newest first."""
        earlier = [
            v
            for v in self.registry.versions(entry.model_id)
            if v.version < entry.version
            and v.activated_at is not None
            and v.rolled_back_at is None
            and v.state in (AdapterState.ACTIVE, AdapterState.RETIRED)
        ]
        earlier.sort(key=lambda v: (v.activated_at, v.version), reverse=True)
        return [StackEntry(v.model_id, v.version, v.sha256, v.uri, v.rank, v.alpha) for v in earlier]


def _quantile(values, q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None


def _first_stop(text: str, stop: list[str], start: int) -> int | None:
    """Where the earliest stop string begins in ``text[start:]`` (None: nowhere)."""
    hits = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(hits) if hits else None


def _entries(req: dict[str, Any]) -> list[StackEntry]:
    return [StackEntry(**e) for e in req["entries"]]


def _job(req: dict[str, Any], lease: Lease) -> Job:
    return Job(
        prompt_ids=list(req["prompt_ids"]),
        slots=lease.slots_L,
        max_new_tokens=int(req["max_tokens"]),
        temperature=float(req.get("temperature", 0.0)),
        top_p=float(req.get("top_p", 1.0)),
        stop=list(req.get("stop") or []),
        seed=req.get("seed"),
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

    async def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        await self._route()
        return await self.server.generate(req)

    async def stream(self, req: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        await self._route()
        async for chunk in self.server.stream(req):
            yield chunk

    async def stats(self) -> dict[str, Any]:
        return self.server.stats()

    async def check_health(self) -> None:
        if not self.server.batcher.alive():
            raise FleetError("the replica's decode loop has stopped")


__all__ = ["MODEL_DEPLOYMENT", "FleetModel", "ModelServer"]
