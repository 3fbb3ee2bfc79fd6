"""Generation through the engine: mixed-adapter batches, continuous batching, prompt log-probs.

``DecodeBatch`` is the serving loop's unit: requests for different adapters join at step
boundaries (their prompts are prefilled and their keys/values copied into the shared cache)
and leave when finished, while the other rows keep decoding undisturbed. ``generate`` is a
``DecodeBatch`` run to completion. Each row samples from its own ``torch.Generator``, so a
seeded request draws the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from fleet.base.loading import context_window
from fleet.base.tokenizer import stop_token_ids
from fleet.errors import ValidationError
from fleet.lora._layer import RowPlan
from fleet.lora._llama import KVCache, check_supported, decode_step, prefill
from fleet.lora.engine import LoraEngine

MAX_LEVELS = 3


@dataclass
class Generation:
    """A finished completion. ``token_ids`` excludes a final EOS; ``text`` excludes a matched stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length" (max_new_tokens)


class StepOutput(NamedTuple):
    request_id: Any
    token_id: int
    finished: bool
    finish_reason: str | None


@dataclass
class _Row:
    request_id: Any
    slots: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    generator: torch.Generator | None
    prompt: list[int] = field(default_factory=list)
    pending: int = -1  # sampled, reported by the next step(), not yet in the cache
    out_ids: list[int] = field(default_factory=list)
    text: str = ""


