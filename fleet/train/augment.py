"""Training forms: every context item turned into the varied forms a model must learn it in.

A fact seen in one wording is memorised but not recalled when asked another way (Physics of
Language Models 3.1); what makes it extractable is seeing it in many forms. So before a member
trains, each of its documents is rewritten by the base itself, with the document in its prompt:

- **questions** the document answers, written by the base from a one-example prompt (greedy and
  sampled), de-duplicated and filtered;
- the base's **answers** to them *with the document in context* — what the adapter must say
  *without* it (context distillation, as in Cartridges' self-study): the answer's tokens are the
  only loss of such a row, and the base's top-k next-token distribution at each of them (with the
  document) is stored as the soft target;
- **paraphrases** of the document (sampled), kept when they keep its names and numbers.

The tiny base cannot write questions; for it (``train.augment: template``) a deterministic
template path turns each "X is Y." sentence into "What is X?" → "X is Y.".

Forms are generated once per (item, base, recipe) inside the training worker (which holds the
base) and stored in the registry (``item_forms``): a restarted worker, a later cycle and ``fleet
eval``'s held-out guard all read the same forms.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from typing import Any

import torch

from fleet.base.tokenizer import chat_ids
from fleet.registry import SnapshotItem

RECIPE = "qa-v1"
TOP_K = 8
_SHOT_NOTE = "Maria's bike is stored in room 12. The cafeteria closes at 3 pm on Fridays."
_SHOT_QUESTIONS = "Where is Maria's bike stored?\nWhat time does the cafeteria close on Fridays?\nWhich room holds Maria's bike?"
_STOP = frozenset(
    "the a an and or of to in on at for is are was were be been it its this that with by from as "
    "what which who whom whose when where why how do does did you your i my me we our they their "
    "there here has have had not no yes can could would should will".split()
)
_COPULA = re.compile(
    r"^(?P<x>[^.?!]{3,120}?)\s+(?P<v>is|are|was|were)\s+(?P<y>[^.?!]{1,120})$", re.IGNORECASE
)


def with_context(question: str, passages: Sequence[str]) -> list[dict[str, str]]:
    """A question asked with passages in the prompt: the context-distillation teacher's prompt, and
    ``fleet eval``'s in-context baselines (one format, so the two are comparable)."""
    if not passages:
        return [{"role": "user", "content": question}]
    return [{"role": "user", "content": "\n\n".join(passages) + f"\n\nQuestion: {question}"}]


def mode_for(cfg, tokenizer) -> str:
    """``base`` (the base writes the forms), ``template`` or ``off``, as ``train.augment`` says
    (``auto``: the base when it is a real instruct model, the template path for the tiny base)."""
    mode = cfg.train.augment
    if mode != "auto":
        return mode
    return "base" if len(tokenizer) > 1000 else "template"


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9][a-z0-9-]*", text.lower()) if w not in _STOP and len(w) >= 2}


def _keys(text: str) -> set[str]:
    """The tokens a faithful rewrite keeps: numbers, codes and capitalised names."""
    return {w.lower() for w in re.findall(r"\b(?:[A-Z][a-zA-Z-]+|[A-Za-z]*\d[\w-]*)\b", text)} - {"the", "a"}


def _passages(text: str) -> list[str]:
    """A document's sentences, each with the sentence before it (the context a pronoun needs)."""
    sentences = [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text) if len(x.strip()) > 3]
    out = [s if i == 0 else f"{sentences[i - 1]} {s}" for i, s in enumerate(sentences) if _words(s)]
    return out or [text]


