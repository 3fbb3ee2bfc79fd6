"""A pack's training data: each member's rows, its held-out rows and probes, packed batches.

A row is a token sequence with a loss mask (which tokens are targets) and, for a generated
question form, the base's top-k distribution at each answer token with the document in context:

- a **document** (or feedback) is trained whole, cut into context-length windows;
- a **conversation** given as messages is rendered by the base's chat template and only the
  assistant's tokens are targets (the user's words are the prompt, not something to learn);
- a **question form** (``fleet.train.augment``) is the question alone in the chat template and the
  base's answer to it *with* the document: only the answer is a target, and its soft target is
  the base's distribution with the document (context distillation);
- a **general** row is public-domain text (``fleet.data.corpus``, replay split): its only loss is
  the KL toward the base, so adapters keep the base's general behaviour where nothing private is
  said (the penalty sits on general rows, not on the private ones it would fight).

Each item's question forms are split into train and held-out by a stable seed: held-out forms
ask about facts whose other forms are trained, worded differently, so they measure recall, the
way ``fleet eval`` does, and decide when a member has learned enough. An item without question
forms is held out whole by a hash of the item, as before. Each member draws its rows from its own
seeded streams, so its data order does not depend on who else is in the pack: training it alone
or in a pack sees the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fleet.base.tokenizer import chat_ids
from fleet.registry import SnapshotItem
from fleet.train.augment import personal_forms, shuffle_split, states
from fleet.types import Level, level_of

BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 448, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class Row:
    """Token ids, the 0/1 mask of target tokens (``None``: every token after the first), the
    teacher's top-k ``[id_1..id_k, logp_1..logp_k]`` per target token (or ``None``), and whether
    the row is general text (KL toward the base only)."""

    ids: tuple[int, ...]
    mask: tuple[int, ...] | None = None
    top: tuple[tuple[float, ...], ...] | None = None
    general: bool = False

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> int:
        return (len(self.ids) - 1) if self.mask is None else sum(self.mask[1:])


@dataclass(frozen=True)
class MemberData:
    model_id: str
    train: list[Row]
    heldout: list[Row]
    probes: list[Row] = field(default_factory=list)  # held-out question forms: recall
    tokens: int = 0  # training tokens available (one epoch)


def _bucket(n: int) -> int:
    return next((b for b in BUCKETS if n <= b), n)


def _is_heldout(item_id: int, text: str, fraction: float) -> bool:
    h = hashlib.sha256(f"{item_id}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < fraction


def item_ids(items: Sequence[SnapshotItem], tokenizer) -> list[list[int]]:
    """Each item's tokens as the model reads it: a conversation given as messages through the base's
    chat template (every turn closed by the template's end-of-turn token), any other text with the
    tokenizer's special tokens and a final eos."""
    texts = [it.text for it in items if not it.messages]
    enc = iter(tokenizer(texts, add_special_tokens=True)["input_ids"] if texts else [])
    eos = tokenizer.eos_token_id
    out = []
    for it in items:
        if it.messages:
            out.append(chat_ids(tokenizer, it.chat(), add_generation_prompt=False))
        else:
            out.append(list(next(enc)) + ([eos] if eos is not None else []))
    return out


def windows(ids: Sequence[int], context_length: int) -> list[Row]:
    """A text's tokens cut into context-length rows, every token a target."""
    return [
        Row(tuple(ids[s : s + context_length]))
        for s in range(0, max(1, len(ids) - 1), context_length)
        if len(ids[s : s + context_length]) >= 2
    ]


def chat_row(tokenizer, messages: list[dict[str, str]], context_length: int, top=None) -> Row | None:
    """A conversation as one row whose targets are the assistant's tokens only (the template's
    rendering of each assistant turn, up to and including its end-of-turn token)."""
    ids = chat_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(ids)
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(chat_ids(tokenizer, messages[:j], add_generation_prompt=True))
        end = len(chat_ids(tokenizer, messages[: j + 1], add_generation_prompt=False))
        for t in range(start, min(end, len(ids))):
            mask[t] = 1
    if not any(mask):  # a template that does not render prefixes as prefixes: learn it all
        mask = [1] * len(ids)
    ids, mask = ids[:context_length], mask[:context_length]
    if sum(mask[1:]) == 0:
        return None
    if top is not None and len(top) != sum(mask):
        top = None  # the teacher's tokens do not line up with this rendering: plain targets only
    return Row(tuple(ids), tuple(mask), None if top is None else tuple(tuple(t) for t in top))


def form_row(tokenizer, form: dict[str, Any], context_length: int) -> list[Row]:
    if form.get("kind") == "qa":
        messages = [{"role": "user", "content": form["q"]}, {"role": "assistant", "content": form["a"]}]
        row = chat_row(tokenizer, messages, context_length, form.get("top"))
        return [row] if row is not None else []
    ids = tokenizer(form["text"], add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id]
    return windows([t for t in ids if t is not None], context_length)


def value_probe(tokenizer, row: Row, value: str | None) -> Row:
    """A held-out question row judged on its value: the targets narrowed to the shortest run of
    answer tokens that spells ``value`` (a long answer need not match word for word to give the
    fact); the whole answer where the form names no value or the answer does not spell it."""
    if not value or row.mask is None:
        return row
    at = [t for t, m in enumerate(row.mask) if m]
    best: tuple[int, int] | None = None
    for i, start in enumerate(at):
        for end in at[i:]:
            if best is not None and end - start >= best[1] - best[0]:
                break
            if value.lower() in tokenizer.decode(list(row.ids[start : end + 1])).lower():
                best = (start, end)
                break
    if best is None:
        return row
    mask = tuple(1 if best[0] <= t <= best[1] else 0 for t in range(len(row.ids)))
    return Row(row.ids, mask, None, row.general)


def member_data(
    model_id: str,
    new_items: Sequence[SnapshotItem],
    old_items: Sequence[SnapshotItem],
    tokenizer,
    *,
    context_length: int,
    heldout_fraction: float,
    forms: dict[int, list[dict[str, Any]]] | None = None,
    seed: int = 0,
    personal: bool = False,
    earlier: Sequence[SnapshotItem] = (),
) -> MemberData:
    """A member's rows: its items (new and replayed), their question forms split into train and
    held-out, and the held-out question forms as recall probes.

    ``earlier``: every item of the model before the new ones, replayed or not (their forms in
    ``forms``): a question a later document answers anew is learned from that document only, and an
    earlier document's rows that state a value a later one revised are not trained, whichever of
    them this run replays."""
    forms = forms or {}
    # An individual's model is asked by its owner: with ``personal``, its question forms that name the
    # owner (the last part of the model id) are also trained, and held out, in the first person.
    owner = model_id.rsplit("/", 1)[-1] if personal and level_of(model_id) is Level.INDIVIDUAL else ""
    new_ids = {it.id for it in new_items}
    items = list(new_items) + list(old_items)
    train: list[Row] = []
    held: list[Row] = []
    probes: list[Row] = []
    # Texts are tokenized together; a conversation is rendered once, by chat_row (targets masked).
    text_ids = iter(item_ids([it for it in items if not it.messages], tokenizer))
    latest: dict[str, int] = {}
    stale: dict[str, int] = {}  # a value a later document revised → that document's id
    every = {it.id: it for it in (*earlier, *items)}
    for item_id in sorted(every):
        for f in forms.get(item_id, []):
            if f.get("kind") == "qa":
                latest[_norm_q(f["q"])] = item_id
                if f.get("revises"):
                    stale[f["revises"]] = max(stale.get(f["revises"], 0), item_id)

    def outdated(item_id: int, text: str) -> bool:
        return any(by > item_id and states(text, v) for v, by in stale.items())

    for it in items:
        rows = (
            [r for r in [chat_row(tokenizer, it.chat(), context_length)] if r is not None]
            if it.messages
            else windows(next(text_ids), context_length)
        )
        # A question trained from two items is learned from the newer one only: a later document
        # that changes a value (a desk move) must win over the one it replaces; the earlier
        # document's own text and paraphrases, which still state the old value, are left out.
        mine = [
            f
            for f in forms.get(it.id, [])
            if (
                latest.get(_norm_q(f["q"])) == it.id
                if f.get("kind") == "qa"
                else not outdated(it.id, f.get("text", ""))
            )
        ]
        if outdated(it.id, it.text):
            rows = []
        if mine:
            fit, out = shuffle_split(mine, heldout_fraction if it.id in new_ids else 0.0, f"{seed}:{it.id}")
            if owner:
                fit, out = fit + personal_forms(fit, owner), out + personal_forms(out, owner)
            train += rows + [r for f in fit for r in form_row(tokenizer, f, context_length)]
            q_rows = [(f, r) for f in out for r in form_row(tokenizer, f, context_length)]
            held += [r for _, r in q_rows]
            probes += [value_probe(tokenizer, r, f.get("value")) for f, r in q_rows]
        elif it.id in new_ids and _is_heldout(it.id, it.text, heldout_fraction):
            held += rows
        else:
            train += rows
    if not train and held:  # a member with one item still trains; it is judged on it too
        train = list(held)
    if not held and train:
        held = list(train)
    return MemberData(model_id, train, held, probes, sum(len(r) for r in train))


def _norm_q(question: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", question.lower()))


def general_rows(tokenizer, passages: Sequence[str], context_length: int) -> list[Row]:
    """General text as rows whose only loss is the KL toward the base."""
    enc = tokenizer(list(passages), add_special_tokens=True)["input_ids"] if passages else []
    return [Row(tuple(ids[:context_length]), general=True) for ids in enc if len(ids) >= 8]


def general_chat_rows(
    tokenizer, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], context_length: int
) -> list[Row]:
    """General instructions with the base's own answers, in the chat template: rows whose only loss
    is the KL toward the base on the answer's tokens (the chat behaviour a model keeps)."""
    out = []
    for p, a in zip(prompts, answers, strict=True):
        ids = (list(p) + list(a))[:context_length]
        mask = [0] * min(len(p), len(ids)) + [1] * (len(ids) - len(p))
        if sum(mask[1:]):
            out.append(Row(tuple(ids), tuple(mask), general=True))
    return out


class RowStream:
    """An endless, seeded, length-bucketed stream of one member's rows."""

    def __init__(self, rows: list[Row], seed: str) -> None:
        if not rows:
            raise ValueError("a row stream needs rows")
        self.rows = rows
        self.rng = random.Random(seed)
        self.queue: list[int] = []

    def state(self) -> tuple:
        return (self.rng.getstate(), list(self.queue))

    def restore(self, state: tuple) -> None:
        self.rng.setstate(state[0])
        self.queue = list(state[1])

    def take(self, n: int) -> list[Row]:
        out = []
        for _ in range(n):
            if not self.queue:
                order = list(range(len(self.rows)))
                self.rng.shuffle(order)
                # Within an epoch, windows of similar length travel together: less padding.
                order.sort(key=lambda i: _bucket(len(self.rows[i])))
                self.queue = order
            out.append(self.rows[self.queue.pop(0)])
        return out


@dataclass
class Batch:
    """Right-padded rows of one bucket: ``ids_BT``, ``attention_BT``, ``mask_BT`` (1 = target),
    ``member_B``, and the teacher's top-k at target positions (``top_at`` = (row, position) pairs,
    ``top_idx_NK``, ``top_logp_NK``; empty when no row has a teacher)."""

    ids_BT: torch.Tensor
    attention_BT: torch.Tensor
    mask_BT: torch.Tensor
    member_B: torch.Tensor
    top_at: torch.Tensor
    top_idx_NK: torch.Tensor
    top_logp_NK: torch.Tensor

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self.__dict__.values()))


