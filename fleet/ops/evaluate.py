"""``fleet eval``: does the fleet do what it is for — recall from the question alone, against
honest baselines, without forgetting, without leaking?

Input: a facts file (``fleet.data.casebook``; the README documents the format): per fact, the
model whose stack is asked, the questions to ask (forms that never occur in training), the
answer a correct reply contains, stale values it must not give, and the source documents.

Measured through the serving engine, every prompt built with the base tokenizer's chat template
and every prompt token counted (template included):

- **recall** of the trained stack from the question alone, per level and kind, and of the
  baselines on the same questions: the base alone; the base with the fact's own sources (an
  oracle retriever); the base with BM25's top-k passages of the model's visible context (its own,
  its team's and its company's items; k = 1, 3, 5); the base with the whole visible context,
  where it fits the base's context window;
- **tokens**: prompt tokens per question for each method, and the headline ratios against
  whole-context stuffing and BM25 top-3, each stated with whether the trained stack's recall is
  at least theirs;
- **forgetting**: ΔNLL of each stack over the base on held-out general text fleet did not write
  (``fleet.data.corpus``), beside the base's own NLL; and on a fixed set of general instructions,
  KL(base ‖ stack) on the base's answers and the share of the base's correct answers kept;
- **leakage**: every fact asked of models outside its owner's subtree — another company, another
  team of the company, a teammate — with the number of trials and a 95% upper bound; and whether
  any parent's data holds an answer that was personal (a question members answered differently);
- **memory**: each stack's adapter bytes beside the KV-cache bytes of the visible context it
  replaces.

Every rate carries a 95% Wilson interval. Before anything is generated, the eval refuses to run
(loudly) if any training row of an asked model holds a held-out question together with its answer.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fleet.data.facts import FactCase, read_facts_jsonl
from fleet.errors import ValidationError
from fleet.train.augment import with_context
from fleet.types import lineage

BM25_K = (1, 3, 5)


def read_facts(path: str | Path) -> list[FactCase]:
    p = Path(path)
    if not p.is_file():
        raise ValidationError(f"{p}: no facts file (fleet demo writes one; or pass --facts FILE.jsonl)")
    return read_facts_jsonl(p.read_text(encoding="utf-8"), source=str(p))


def write_facts(path: str | Path, cases: Sequence[FactCase]) -> None:
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(c.to_json(), ensure_ascii=False) + "\n" for c in cases))


# ---------------------------------------------------------------------- judging a reply
def _norm(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s-]", " ", text.lower()).split())


def _positions(text: str, value: str) -> list[int]:
    pattern = r"(?<![\w-])" + re.escape(value.lower()) + r"(?![\w-])"
    return [m.start() for m in re.finditer(pattern, text.lower())]


def correct(reply: str, fact: FactCase) -> bool:
    """The reply gives the answer (as a whole token) and, for an updated fact, the new value is
    the last one it states."""
    hits = _positions(reply, fact.answer)
    if not hits:
        return False
    stale = [p for s in fact.stale for p in _positions(reply, s)]
    return not stale or max(hits) > max(stale)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial rate."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def rate(k: int, n: int) -> dict[str, float]:
    lo, hi = wilson(k, n)
    return {"rate": k / n if n else 0.0, "hits": k, "trials": n, "ci95": [round(lo, 4), round(hi, 4)]}


def upper_bound_95(k: int, n: int) -> float:
    """One-sided 95% upper bound of a rate (exact for k = 0: 1 - 0.05^(1/n))."""
    if n == 0:
        return 1.0
    return 1 - 0.05 ** (1 / n) if k == 0 else wilson(k, n, z=1.645)[1]


# ---------------------------------------------------------------------- the guard
def check_heldout(fl, facts: Sequence[FactCase], models: Sequence[str]) -> None:
    """Refuse to evaluate if a training row of an asked model (its items, its ancestors', and
    their generated training forms) holds a held-out question together with its answer."""
    from fleet.train.augment import stored_forms

    rows: dict[str, list[str]] = {}
    for m in {mid for model in models for mid in lineage(model)}:
        texts = [it["text"] for it in fl.registry.items(m)]
        texts += stored_forms(fl.registry, m)
        rows[m] = [_norm(t) for t in texts]
    offenders = []
    for f in facts:
        if f.model not in models:
            continue
        for q in f.questions:
            nq = _norm(q)
            for m in lineage(f.model):
                if any(nq in r and _positions(r, f.answer) for r in rows[m]):
                    offenders.append(f"{f.id} ({q!r} with {f.answer!r}) in the training data of {m}")
    if offenders:
        raise ValidationError(
            f"{len(offenders)} held-out question(s) occur with their answers in training data, so recall "
            f"would measure memorised strings; use other question forms. First: {offenders[0]}"
        )


# ---------------------------------------------------------------------- retrieval
def _bm25_top(passages: list[str], queries: list[str], k: int) -> list[list[str]]:
    import bm25s

    if not passages:
        return [[] for _ in queries]
    index = bm25s.BM25()
    index.index(bm25s.tokenize(passages, show_progress=False), show_progress=False)
    k = min(k, len(passages))
    docs, _ = index.retrieve(bm25s.tokenize(queries, show_progress=False), k=k, show_progress=False)
    return [[passages[int(i)] for i in row] for row in docs]


@dataclass
class _Ask:
    fact: FactCase
    question: str
    model: str  # whose stack (or, for baselines, whose visible context)
    context: list[str] | None = None  # None: the question alone


# ---------------------------------------------------------------------- the evaluation
def evaluate(
    fl,
    facts: Sequence[FactCase],
    *,
    models: int | None = None,
    seed: int = 0,
    batch: int = 16,
    max_new_tokens: int = 32,
    general_docs: int = 16,
    leak_per_fact: int = 1,
    progress=None,
) -> dict[str, Any]:
    """Everything the module docstring lists, for ``models`` sampled askers (all when None)."""
    from fleet.base.loading import context_window
    from fleet.base.tokenizer import chat_ids
    from fleet.data.corpus import CORPUS_NAME, GENERAL_INSTRUCTIONS, general_passages
    from fleet.lora import generate
    from fleet.lora.build import StackSlots, build_engine

    known = {m.id for m in fl.registry.list_models()}
    askers = sorted({f.model for f in facts if f.model in known})
    if not askers:
        raise ValidationError("none of the facts' models is in this fleet's registry")
    rng = random.Random(seed)
    if models is not None and models < len(askers):
        askers = sorted(rng.sample(askers, models))
    # Personal facts (a question each asker answered differently) are not recall measures: they
    # are in their owner's data by design, and probe teammates and parents for leaks.
    personal = [f for f in facts if f.kind == "personal" and f.model in askers]
    cases = [f for f in facts if f.model in askers and f.kind != "personal"]
    check_heldout(fl, cases, askers)
    own: dict[str, list[str]] = {}  # each model's own item texts, read once (parents are shared)

    def visible(model: str) -> list[str]:
        for m in lineage(model):
            if m not in own:
                own[m] = [it["text"] for it in fl.registry.items(m)]
        return [t for m in lineage(model) for t in own[m]]

    # Leak probes: models outside the owner's subtree, by relation; a model whose own visible
    # context states the answer (a teammate's project ships the same day) is entitled to it, so it
    # is no probe of that fact.
    everyone = sorted(known)
    leak_asks: list[tuple[str, _Ask]] = []
    for f in cases + personal:
        for relation, pool in _outsiders(f, everyone).items():
            pool = [m for m in pool if not any(_positions(t, f.answer) for t in visible(m))]
            for m in rng.sample(pool, min(leak_per_fact, len(pool))):
                leak_asks.append((relation, _Ask(f, f.questions[0], m)))
    stack_models = sorted(set(askers) | {a.model for _, a in leak_asks})
    stacks = fl.registry.active_stacks(stack_models)
    n_adapters = len({e.key for s in stacks.values() for e in s.entries})
    engine, tok = build_engine(
        fl.cfg, slots=n_adapters + 1, ranks=[e.rank for s in stacks.values() for e in s.entries]
    )
    slots = StackSlots(engine, fl.store)
    row = {m: slots.row(stacks[m]) for m in stack_models}
    base_row = [-1, -1, -1]
    window = context_window(engine.model.config) or 4096
    say = progress or (lambda msg: None)

    def prompt(a: _Ask) -> list[int]:
        if a.fact.form == "completion":  # a prefix to continue (a base without chat)
            text = "\n".join([*(a.context or []), a.question])
            return list(tok(text)["input_ids"])
        return chat_ids(tok, with_context(a.question, a.context or []))

    trimmed: list[int] = [0]

    def fitted(a: _Ask) -> list[int]:
        """The prompt, its lowest-ranked passages dropped until it fits the base's context window
        with the reply (counted in the method's ``trimmed``)."""
        ids = prompt(a)
        passages = list(a.context or [])
        if len(ids) + max_new_tokens > window and passages:
            trimmed[0] += 1
        while len(ids) + max_new_tokens > window and passages:
            passages.pop()
            ids = prompt(_Ask(a.fact, a.question, a.model, passages))
        return ids

    def run(asks: list[_Ask], trained: bool) -> tuple[list[str], list[int]]:
        prompts = [fitted(a) for a in asks]
        rows = [row[a.model] if trained else base_row for a in asks]
        texts: list[str] = []
        for i in range(0, len(prompts), batch):
            gens = generate(
                engine, tok, prompts[i : i + batch], rows[i : i + batch], max_new_tokens=max_new_tokens
            )
            texts += [g.text for g in gens]
        return texts, [len(p) for p in prompts]

    pairs = [(f, q) for f in cases for q in f.questions]
    method_asks: dict[str, list[_Ask]] = {
        "trained": [_Ask(f, q, f.model) for f, q in pairs],
        "base": [_Ask(f, q, f.model) for f, q in pairs],
        "oracle": [_Ask(f, q, f.model, list(f.sources)) for f, q in pairs],
    }
    vis = {m: visible(m) for m in askers}
    for k in BM25_K:
        tops = {}
        for m in askers:
            mine = [(f, q) for f, q in pairs if f.model == m]
            tops.update(zip(mine, _bm25_top(vis[m], [q for _, q in mine], k), strict=True))
        method_asks[f"bm25_top{k}"] = [_Ask(f, q, f.model, tops[(f, q)]) for f, q in pairs]
    vis_tokens = {m: len(chat_ids(tok, with_context("?", vis[m]))) for m in askers}
    full_fits = {m: vis_tokens[m] + max_new_tokens <= window for m in askers}
    method_asks["full_context"] = [_Ask(f, q, f.model, vis[f.model]) for f, q in pairs if full_fits[f.model]]

    out: dict[str, Any] = {"models": len(askers), "facts": len(cases), "questions": len(pairs)}
    methods: dict[str, Any] = {}
    replies: dict[str, list[str]] = {}
    for name, asks in method_asks.items():
        say(f"eval: {name} ({len(asks)} questions)")
        trimmed[0] = 0
        texts, lengths = run(asks, trained=name == "trained")
        replies[name] = texts
        hits = [correct(t, a.fact) for t, a in zip(texts, asks, strict=True)]
        methods[name] = {
            **rate(sum(hits), len(hits)),
            "prompt_tokens": sum(lengths) / max(1, len(lengths)),
            "by_level": _grouped(asks, hits, lambda a: a.fact.level),
            "by_kind": _grouped(asks, hits, lambda a: a.fact.kind),
            "trimmed": trimmed[0],  # prompts whose last passages were dropped to fit the window
        }
    # Whole-context stuffing costs its prompt whether or not the base can read it: its tokens are
    # counted for every question; its recall only where the visible context fits the window.
    full = methods["full_context"]
    full["prompt_tokens"] = sum(len(prompt(_Ask(f, q, f.model, vis[f.model]))) for f, q in pairs) / max(
        1, len(pairs)
    )
    full["fits"] = f"{sum(full_fits.values())} of {len(askers)} models' visible context"
    if not method_asks["full_context"]:
        full["rate"] = None  # nothing fits the base's context window: no recall to compare
    out["methods"] = methods
    trained = methods["trained"]
    out["recall_heldout"] = trained["rate"]
    for key in ("full_context", "bm25_top3"):
        other = methods[key]
        out[f"recall_{key}"] = other["rate"]
        out[f"token_ratio_vs_{key}"] = other["prompt_tokens"] / max(1e-9, trained["prompt_tokens"])
        out[f"recall_at_least_{key}"] = other["rate"] is None or trained["rate"] >= other["rate"]

    # Leakage.
    say(f"eval: leakage ({len(leak_asks)} probes)")
    leak_texts, _ = run([a for _, a in leak_asks], trained=True)
    leak: dict[str, Any] = {}
    for relation in ("cross_company", "cross_team", "teammate"):
        hits = [correct(t, a.fact) for (r, a), t in zip(leak_asks, leak_texts, strict=True) if r == relation]
        leak[relation] = {**rate(sum(hits), len(hits)), "upper95": upper_bound_95(sum(hits), len(hits))}
    # Each leak found, with what to look at: whose fact, which model said it, and how.
    out["leak_hits"] = [
        {"relation": r, "fact": a.fact.id, "kind": a.fact.kind, "owner": a.fact.owner, "model": a.model,
         "question": a.question, "reply": t}
        for (r, a), t in zip(leak_asks, leak_texts, strict=True)
        if correct(t, a.fact)
    ]  # fmt: skip
    total_hits = sum(v["hits"] for v in leak.values())
    total = sum(v["trials"] for v in leak.values())
    out["leakage"] = leak
    out["leak_rate"] = total_hits / total if total else 0.0
    out["leak_trials"] = total
    out["leak_upper95"] = upper_bound_95(total_hits, total)
    out["personal_answers_promoted"] = _personal_promoted(fl, personal)

    # Forgetting: general text and general instructions.
    tiny = engine.model.config.vocab_size < 1000
    say("eval: forgetting")
    docs = general_passages(general_docs, split="heldout", seed=seed, tiny=tiny)
    enc = [tok(d)["input_ids"][: fl.cfg.data.context_length] for d in docs]
    base_nll = _nll(engine, enc, base_row)
    dnll = {m: _nll(engine, enc, row[m]) - base_nll for m in askers}
    out["general_text"] = CORPUS_NAME if not tiny else "fleet general text"
    out["base_general_nll"] = base_nll
    out["general_dnll_nats"] = sum(dnll.values()) / len(dnll)
    out["general_dnll_max"] = max(dnll.values())
    out.update(
        _instructions(
            engine, tok, GENERAL_INSTRUCTIONS, {m: row[m] for m in askers}, base_row, max_new_tokens
        )
    )

    # Memory: adapter bytes of each stack vs the KV cache of the context it replaces.
    cfg = engine.model.config
    kv_per_token = _kv_bytes_per_token(cfg, next(engine.model.parameters()).dtype)
    mem = []
    for m in askers:
        adapter = sum(v.size_bytes for v in _stack_versions(fl, stacks[m]))
        mem.append((adapter, vis_tokens[m] * kv_per_token))
    adapters = sum(a for a, _ in mem) / len(mem)
    kv = sum(b for _, b in mem) / len(mem)
    out["adapter_bytes_per_stack"] = adapters
    out["kv_bytes_visible_context"] = kv
    out["kv_bytes_vs_adapter_bytes"] = kv / adapters if adapters else float("inf")
    out["examples"] = [
        {
            "model": a.fact.model,
            "question": a.question,
            "answer": a.fact.answer,
            "trained": replies["trained"][i],
            "base": replies["base"][i],
            "oracle": replies["oracle"][i],
        }
        for i, a in enumerate(method_asks["trained"][:6])
    ]
    return out


def _outsiders(f: FactCase, everyone: list[str]) -> dict[str, list[str]]:
    """Models that must not know ``f``: by their relation to its owner."""
    owner = f.owner.split("/")
    individuals = [m for m in everyone if m.count("/") == 2]
    company, team = owner[0], "/".join(owner[:2]) if len(owner) >= 2 else None
    out = {"cross_company": [m for m in individuals if m.split("/")[0] != company]}
    if team:
        out["cross_team"] = [
            m for m in individuals if m.split("/")[0] == company and not m.startswith(team + "/")
        ]
    if len(owner) == 3:
        out["teammate"] = [m for m in individuals if m.startswith(team + "/") and m != f.owner]
    return {k: v for k, v in out.items() if v}


def _grouped(asks: list[_Ask], hits: list[bool], key) -> dict[str, dict[str, float]]:
    groups: dict[str, list[bool]] = {}
    for a, h in zip(asks, hits, strict=True):
        groups.setdefault(key(a), []).append(h)
    return {k: rate(sum(v), len(v)) for k, v in sorted(groups.items())}


def _personal_promoted(fl, personal: Sequence[FactCase]) -> int:
    """Items of a parent (team, company) holding an answer only one member gave: must be 0."""
    n = 0
    for f in personal:
        for parent in lineage(f.owner)[:-1]:
            n += sum(bool(_positions(it["text"], f.answer)) for it in fl.registry.items(parent))
    return n


def _stack_versions(fl, stack) -> list:
    out = []
    for e in stack.entries:
        v = next((v for v in fl.registry.versions(e.model_id) if v.version == e.version), None)
        if v is not None:
            out.append(v)
    return out


def _kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


@torch.no_grad()
def _nll(engine, enc: list[list[int]], row: list[int]) -> float:
    total, count = 0.0, 0
    for ids in enc:
        x = torch.tensor([ids], device=engine.device)
        with engine.rows(torch.tensor([row])):
            logits = engine.model(input_ids=x).logits.float()
        total += float(torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum"))
        count += len(ids) - 1
    return total / max(1, count)


@torch.no_grad()
def _instructions(
    engine, tok, instructions, rows: dict[str, list[int]], base_row, max_new: int
) -> dict[str, Any]:
    """KL(base ‖ stack) on the base's own answers, the base's correct answers each stack keeps, and
    each one it lost (``general_lost``: model, instruction, the base's reply, the stack's)."""
    from fleet.base.tokenizer import chat_ids
    from fleet.lora import generate

    prompts = [chat_ids(tok, [{"role": "user", "content": i.prompt}]) for i in instructions]
    base = generate(engine, tok, prompts, [base_row] * len(prompts), max_new_tokens=max_new)
    good = [k for k, (i, g) in enumerate(zip(instructions, base, strict=True)) if i.correct(g.text)]
    kept, kl_sum, kl_n, lost = 0, 0.0, 0, []
    for model, r in rows.items():
        outs = generate(engine, tok, [prompts[k] for k in good], [r] * len(good), max_new_tokens=max_new)
        for k, o in zip(good, outs, strict=True):
            if instructions[k].correct(o.text):
                kept += 1
            else:
                lost.append({"model": model, "instruction": instructions[k].prompt, "base": base[k].text,
                             "reply": o.text})  # fmt: skip
    for k in good:  # the base's log-probs on its own answer once, then each stack's
        ids = prompts[k] + list(base[k].token_ids)
        x = torch.tensor([ids], device=engine.device)
        span = slice(len(prompts[k]) - 1, len(ids) - 1)
        with engine.rows(torch.tensor([base_row])):
            lb = torch.log_softmax(engine.model(input_ids=x).logits.float()[0, span], -1)
        for r in rows.values():
            with engine.rows(torch.tensor([r])):
                lm = torch.log_softmax(engine.model(input_ids=x).logits.float()[0, span], -1)
            kl_sum += float((lb.exp() * (lb - lm)).sum())
            kl_n += len(ids) - len(prompts[k])
    trials = len(good) * len(rows)
    return {
        "general_instructions": len(instructions),
        "general_base_correct": len(good),
        "general_answers_kept": kept / trials if trials else 1.0,
        "general_answers_kept_ci95": list(wilson(kept, trials)),
        "general_kl_nats": kl_sum / max(1, kl_n),
        "general_lost": lost,
    }


def render(res: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"fleet eval: {res['models']} models, {res['facts']} facts, {res['questions']} questions")
    for col in ("method", "recall", "95% CI", "prompt tokens"):
        t.add_column(col, justify="right" if col != "method" else "left")
    labels = {
        "trained": "fleet: trained stack, question alone",
        "base": "base, question alone",
        "oracle": "base + the fact's sources (oracle)",
        "bm25_top1": "base + BM25 top-1 of visible context",
        "bm25_top3": "base + BM25 top-3",
        "bm25_top5": "base + BM25 top-5",
        "full_context": "base + whole visible context",
    }
    for name, m in res["methods"].items():
        lo, hi = m["ci95"]
        measured = m["rate"] is not None
        t.add_row(
            labels.get(name, name),
            f"{m['rate']:.1%}" if measured else "does not fit",
            f"{lo:.0%}–{hi:.0%}" if measured else "",
            f"{m['prompt_tokens']:.0f}",
        )
    console.print(t)
    lv = Table(title="trained recall by level and kind")
    lv.add_column("group")
    lv.add_column("recall", justify="right")
    lv.add_column("n", justify="right")
    for key in ("by_level", "by_kind"):
        for g, m in res["methods"]["trained"][key].items():
            lv.add_row(g, f"{m['rate']:.1%}", str(m["trials"]))
    console.print(lv)
    s = Table(title="tokens, forgetting, leakage, memory")
    s.add_column("measure")
    s.add_column("value", justify="right")
    leak = res["leakage"]
    rows = [
        ("prompt tokens: whole context ÷ trained", f"{res['token_ratio_vs_full_context']:.1f}×"
         + ("" if res["recall_at_least_full_context"] else " (trained recall lower)")),
        ("prompt tokens: BM25 top-3 ÷ trained", f"{res['token_ratio_vs_bm25_top3']:.1f}×"
         + ("" if res["recall_at_least_bm25_top3"] else " (trained recall lower)")),
        (f"ΔNLL on {res['general_text']} (base {res['base_general_nll']:.3f})", f"{res['general_dnll_nats']:+.4f} nats/token"),
        ("general instructions: base's correct answers kept", f"{res['general_answers_kept']:.1%} of {res['general_base_correct']}"),
        ("KL(base ‖ stack) on the base's answers", f"{res['general_kl_nats']:.4f} nats/token"),
        *[
            (f"leakage, {r.replace('_', ' ')}", f"{v['hits']}/{v['trials']} (≤ {v['upper95']:.1%} at 95%)")
            for r, v in leak.items()
        ],
        ("personal answers promoted to a parent", str(res["personal_answers_promoted"])),
        ("KV cache of the visible context ÷ adapter bytes", f"{res['kv_bytes_vs_adapter_bytes']:.1f}×"),
    ]  # fmt: skip
    for r in rows:
        s.add_row(*r)
    console.print(s)