def _questions(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        q = re.sub(r"^\s*(?:\d+[.)]|[-*•])\s*", "", line).strip()
        if q.endswith("?") and 8 <= len(q) <= 160 and "\n" not in q:
            out.append(q)
    return out


def template_forms(text: str) -> list[dict[str, Any]]:
    """The tiny base's path: each "X is Y." sentence → the question "What is X?" and the sentence."""
    forms = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", text):
        s = sentence.strip().rstrip(".")
        m = _COPULA.match(s)
        if m and m.group("y").strip():
            x = m.group("x").strip()
            verb = m.group("v").lower()
            q = f"What {verb} {x[0].lower() + x[1:] if not x[:2].isupper() else x}?"
            forms.append({"kind": "qa", "q": q, "a": s + "."})
    return forms


@torch.no_grad()
def base_forms(
    engine,
    tokenizer,
    items: Sequence[SnapshotItem],
    *,
    questions: int = 8,
    paraphrases: int = 2,
    seed: int = 0,
    batch: int = 16,
    max_answer_tokens: int = 48,
) -> dict[int, list[dict[str, Any]]]:
    """Forms written by the base (no adapter) for each item: see the module docstring."""
    from fleet.lora import generate

    def gen(prompts, *, max_new, temperature=0.0, seed_=0):
        out = []
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            out += generate(
                engine, tokenizer, chunk, [[-1]] * len(chunk), max_new_tokens=max_new,
                temperature=temperature, seed=None if temperature == 0 else seed_ + i,
            )  # fmt: skip
        return [g.text for g in out]

    texts = [it.text for it in items]
    # A small base answers best about one statement at a time: questions are written, and answered,
    # for each passage (a sentence with the one before it, which names what "it" or "he" refers to).
    passages = [(n, p) for n, t in enumerate(texts) for p in _passages(t)]
    ask = [
        chat_ids(
            tokenizer,
            [
                {"role": "user", "content": f"Note:\n{_SHOT_NOTE}"},
                {"role": "assistant", "content": _SHOT_QUESTIONS},
                {"role": "user", "content": f"Note:\n{p}"},
            ],
        )
        for _, p in passages
    ]
    drafts = [gen(ask, max_new=64)]
    drafts += [gen(ask, max_new=64, temperature=0.8, seed_=seed + 1000 * k) for k in range(2)]
    flat: list[tuple[int, str, str]] = []  # (item index, passage, question)
    seen: list[set[str]] = [set() for _ in texts]
    per_item = [0] * len(texts)
    for j, (n, passage) in enumerate(passages):
        words = _words(passage)
        for draft in drafts:
            for q in _questions(draft[j]):
                norm = " ".join(sorted(_words(q)))
                if norm and norm not in seen[n] and _words(q) & words and per_item[n] < questions:
                    seen[n].add(norm)
                    per_item[n] += 1
                    flat.append((n, passage, q))
    prompts = [chat_ids(tokenizer, with_context(q, [passage])) for _, passage, q in flat]
    answers = gen(prompts, max_new=max_answer_tokens)
    rewrite = [
        chat_ids(
            tokenizer,
            [
                {
                    "role": "user",
                    "content": f"Rewrite this note in other words, keeping every name and number:\n{t}",
                }
            ],
        )
        for t in texts
    ]
    para = [gen(rewrite, max_new=96, temperature=0.7, seed_=seed + 7919 * k) for k in range(paraphrases)]
    out: dict[int, list[dict[str, Any]]] = {it.id: [] for it in items}
    for (n, passage, q), a, p in zip(flat, answers, prompts, strict=True):
        a = a.strip()
        # An answer must say something the passage says, and name nothing the passage does not.
        if a and _words(a) & _words(passage) and _keys(a) <= _keys(passage) | _keys(q):
            out[items[n].id].append(
                {"kind": "qa", "q": q, "a": a, "top": _teacher_top(engine, tokenizer, p, a)}
            )
    for n, it in enumerate(items):
        keys = _keys(it.text)
        for draft in para:
            # A small base often echoes the instruction first: keep only what follows it.
            d = "\n".join(
                x for x in draft[n].strip().split("\n") if "rewrite this note" not in x.lower()
            ).strip()
            if d and (not keys or len(_keys(d) & keys) * 2 >= len(keys)):
                out[it.id].append({"kind": "text", "text": d})
    return out


def _teacher_top(engine, tokenizer, prompt: list[int], answer: str) -> list[list[float]]:
    """The base's top-k next-token log-probs at each answer token, with the document in context:
    ``[[id_1..id_k, logp_1..logp_k], ...]`` (the soft target of context distillation)."""
    target = chat_ids(
        tokenizer,
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": answer}],
        add_generation_prompt=False,
    )
    cue = chat_ids(tokenizer, [{"role": "user", "content": "x"}])
    answer_ids = target[len(cue) :]
    ids = torch.tensor([prompt + answer_ids], device=engine.device)
    logp = torch.log_softmax(engine.model(input_ids=ids).logits[0].float(), -1)
    at = logp[len(prompt) - 1 : len(prompt) - 1 + len(answer_ids)]
    val, idx = at.topk(TOP_K, -1)
    return [
        [*map(int, i), *(round(float(v), 4) for v in vs)]
        for i, vs in zip(idx.tolist(), val.tolist(), strict=True)
    ]


def ensure_forms(
    registry, engine, tokenizer, items: Sequence[SnapshotItem], *, base_model: str, mode: str, seed: int = 0
):
    """Forms of every augmentable item (documents, feedback): stored ones read, missing ones
    generated and stored (first write wins). Returns item id → forms."""
    todo = [it for it in items if it.kind != "conversation"]
    if mode == "off" or not todo:
        return {}
    have = registry.item_forms([it.id for it in todo], base_model=base_model, recipe=_recipe(mode))
    missing = [it for it in todo if it.id not in have]
    if missing:
        made = (
            base_forms(engine, tokenizer, missing, seed=seed)
            if mode == "base"
            else {it.id: template_forms(it.text) for it in missing}
        )
        registry.add_item_forms(made, base_model=base_model, recipe=_recipe(mode))
        have = registry.item_forms([it.id for it in todo], base_model=base_model, recipe=_recipe(mode))
    return have


def _recipe(mode: str) -> str:
    return RECIPE if mode == "base" else f"{RECIPE}-template"


def stored_forms(registry, model_id: str) -> list[str]:
    """The text of every stored training row made from a model's items (what ``fleet eval`` audits):
    a question form is one row holding the question and its answer."""
    return [
        f"{f['q']}\n{f['a']}" if f.get("kind") == "qa" else f.get("text", "")
        for forms in registry.model_item_forms(model_id)
        for f in forms
    ]


def shuffle_split(forms: list[dict[str, Any]], fraction: float, seed: str) -> tuple[list, list]:
    """(train, held-out) question forms of one item, stable for ``seed``; at least one trains."""
    qa = [f for f in forms if f.get("kind") == "qa"]
    rng = random.Random(seed)
    order = list(range(len(qa)))
    rng.shuffle(order)
    n_held = int(len(qa) * fraction) if len(qa) >= 3 else 0
    held = [qa[i] for i in order[:n_held]]
    train = [qa[i] for i in order[n_held:]] + [f for f in forms if f.get("kind") != "qa"]
    return train, held
