"""Training forms: every context item turned into the varied forms a model must learn it in.

A fact seen in one wording is memorised but not recalled when asked another way (Physics of
Language Models 3.1); what makes it extractable is seeing it in many forms. So before a member
trains, each value its documents state (a number, a code, a name that is not the subject) is
asked for in several ways:

- **templated questions** in the sentence's own order ("Max sits at which desk?") and in the usual
  one ("Which desk does Max sit at?", "Where does Max sit?", "What is Max's desk?"), from the clause
  that states the value;
- **questions the base writes** when told the value is the answer (greedy and sampled, with the
  sentence and the one before it in the prompt), kept only when they do not give the value away
  and the base, with the note in context, answers them with it;
- the **answer** is the base's own answer *with the note in context* when it states the value and
  names nothing the note does not (what the adapter must say *without* it: context distillation,
  as in Cartridges' self-study; its top-k next-token distribution is the soft target), else the
  clause that states the value: a wrong answer is never what the adapter learns;
- **paraphrases** of the document (sampled), kept when they keep every name, number and code, add
  no number, and are not much longer than it;
- **joins** to the context above the model (``bridges``): "Max works on project Falcon" and the
  team's "Project Falcon deploys every Thursday" give "Max's project deploys every Thursday", a
  two-hop fact the adapter can then be asked for directly.

- **revisions**: a later document that names a value an earlier one stated ("Max has moved from
  desk M10 to desk K4") may change it. Each earlier question whose answer it names is asked again
  with both documents in the prompt, the later one marked as holding where they differ; when the
  base answers with one of the later document's values instead, that answer becomes a form of the
  later document for the same question (``revises``: the value it replaces), and training learns
  the question from the later document only (``fleet.train.data.member_data``).

Individuals' models are asked by their owners: ``fleet.train.data`` adds first-person copies of
the questions that name the owner (``first_person``). The tiny base cannot write questions; for
it (``train.augment: template``) a deterministic template path turns each "X is Y." sentence into
"What is X?" → "X is Y.".

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

RECIPE = "qa-v4"
TOP_K = 8
_STOP = frozenset(
    "the a an and or of to in on at for is are was were be been it its this that with by from as "
    "what which who whom whose when where why how do does did you your i my me we our they their "
    "there here has have had not no yes can could would should will".split()
)
_QUANTIFIERS = frozenset("every each all some any this next last first other".split())
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


def _sentences(text: str) -> list[str]:
    return [x.strip() for x in re.split(r"(?<=[.!?])\s+|\n+", text) if len(x.strip()) > 3]


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


_ASK_SHOT = (
    "Note:\nMaria's bike is stored in room 12.\n\nWrite one question about the note whose answer is: room 12",
    "In which room is Maria's bike kept?",
)


def _values(sentence: str, text: str = "") -> list[str]:
    """What a sentence states that a question can ask for: numbers and codes, and capitalised names
    that are not a subject of the text (a word opening a sentence, or one with a possessive: the
    names a question says rather than asks for)."""
    text = text or sentence
    subjects = {m.group(1) for m in re.finditer(r"\b([A-Z][\w-]*)'s\b", text)}
    subjects |= {m.group(1) for m in re.finditer(r"(?:^|[.:!?]\s+)([A-Z][\w-]*)", text)}
    out: list[str] = []
    for m in re.finditer(r"[\w-]*\d[\w-]*|\b[A-Z][a-zA-Z-]+\b", sentence):
        v = m.group(0).strip("-")
        if not any(c.isdigit() for c in v) and (v in subjects or v.lower() in _STOP):
            continue
        if v and v not in out:
            out.append(v)
    return out


def _clause(sentence: str, value: str) -> str:
    """The clause of a sentence that states ``value`` (a sentence joining two statements with
    "and" or a comma states each apart), its subject carried over when the clause lacks one."""
    s = sentence.strip().rstrip(".!")
    s = re.sub(r"^[^:]{0,60}:\s+", "", s)  # "Update for Max: ..." → the statement after the label
    parts = re.split(r",\s*and\s+|,\s+|\s+and\s+", s)
    subject = parts[0].split()[0] if parts[0].split() else ""
    for k, part in enumerate(parts):
        if states(part, value):
            others = _values(part.replace(value, " "))
            if k and not others and part[:1].islower():
                return f"{subject} {part}"  # "... and sits at desk M10" → "Max sits at desk M10"
            return part
    return s


_AUX = frozenset("is are was were has have had will can".split())
_PLACE, _TIME = frozenset("in at inside near".split()), frozenset("every during until before after".split())
_PREPS = _PLACE | _TIME | frozenset("on to from of for with by into onto under over".split())


def _base_verb(w: str) -> str:
    if re.search(r"(?:sh|ch|x|ss|o)es$", w):
        return w[:-2]
    return w[:-1] if w.endswith("s") and not w.endswith("ss") else w


def _parse(words: list[str], value: str) -> tuple[int | None, int | None]:
    """(index of the word stating ``value``, index of the clause's verb before it) or Nones."""
    at = next((i for i, w in enumerate(words) if states(w, value)), None)
    if at is None or at < 2:
        return None, None
    verb_at = next(
        (
            i
            for i, w in enumerate(words[:at])
            if i >= 1
            and (w.lower() in _AUX or (w.islower() and w.endswith("s") and "'" not in w and "-" not in w
                                       and w not in _STOP and not w.endswith("ss")))
        ),
        None,
    )  # fmt: skip
    return at, verb_at


def bridges(text: str, context: Sequence[str]) -> list[str]:
    """Sentences joining a document to the context above it (its team's and company's documents):
    where a sentence names a value through a noun ("Max works on project Lantern") and a context
    sentence states something of that value ("Project Lantern deploys every Thursday"), the latter
    said of the subject's noun ("Max's project deploys every Thursday"): a two-hop fact becomes a
    fact the adapter can be asked for directly."""
    out: list[str] = []
    for sentence in _sentences(text):
        for value in _values(sentence, text):
            clause = _clause(sentence, value)
            words = clause.split()
            at, verb_at = _parse(words, value)
            if at is None or verb_at is None or at - 1 <= verb_at:
                continue
            noun = words[at - 1]
            if not (noun.isalpha() and noun.islower()) or noun in _STOP | _QUANTIFIERS | _PREPS:
                continue
            subject = " ".join(words[:verb_at])
            if "'" in subject or len(subject.split()) > 4:
                continue
            link = f"{subject}'s {noun}"
            pattern = re.compile(rf"(?:\b{re.escape(noun)}\s+)?(?<![\w-]){re.escape(value)}(?![\w-])", re.I)
            for other in context:
                for s2 in _sentences(other):
                    if not states(s2, value):
                        continue
                    joined = pattern.sub(link, _clause(s2, value), count=1)
                    joined = joined[0].upper() + joined[1:] + "."
                    if joined not in out and joined.lower() != f"{link}.".lower():
                        out.append(joined)
    return out


def _fronted(clause: str, value: str) -> list[str]:
    """Questions in the usual order ("Which spot does Max park in?", "Where does Max park?", "What
    is Max's spot?") for a clause "<subject> <verb> ... [prep] [noun] <value> [of ...]"."""
    words = clause.split()
    at, verb_at = _parse(words, value)
    if at is None or verb_at is None:
        return []
    subj = " ".join(words[:verb_at])
    subj = subj[0].lower() + subj[1:] if subj.split()[0].lower() in ("the", "a", "an") else subj
    pred = words[verb_at:at]
    noun = (
        pred[-1]
        if pred and pred[-1].isalpha() and pred[-1].islower() and pred[-1] not in _STOP | _QUANTIFIERS
        else ""
    )
    if noun:
        pred = pred[:-1]
    if pred and pred[-1].lower() in ("the", "a", "an"):
        pred = pred[:-1]
    prep = pred[-1] if pred and pred[-1].lower() in _PREPS else ""
    if prep:
        pred = pred[:-1]
    tail = words[at + 1 :]
    if tail and tail[0].islower() and tail[0] not in _STOP and not noun:
        noun, tail = tail[0], tail[1:]  # "the Cedar hall"
    of = " " + " ".join(tail) if tail and tail[0] == "of" else ""
    if not pred:
        return []
    aux, rest = (pred[0], pred[1:]) if pred[0].lower() in _AUX else ("does", [_base_verb(pred[0]), *pred[1:]])
    rest_s = " ".join(rest)
    out = []
    copula = aux.lower() in ("is", "are", "was", "were") and not rest
    if copula:
        out += [f"What {aux} {subj}?", f"Tell me {subj}."]
    if noun:
        if "'s" not in subj:
            out.append(f"What is {subj}'s {noun}?")
        out.append(f"What is the {noun} of {subj}?")
        if not copula:
            if prep and prep.lower() not in _QUANTIFIERS:
                out.append(f"{prep.capitalize()} which {noun}{of} {aux} {subj} {rest_s}?".replace("  ", " "))
                out.append(f"Which {noun}{of} {aux} {subj} {rest_s} {prep}?".replace("  ", " "))
            elif not prep:
                out.append(f"Which {noun} {aux} {subj} {rest_s}?".replace("  ", " "))
    if not copula and prep.lower() in _PLACE:
        out.append(f"Where {aux} {subj} {rest_s}?".replace("  ", " "))
    if not copula and prep.lower() in _TIME:
        out.append(f"When {aux} {subj} {rest_s}?".replace("  ", " "))
    return [q[0].upper() + q[1:] for q in out]


def template_questions(sentence: str, value: str) -> list[str]:
    """Questions asking for ``value`` in the sentence's own order ("Max sits at which desk?"), any
    sentence: the value, with the noun naming it, becomes "which <noun>", or "what"."""
    clause = _clause(sentence, value)
    v = re.escape(value)
    before = re.compile(r"(?:\b(?:the|a|an)\s+)?\b([a-z][a-z-]+)\s+" + v + r"(?![\w-])")
    after = re.compile(r"\bthe\s+" + v + r"\s+([a-z][a-z-]+)\b")  # "in the Cedar hall"
    out = []
    m = before.search(clause)
    if m and m.group(1) not in _STOP | _QUANTIFIERS:
        out.append(clause[: m.start()] + f"which {m.group(1)}" + clause[m.end() :])
    m = after.search(clause)
    if m and m.group(1) not in _STOP:
        out.append(clause[: m.start()] + f"which {m.group(1)}" + clause[m.end() :])
    if not out:
        out.append(re.sub(r"(?<![\w-])" + v + r"(?![\w-])", "what", clause, count=1))
    out = [q + "?" for q in out] + _fronted(clause, value)
    return [q[0].upper() + q[1:] for q in dict.fromkeys(out) if not states(q, value)]


def positions(text: str, value: str) -> list[int]:
    """Where ``text`` states ``value`` as a whole token (case-insensitive)."""
    return [
        m.start() for m in re.finditer(r"(?<![\w-])" + re.escape(value.lower()) + r"(?![\w-])", text.lower())
    ]


def states(text: str, value: str) -> bool:
    return bool(positions(text, value))


@torch.no_grad()
def base_forms(
    engine,
    tokenizer,
    items: Sequence[SnapshotItem],
    *,
    questions: int = 3,
    paraphrases: int = 2,
    seed: int = 0,
    batch: int = 16,
    max_answer_tokens: int = 48,
    context: dict[int, Sequence[str]] | None = None,
) -> dict[int, list[dict[str, Any]]]:
    """Forms written by the base (no adapter) for each item: see the module docstring. ``context``:
    item id → the texts above the item's model (its team's and company's documents), for the
    sentences that join the two (``bridges``)."""
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
    joined = [bridges(it.text, (context or {}).get(it.id, ())) for it in items]
    # A small base writes a good question when told what its answer is: for each value a sentence
    # states (a number, a code, a name), questions whose answer it is, with the sentence (and the
    # one before it, which names what "it" or "he" refers to) in the prompt.
    targets: list[tuple[int, str, str, str]] = []  # (item index, passage, sentence, value)
    for n, t in enumerate(texts):
        sentences = _sentences(t)
        for j, s in enumerate(sentences):
            passage = s if j == 0 else f"{sentences[j - 1]} {s}"
            targets += [(n, passage, s, v) for v in _values(s, t)]
        # Two-hop facts made one-hop: this document's values joined to the context above it.
        for b in joined[n]:
            targets += [(n, b, b, v) for v in _values(b, b)]
    ask = [
        chat_ids(
            tokenizer,
            [
                {"role": "user", "content": _ASK_SHOT[0]},
                {"role": "assistant", "content": _ASK_SHOT[1]},
                {
                    "role": "user",
                    "content": f"Note:\n{p}\n\nWrite one question about the note whose answer is: {v}",
                },
            ],
        )
        for _, p, _, v in targets
    ]
    drafts = [gen(ask, max_new=40)]
    drafts += [gen(ask, max_new=40, temperature=0.9, seed_=seed + 1000 * k) for k in range(2 * questions)]
    flat: list[tuple[int, str, str, str, str, bool]] = []  # (item, passage, sentence, value, q, by base)
    for j, (n, passage, sentence, value) in enumerate(targets):
        seen: set[str] = set()
        words = _words(passage)
        # The sentence's own order with the value asked for ("Max sits at which desk?"), then the
        # base's questions: a question that gives its answer away, or shares nothing with the note,
        # is noise.
        templated = template_questions(sentence, value)
        written = [q for draft in drafts for q in _questions(draft[j])[:1]]
        for k, q in enumerate(templated + written):
            norm = " ".join(sorted(_words(q)))
            if norm and norm not in seen and not states(q, value) and _words(q) & words:
                seen.add(norm)
                flat.append((n, passage, sentence, value, q, k >= len(templated)))
            if len(seen) >= questions + 1:
                break
    prompts = [chat_ids(tokenizer, with_context(q, [passage])) for _, passage, _, _, q, _ in flat]
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
    for (n, passage, sentence, value, q, by_base), a, p in zip(flat, answers, prompts, strict=True):
        a = a.strip().split("\n")[0].strip()
        # The base's answer with the note in context is the target when it states the value and names
        # nothing the note does not. A question the base wrote and cannot answer from the note is
        # dropped (it rarely asks what it was meant to); a templated one is answered by the clause
        # that states the value: a wrong answer must never be what the adapter learns.
        if not (a and states(a, value) and _keys(a) <= _keys(passage) | _keys(q)):
            if by_base:
                continue
            a = _clause(sentence, value) + "."
        out[items[n].id].append(
            {"kind": "qa", "q": q, "a": a, "value": value, "top": _teacher_top(engine, tokenizer, p, a)}
        )
    for n, it in enumerate(items):
        out[it.id] += [{"kind": "text", "text": b} for b in joined[n]]
        keys = _keys(it.text)
        numbers = {k for k in keys if any(c.isdigit() for c in k)}
        for draft in para:
            # A small base often echoes the instruction first: keep only what follows it.
            d = "\n".join(
                x for x in draft[n].strip().split("\n") if "rewrite this note" not in x.lower()
            ).strip()
            dk = _keys(d)
            # A paraphrase keeps every name, number and code, adds no number, and is not much longer
            # than the note (a small base's long rewrites invent what the note never said).
            if (
                d
                and keys <= dk
                and not {k for k in dk if any(c.isdigit() for c in k)} - numbers
                and len(d) <= 1.5 * len(it.text) + 20
            ):
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
    registry,
    engine,
    tokenizer,
    items: Sequence[SnapshotItem],
    *,
    base_model: str,
    mode: str,
    seed: int = 0,
    context: dict[int, Sequence[str]] | None = None,
    history: dict[int, Sequence[SnapshotItem]] | None = None,
):
    """Forms of every augmentable item (documents, feedback): stored ones read, missing ones
    generated and stored. ``history``: item id → every item of its model (the earlier ones are
    what the item may revise). First write wins: an item's joins to the context above it and its
    revisions are those of the data there was when its forms were written. Returns item id →
    forms, for ``items`` and every earlier item of their models."""
    todo = [it for it in items if it.kind != "conversation"]
    if mode == "off" or not todo:
        return {}
    history = history or {}
    docs = {e.id: e for it in todo for e in history.get(it.id, ()) if e.kind != "conversation"}
    docs.update({it.id: it for it in todo})
    recipe = _recipe(mode)
    have = registry.item_forms(list(docs), base_model=base_model, recipe=recipe)
    missing = [it for it in todo if it.id not in have]
    if missing:
        made = (
            base_forms(engine, tokenizer, missing, seed=seed, context=context)
            if mode == "base"
            else {it.id: template_forms(it.text) for it in missing}
        )
        if mode == "base":
            known = {**have, **made}
            pairs = {
                it.id: [
                    (docs[e.id], known[e.id])
                    for e in history.get(it.id, ())
                    if e.id < it.id and e.id in known
                ]
                for it in missing
            }
            for item_id, forms in revised_forms(engine, tokenizer, missing, pairs).items():
                made[item_id] = made.get(item_id, []) + forms
        registry.add_item_forms(made, base_model=base_model, recipe=recipe)
        have = registry.item_forms(list(docs), base_model=base_model, recipe=recipe)
    return have