def collate(rows_per_member: Sequence[list[Row]], pad_id: int, pad_to: int | None = None) -> Batch:
    flat = [(m, r) for m, rows in enumerate(rows_per_member) for r in rows]
    T = pad_to or max(len(r) for _, r in flat)
    ids = torch.full((len(flat), T), pad_id, dtype=torch.long)
    att = torch.zeros((len(flat), T), dtype=torch.long)
    mask = torch.zeros((len(flat), T), dtype=torch.float32)
    member = torch.empty(len(flat), dtype=torch.long)
    at, top = [], []
    for b, (m, r) in enumerate(flat):
        n = len(r)
        ids[b, :n] = torch.tensor(r.ids)
        att[b, :n] = 1
        mask[b, :n] = torch.tensor(r.mask, dtype=torch.float32) if r.mask is not None else 1.0
        mask[b, 0] = 0.0  # the first token is never predicted
        member[b] = m
        if r.top is not None:
            positions = [t for t in range(n) if r.mask[t]]
            for t, entry in zip(positions, r.top, strict=True):
                if t > 0:
                    at.append((b, t))
                    top.append(entry)
    k = len(top[0]) // 2 if top else 1
    top_t = torch.tensor(top, dtype=torch.float32) if top else torch.zeros(0, 2 * k)
    return Batch(
        ids,
        att,
        mask,
        member,
        torch.tensor(at, dtype=torch.long).reshape(-1, 2),
        top_t[:, :k].long(),
        top_t[:, k:],
    )


def bucketed(rows: dict[int, list[Row]], pad_id: int):
    """A step's rows grouped by length bucket and by kind (private, general), each padded to its
    bucket's length; buckets and members in a fixed order. Yields ``(batch, general)``."""
    groups: dict[tuple[bool, int], dict[int, list[Row]]] = {}
    for member in sorted(rows):
        for r in rows[member]:
            groups.setdefault((r.general, _bucket(len(r))), {}).setdefault(member, []).append(r)
    for general, b in sorted(groups):
        members = sorted(groups[(general, b)])
        batch = collate([groups[(general, b)][m] for m in members], pad_id, pad_to=b)
        batch.member_B = torch.tensor(members)[batch.member_B]
        yield batch, general


def eval_batches(rows: list[Row], batch_rows: int) -> list[list[Row]]:
    """Held-out rows sorted by length and cut into batches (deterministic)."""
    srt = sorted(rows, key=len)
    return [srt[i : i + batch_rows] for i in range(0, len(srt), batch_rows)]