class DecodeBatch:
    """Continuous batching over one engine: ``add`` requests any time, ``step`` until ``active`` is 0.

    Each ``step()`` reports one token per active row (the one sampled by the previous step or by
    ``add``), retires rows that finished, and runs one decode forward for the rest. Finished
    completions wait in ``results`` (request id → ``Generation``) for the caller to pop. The token
    that finishes a row by EOS is reported with ``finish_reason="stop"`` but is not part of the
    completion. Slots are read at every step: do not unload an adapter a live request uses.

    A decode forward that raises does not take the batch down: every row is rebuilt alone from its
    prompt and the tokens it has so far (one prefill each, the same next token as the failed
    forward would have given), and a row that fails alone leaves the batch with its exception in
    ``failures`` (request id → exception) for the caller to pop. The others go on undisturbed.
    """

    def __init__(
        self, engine: LoraEngine, tokenizer: Any = None, *, eos_token_id: int | Sequence[int] | None = None
    ):
        check_supported(engine.model)
        self.engine = engine
        self.tokenizer = tokenizer
        if eos_token_id is None and tokenizer is not None:
            # Every token that ends a turn (Llama 3's <|eot_id|> as well as its eos).
            eos_token_id = list(stop_token_ids(tokenizer)) or None
        if eos_token_id is None:
            eos_token_id = getattr(engine.model.config, "eos_token_id", None)
        self.eos_ids = (
            set()
            if eos_token_id is None
            else set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id)
        )
        config = engine.model.config
        self.max_positions = context_window(config)
        weight = engine.model.get_input_embeddings().weight
        self._cache = KVCache(engine.model, dtype=weight.dtype, device=weight.device)
        self._rows: list[_Row] = []
        self._ids: set[Any] = set()
        self.results: dict[Any, Generation] = {}
        self.failures: dict[Any, BaseException] = {}
        self._plan: RowPlan | None = None
        self._plan_key: tuple[int, int] | None = None
        self._rows_version = 0

    @property
    def active(self) -> int:
        return len(self._rows)

    def add(
        self,
        request_id: Any,
        prompt_ids: Sequence[int],
        slots_L: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> None:
        """Prefill one request and make it part of the next ``step()``."""
        self.add_many([(request_id, prompt_ids, slots_L, max_new_tokens, temperature, top_p, stop, seed)])

    def add_many(self, requests: Sequence[tuple]) -> None:
        """Prefill several requests in one batched forward; each tuple holds ``add``'s arguments in order."""
        rows, prompts, seen = [], [], set()
        for req in requests:
            request_id, prompt_ids, slots_L, max_new_tokens, *rest = req
            temperature, top_p, stop, seed = (list(rest) + [0.0, 1.0, None, None][len(rest) :])[:4]
            prompt = [int(t) for t in prompt_ids]
            if request_id in seen:
                raise ValidationError(f"request {request_id!r} appears twice")
            seen.add(request_id)
            self._validate(request_id, prompt, slots_L, max_new_tokens, temperature, top_p, stop)
            generator = None
            if temperature > 0:
                generator = torch.Generator()
                generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            slots = [int(s) for s in slots_L] + [-1] * (MAX_LEVELS - len(slots_L))
            rows.append(
                _Row(
                    request_id,
                    slots,
                    int(max_new_tokens),
                    float(temperature),
                    float(top_p),
                    list(stop or []),
                    generator,
                    prompt,
                )
            )
            prompts.append(prompt)
        if not rows:
            return
        plan = self.engine.plan([r.slots for r in rows])  # refuses empty slots before any state changes
        device = self.engine.device
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        t = int(lengths.max())
        ids = torch.zeros(len(prompts), t, dtype=torch.long, device=device)
        for b, p in enumerate(prompts):
            ids[b, : len(p)] = torch.tensor(p, device=device)
        need = max(len(p) + r.max_new_tokens for p, r in zip(prompts, rows, strict=True))
        self._cache.ensure(self._cache.n + len(rows), need)
        with torch.inference_mode(), self.engine.rows(plan):
            logits = prefill(self.engine.model, ids, lengths, self._cache)
        for row, token in zip(rows, _sample(logits, rows), strict=True):
            row.pending = token
        self._rows.extend(rows)
        self._ids.update(seen)
        self._rows_version += 1

    def cancel(self, request_id: Any) -> None:
        """Drop a request without a result (a client went away)."""
        for i, row in enumerate(self._rows):
            if row.request_id == request_id:
                self._remove(i)
                return

    def step(self) -> list[StepOutput]:
        out: list[StepOutput] = []
        done: list[int] = []
        for i, row in enumerate(self._rows):
            reason = self._advance(row)
            out.append(StepOutput(row.request_id, row.pending, reason is not None, reason))
            if reason is not None:
                self.results[row.request_id] = Generation(list(row.out_ids), row.text, reason)
                done.append(i)
        for i in reversed(done):  # swap-remove from the back keeps earlier indices valid
            self._remove(i)
        if self._rows:
            try:
                tokens = torch.tensor([r.pending for r in self._rows], device=self.engine.device)
                with torch.inference_mode(), self.engine.rows(self._current_plan()):
                    logits = decode_step(self.engine.model, tokens, self._cache)
                pending = _sample(logits, self._rows)
            except Exception:
                self._rebuild()
            else:
                for row, token in zip(self._rows, pending, strict=True):
                    row.pending = token
        return out

    def _rebuild(self) -> None:
        """After a failed decode forward: a fresh cache, every row prefilled alone from its prompt and
        its tokens so far. The token the failed forward was feeding is already in ``out_ids``, so
        the prefill's last logits give exactly the next token it would have sampled (with the row's
        own generator, untouched by the failure). Rows that fail alone go to ``failures``."""
        rows = self._rows
        weight = self.engine.model.get_input_embeddings().weight
        self._cache = KVCache(self.engine.model, dtype=weight.dtype, device=weight.device)
        self._rows, self._ids = [], set()
        self._rows_version += 1
        device = self.engine.device
        for row in rows:
            ids = row.prompt + row.out_ids
            try:
                plan = self.engine.plan([row.slots])
                self._cache.ensure(self._cache.n + 1, len(row.prompt) + row.max_new_tokens)
                with torch.inference_mode(), self.engine.rows(plan):
                    logits = prefill(
                        self.engine.model,
                        torch.tensor([ids], device=device),
                        torch.tensor([len(ids)], device=device),
                        self._cache,
                    )
                row.pending = _sample(logits, [row])[0]
            except Exception as exc:
                self.failures[row.request_id] = exc
                continue
            self._rows.append(row)
            self._ids.add(row.request_id)

    # ------------------------------------------------------------------ internals
    def _advance(self, row: _Row) -> str | None:
        """Take the pending token into the completion; return the finish reason if the row is done."""
        token = row.pending
        if token in self.eos_ids:
            return "stop"
        row.out_ids.append(token)
        if self.tokenizer is not None:
            text = self.tokenizer.decode(row.out_ids)
            if row.stop:
                # A stop string may straddle tokens: search from just before the previously seen text.
                start = max(0, len(row.text) - max(len(s) for s in row.stop))
                hits = [i for i in (text.find(s, start) for s in row.stop) if i >= 0]
                if hits:
                    row.text = text[: min(hits)]
                    return "stop"
            row.text = text
        if len(row.out_ids) >= row.max_new_tokens:
            return "length"
        return None

    def _remove(self, i: int) -> None:
        last = len(self._rows) - 1
        self._cache.remove(i)
        self._ids.discard(self._rows[i].request_id)
        self._rows[i] = self._rows[last]
        self._rows.pop()
        self._rows_version += 1

    def _current_plan(self) -> RowPlan:
        key = (self.engine.version, self._rows_version)
        if self._plan is None or self._plan_key != key:
            self._plan = self.engine.plan([r.slots for r in self._rows])
            self._plan_key = key
        return self._plan

    def _validate(self, request_id, prompt, slots_L, max_new_tokens, temperature, top_p, stop) -> None:
        if request_id in self._ids:
            raise ValidationError(f"request {request_id!r} is already in this batch")
        if not prompt:
            raise ValidationError("a prompt needs at least one token")
        if not 1 <= len(slots_L) <= MAX_LEVELS:
            raise ValidationError(
                f"slots_L lists 1 to {MAX_LEVELS} slots (company, team, individual), got {list(slots_L)}"
            )
        if max_new_tokens < 1:
            raise ValidationError(f"max_new_tokens must be ≥ 1, got {max_new_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValidationError(f"need temperature ≥ 0 and 0 < top_p ≤ 1 (got {temperature}, {top_p})")
        if stop and self.tokenizer is None:
            raise ValidationError("stop strings need a tokenizer to turn tokens into text")
        if stop and any(not s for s in stop):
            raise ValidationError("stop strings must be non-empty")
        if self.max_positions and len(prompt) + max_new_tokens > self.max_positions:
            raise ValidationError(
                f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the base model's "
                f"context of {self.max_positions} tokens"
            )


def _sample(logits_BV: torch.Tensor, rows: Sequence[_Row]) -> list[int]:
    """Greedy rows take the argmax; the others sample from temperature/top-p with their own generator."""
    logits_BV = logits_BV.float()
    tokens = logits_BV.argmax(-1)
    sampled = [i for i, r in enumerate(rows) if r.temperature > 0]
    if sampled:
        idx = torch.tensor(sampled, device=logits_BV.device)
        temps = torch.tensor([rows[i].temperature for i in sampled], device=logits_BV.device)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits_BV.device)
        probs = torch.softmax(logits_BV[idx] / temps[:, None], dim=-1)
        p_sorted, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the most likely token always stays).
        p_sorted = p_sorted * ((p_sorted.cumsum(-1) - p_sorted) < top_p[:, None])
        cum = p_sorted.cumsum(-1)
        # One uniform per row from the row's own generator: draws do not depend on the batch.
        u = torch.tensor(
            [float(torch.rand((), generator=rows[i].generator)) for i in sampled], device=cum.device
        )
        choice = torch.searchsorted(cum, (u * cum[:, -1])[:, None], right=True).clamp_(max=cum.shape[1] - 1)
        tokens[idx] = order.gather(1, choice)[:, 0]
    return tokens.tolist()