_REVISE = (
    "Earlier note:\n{old}\n\nLater note (where the two notes differ, the later one holds):\n{new}\n\n"
    "Question: {q}"
)


@torch.no_grad()
def revised_forms(
    engine,
    tokenizer,
    later: Sequence[SnapshotItem],
    earlier: dict[int, Sequence[tuple[SnapshotItem, Sequence[dict[str, Any]]]]],
    *,
    batch: int = 16,
    max_answer_tokens: int = 48,
) -> dict[int, list[dict[str, Any]]]:
    """The questions of earlier documents that later ones answer differently (see the module
    docstring): later item id → its revising forms. ``earlier``: later item id → (earlier
    document, its forms) pairs."""
    from fleet.lora import generate

    asks: list[tuple] = []  # (later id, prompt text, question, earlier form, candidate values, later text)
    for it in later:
        sentences = _sentences(it.text)
        seen: set[str] = set()
        for old, forms in earlier.get(it.id, ()):
            if old.id >= it.id:
                continue
            for f in forms:
                value = f.get("value")
                if f.get("kind") != "qa" or not value or f["q"] in seen or not states(it.text, value):
                    continue
                # What the later document could have changed the value to: the other values of the
                # sentences that name the old one.
                new_values = [
                    v for s_ in sentences if states(s_, value) for v in _values(s_, it.text) if v != value
                ]
                if not new_values:
                    continue
                seen.add(f["q"])
                prompt = _REVISE.format(old=old.text, new=it.text, q=f["q"])
                asks.append((it.id, prompt, f["q"], f, list(dict.fromkeys(new_values)), it.text))
    out: dict[int, list[dict[str, Any]]] = {}
    if not asks:
        return out
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": ask[1]}]) for ask in asks]
    answers = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        answers += [
            g.text
            for g in generate(engine, tokenizer, chunk, [[-1]] * len(chunk), max_new_tokens=max_answer_tokens)
        ]
    for (item_id, text, q, f, new_values, later_text), a, p in zip(asks, answers, prompts, strict=True):
        a = a.strip().split("\n")[0].strip()
        new = revised_value(a, f["value"], new_values, later=later_text)
        # The base's answer counts only when it gives a later value (see revised_value) and names
        # nothing the two notes and the question do not: otherwise the earlier form stands.
        if new is None or not _keys(a) <= _keys(text):
            continue
        out.setdefault(item_id, []).append(
            {"kind": "qa", "q": q, "a": a, "value": new, "revises": f["value"],
             "top": _teacher_top(engine, tokenizer, p, a)}
        )  # fmt: skip
    return out


