"""``fleet eval``: does the fleet do what it is for?

On a sample of models with known private facts (a facts file: one JSON object per line,
``{"model", "question", "answer", "source"}``; ``fleet demo`` writes one for its synthetic
organisation), through the serving engine:

- recall: greedy completion of a fact's question reproduces the answer exactly — for the
  trained stack, for the base, and for the base with the fact's source document in the
  prompt (what a caller without a personal model has to send);
- prompt tokens per answered question, in-context vs trained;
- leakage: facts of model A recalled by a model B of another team or company;
- forgetting: ΔNLL of the stacks over the base on general text the project generates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fleet.errors import ValidationError
from fleet.types import Level, level_of


@dataclass(frozen=True)
class FactCase:
    model: str
    question: str
    answer: str
    source: str


def read_facts(path: str | Path) -> list[FactCase]:
    p = Path(path)
    if not p.is_file():
        raise ValidationError(f"{p}: no facts file (fleet demo writes one; or pass --facts FILE.jsonl)")
    out = []
    for no, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append(
                FactCase(str(d["model"]), str(d["question"]), str(d["answer"]), str(d.get("source", "")))
            )
        except (json.JSONDecodeError, KeyError) as exc:
            raise ValidationError(f"{p}: line {no}: expected model, question, answer ({exc})") from None
    return out


def write_facts(path: str | Path, cases: list[FactCase]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(c.__dict__) + "\n" for c in cases))


def _batched(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def evaluate(
    fl, facts: list[FactCase], *, models: int = 20, seed: int = 0, batch: int = 32, general_docs: int = 16
) -> dict[str, Any]:
    from fleet.data.synth import general_text
    from fleet.lora import generate
    from fleet.runtime import StackSlots, load_engine

    by_model: dict[str, list[FactCase]] = {}
    for f in facts:
        by_model.setdefault(f.model, []).append(f)
    known = {m.id for m in fl.registry.list_models()}
    candidates = sorted(m for m in by_model if m in known and level_of(m) is Level.INDIVIDUAL)
    if not candidates:
        raise ValidationError("none of the facts' models is an individual in this fleet's registry")
    rng = random.Random(seed)
    sample = sorted(rng.sample(candidates, min(models, len(candidates))))
    stacks = fl.registry.active_stacks(sample)
    n_adapters = len({e.key for s in stacks.values() for e in s.entries})
    engine, tok = load_engine(
        fl.cfg,
        max_slots=n_adapters + 1,
        max_rank=max([e.rank for s in stacks.values() for e in s.entries] + [8]),
    )
    slots = StackSlots(engine, fl.store)
    row = {m: slots.row(stacks[m]) for m in sample}
    base_row = [-1, -1, -1]

    def complete(prompts: list[str], rows: list[list[int]], max_new: int) -> list[str]:
        out = []
        for chunk in _batched(list(zip(prompts, rows, strict=True)), batch):
            ids = [tok(p)["input_ids"] for p, _ in chunk]
            gens = generate(engine, tok, ids, [r for _, r in chunk], max_new_tokens=max_new)
            out += [g.text for g in gens]
        return out

    cases = [f for m in sample for f in by_model[m]]
    max_new = max(len(tok(f.answer, add_special_tokens=False)["input_ids"]) for f in cases) + 1
    hit = lambda text, f: text.startswith(f.answer)  # noqa: E731 - exact completion of the fact
    trained = complete([f.question for f in cases], [row[f.model] for f in cases], max_new)
    base = complete([f.question for f in cases], [base_row] * len(cases), max_new)
    in_ctx_prompts = [f"{f.source}\n{f.question}" for f in cases]
    in_ctx = complete(in_ctx_prompts, [base_row] * len(cases), max_new)
    q_tokens = sum(len(tok(f.question)["input_ids"]) for f in cases)
    ctx_tokens = sum(len(tok(p)["input_ids"]) for p in in_ctx_prompts)

    # Leakage: each sampled model is asked the facts of a model outside its team.
    leak_pairs = []
    for m in sample:
        team = m.rsplit("/", 1)[0]
        others = [f for o in sample if o.rsplit("/", 1)[0] != team for f in by_model[o]]
        if others:
            leak_pairs.append((m, rng.choice(others)))
    leaked = complete([f.question for _, f in leak_pairs], [row[m] for m, _ in leak_pairs], max_new)

    # Forgetting: NLL on general text, each stack against the base.
    docs = general_text(general_docs, seed=10_000 + seed)
    enc = [tok(d)["input_ids"][: fl.cfg.data.context_length] for d in docs]
    dnll = []
    for m in sample:
        dnll.append(_nll(engine, enc, row[m]) - _nll(engine, enc, base_row))

    n = len(cases)
    return {
        "models": len(sample),
        "facts": n,
        "recall_trained": sum(hit(t, f) for t, f in zip(trained, cases, strict=True)) / n,
        "recall_base": sum(hit(t, f) for t, f in zip(base, cases, strict=True)) / n,
        "recall_in_context": sum(hit(t, f) for t, f in zip(in_ctx, cases, strict=True)) / n,
        "prompt_tokens_trained": q_tokens / n,
        "prompt_tokens_in_context": ctx_tokens / n,
        "prompt_token_ratio_in_context_vs_trained": ctx_tokens / max(1, q_tokens),
        "leak_rate": (sum(hit(t, f) for t, (_, f) in zip(leaked, leak_pairs, strict=True)) / len(leak_pairs))
        if leak_pairs
        else 0.0,
        "general_dnll_nats": float(sum(dnll) / len(dnll)),
        "examples": [
            {"model": f.model, "question": f.question, "answer": f.answer, "trained": t, "base": b}
            for f, t, b in list(zip(cases, trained, base, strict=True))[:5]
        ],
    }


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


def render(res: dict[str, Any], console) -> None:
    from rich.table import Table

    t = Table(title=f"fleet eval: {res['models']} models, {res['facts']} private facts")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("recall, trained model (question alone)", f"{res['recall_trained']:.1%}"),
        ("recall, base model (question alone)", f"{res['recall_base']:.1%}"),
        ("recall, base with the source in the prompt", f"{res['recall_in_context']:.1%}"),
        ("prompt tokens per question, trained", f"{res['prompt_tokens_trained']:.0f}"),
        ("prompt tokens per question, in context", f"{res['prompt_tokens_in_context']:.0f}"),
        (
            "prompt tokens saved (in-context ÷ trained)",
            f"{res['prompt_token_ratio_in_context_vs_trained']:.2f}×",
        ),
        ("cross-team leakage", f"{res['leak_rate']:.1%}"),
        ("forgetting: ΔNLL on general text", f"{res['general_dnll_nats']:+.4f} nats/token"),
    ]
    for r in rows:
        t.add_row(*r)
    console.print(t)