def _encode(tokenizer: Any, prompts: Sequence) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise ValidationError("text prompts need a tokenizer")
            p = tokenizer.encode(p)
        out.append([int(t) for t in p])
    return out


def _slot_rows(slots_BL: Any, n: int) -> list[list[int]]:
    s = torch.as_tensor(slots_BL, dtype=torch.long).to("cpu")
    if s.dim() == 1:
        s = s[:, None]
    if s.shape[0] != n:
        raise ValidationError(f"{n} prompts but {s.shape[0]} rows of slots")
    return s.tolist()


def generate(
    engine: LoraEngine,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]] | Sequence[str],
    slots_BL: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> list[Generation]:
    """Complete every prompt with its row's adapter stack; row i samples with seed ``seed + i``."""
    ids = _encode(tokenizer, prompts)
    slots = _slot_rows(slots_BL, len(ids))
    batch = DecodeBatch(engine, tokenizer, eos_token_id=eos_token_id)
    batch.add_many([
        (i, p, s, max_new_tokens, temperature, top_p, stop, None if seed is None else seed + i)
        for i, (p, s) in enumerate(zip(ids, slots, strict=True))
    ])  # fmt: skip
    while batch.active:
        batch.step()
    return [batch.results.pop(i) for i in range(len(ids))]