def revised_value(answer: str, old: str, candidates: Sequence[str], *, later: str = "") -> str | None:
    """The candidate an answer gives as the value now, or None: the last value it states, when
    that is a candidate, and the old value not at all, unless the answer restates the later
    document's own words ("Max has moved from desk M10 to desk K4"): a small base that compares
    the two notes wrongly still names both values, with the new one last."""

    def last(v: str) -> int:
        return max(positions(answer, v), default=-1)

    if last(old) >= 0 and (not later or _plain(answer) not in _plain(later)):
        return None
    best = max(candidates, key=last, default=None)
    if best is None or last(best) < 0 or last(best) < last(old):
        return None
    return best


def _plain(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9-]+", text.lower()))


def _recipe(mode: str) -> str:
    return RECIPE if mode == "base" else f"{RECIPE}-template"


def stored_forms(registry, model_id: str) -> list[str]:
    """The text of every training row made from a model's items (what ``fleet eval`` audits): a
    question form is one row holding the question and its answer; an individual's model also has
    the first-person copies training may add (see ``fleet.train.data.member_data``)."""
    from fleet.types import Level, level_of

    forms = [f for fs in registry.model_item_forms(model_id) for f in fs]
    if level_of(model_id) is Level.INDIVIDUAL:
        forms += personal_forms(forms, model_id.rsplit("/", 1)[-1])
    return [f"{f['q']}\n{f['a']}" if f.get("kind") == "qa" else f.get("text", "") for f in forms]