def prompt_logprobs(
    engine: LoraEngine,
    prompts: Sequence[Sequence[int]],
    slots_BL: Any,
    *,
    top_k: int,
    start: Sequence[int] | None = None,
    chunk: int = 256,
) -> list[list[dict]]:
    """Per prompt token from ``start[b]`` on (default 0): ``{"token_id", "logprob", "top": [{"token_id",
    "logprob"}]}``; the first token of a prompt has ``logprob`` None and an empty ``top``.

    ``top`` holds the ``top_k`` most likely tokens at that position (none for ``top_k`` 0). The LM
    head and the softmax run only at the positions asked for, ``chunk`` positions at a time, so the
    memory a request costs is bounded by ``chunk × vocabulary``, not by its length.
    """
    check_supported(engine.model)
    ids = _encode(None, prompts)
    slots = _slot_rows(slots_BL, len(ids))
    if any(not p for p in ids):
        raise ValidationError("a prompt needs at least one token")
    if top_k < 0:
        raise ValidationError(f"top_k must be ≥ 0, got {top_k}")
    starts = [0] * len(ids) if start is None else [max(0, int(s)) for s in start]
    if len(starts) != len(ids):
        raise ValidationError(f"{len(ids)} prompts but {len(starts)} start positions")
    device = engine.device
    lengths = torch.tensor([len(p) for p in ids], device=device)
    t = int(lengths.max())
    ids_BT = torch.zeros(len(ids), t, dtype=torch.long, device=device)
    for b, p in enumerate(ids):
        ids_BT[b, : len(p)] = torch.tensor(p, device=device)
    # Token j (j >= 1) is predicted by position j-1: gather those positions' hidden states only.
    where = [(b, j) for b, p in enumerate(ids) for j in range(max(1, starts[b]), len(p))]
    chosen: list[float] = []
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    k = min(top_k, engine.model.config.vocab_size)
    with torch.inference_mode(), engine.rows(slots):
        h_BTD = prefill(engine.model, ids_BT, lengths, None, hidden=True)
        lm_head = engine.model.get_output_embeddings()
        for c in range(0, len(where), chunk):
            part = where[c : c + chunk]
            b_P = torch.tensor([b for b, _ in part], device=device)
            j_P = torch.tensor([j for _, j in part], device=device)
            logp_PV = torch.log_softmax(lm_head(h_BTD[b_P, j_P - 1]).float(), dim=-1)
            chosen += logp_PV.gather(1, ids_BT[b_P, j_P][:, None])[:, 0].tolist()
            if k:
                v, i = logp_PV.topk(k, dim=-1)
                top_v += v.tolist()
                top_i += i.tolist()
    out: list[list[dict]] = [[] for _ in ids]
    for b, p in enumerate(ids):
        if starts[b] == 0:
            out[b].append({"token_id": p[0], "logprob": None, "top": []})
    for n, (b, j) in enumerate(where):
        top = [{"token_id": i, "logprob": v} for i, v in zip(top_i[n], top_v[n], strict=True)] if k else []
        out[b].append({"token_id": ids[b][j], "logprob": chosen[n], "top": top})
    return out