_FIRST_PERSON = (
    (r"\b{n}'s(?=\s*[?.!]|$)", lambda m: "mine"),
    (r"\b{n}'s\b", lambda m: "my"),
    (r"\b(do|does|did)\s+{n}\b", lambda m: ("did" if m.group(1).lower() == "did" else "do") + " I"),
    (r"\b(is|was)\s+{n}\b", lambda m: ("am" if m.group(1).lower() == "is" else "was") + " I"),
    (r"\bhas\s+{n}\b", lambda m: "have I"),
    (r"\b(to|for|with|about|of|at|from|by|on)\s+{n}\b", lambda m: f"{m.group(1)} me"),
    (r"\b{n}\s+has\b", lambda m: "I have"),
    (r"\b{n}\s+is\b", lambda m: "I am"),
    (r"\b{n}\s+(\w+?)s\b", lambda m: f"I {m.group(1)}"),
    (r"\b{n}\b", lambda m: "I"),
)


def first_person(question: str, name: str) -> str | None:
    """``question`` as its subject would ask it ("Where does Max park?" → "Where do I park?"), or
    None when it does not name them: an individual's model is asked by its owner."""
    if not name or not re.search(rf"\b{re.escape(name)}\b", question, re.IGNORECASE):
        return None
    out = question
    for pattern, repl in _FIRST_PERSON:
        out = re.sub(pattern.format(n=re.escape(name)), repl, out, flags=re.IGNORECASE)
    return out[0].upper() + out[1:]


def personal_forms(forms: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """First-person copies of the question forms that name an individual (see first_person)."""
    out = []
    for f in forms:
        q = first_person(f["q"], name) if f.get("kind") == "qa" else None
        if q and q != f["q"]:
            out.append({**f, "q": q})
    return out


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
