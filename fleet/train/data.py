"""A pack's training data: tokenized rows per member, held-out split, packed batches.

Every context item becomes one or more rows (``<bos>`` + tokens + ``<eos>``, cut to the
context length), so that facts sit at the start of a row exactly as questions do at
inference. Rows are split into train and held-out by a hash of the item, which is stable
across runs. Each member draws its rows from its own seeded stream, so a member's data
order does not depend on who else is in the pack: training it alone or in a pack sees the
same rows in the same order.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fleet.base.loading import chat_ids
from fleet.registry import SnapshotItem

BUCKETS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256, 320, 384, 448, 512, 768, 1024, 1536, 2048)


@dataclass(frozen=True)
class MemberData:
    model_id: str
    train: list[list[int]]
    heldout: list[list[int]]
    tokens: int  # training tokens available (one epoch)


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


def rows_from_items(
    items: Sequence[SnapshotItem], tokenizer, context_length: int
) -> list[tuple[int, list[int]]]:
    """(item id, token ids) rows: each item tokenized (``item_ids``) and cut into windows."""
    if not items:
        return []
    out = []
    for it, ids in zip(items, item_ids(items, tokenizer), strict=True):
        item_id = it.id
        for start in range(0, max(1, len(ids) - 1), context_length):
            piece = ids[start : start + context_length]
            if len(piece) >= 2:
                out.append((item_id, piece))
    return out


def member_data(
    model_id: str,
    new_items: Sequence[SnapshotItem],
    old_items: Sequence[SnapshotItem],
    tokenizer,
    *,
    context_length: int,
    heldout_fraction: float,
) -> MemberData:
    """Tokenize a member's snapshot; hold out a stable fraction of its new items."""
    texts = {it.id: it.text for it in list(new_items) + list(old_items)}
    rows = rows_from_items(list(new_items) + list(old_items), tokenizer, context_length)
    new_ids = {it.id for it in new_items}
    train, held = [], []
    for item_id, ids in rows:
        if item_id in new_ids and _is_heldout(item_id, texts[item_id], heldout_fraction):
            held.append(ids)
        else:
            train.append(ids)
    if not train and held:  # a member with one item still trains; it is judged on it too
        train = list(held)
    if not held and train:
        held = list(train)
    return MemberData(model_id, train, held, sum(len(r) for r in train))


class RowStream:
    """An endless, seeded, length-bucketed stream of one member's training rows."""

    def __init__(self, rows: list[list[int]], seed: str) -> None:
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

    def take(self, n: int) -> list[list[int]]:
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


def collate(
    rows_per_member: Sequence[list[list[int]]], pad_id: int, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids_BT``, ``attention_mask_BT`` and ``member_B`` (index into the pack)."""
    flat = [(m, r) for m, rows in enumerate(rows_per_member) for r in rows]
    T = pad_to or max(len(r) for _, r in flat)
    ids = torch.full((len(flat), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(flat), T), dtype=torch.long)
    member = torch.empty(len(flat), dtype=torch.long)
    for b, (m, r) in enumerate(flat):
        ids[b, : len(r)] = torch.tensor(r)
        mask[b, : len(r)] = 1
        member[b] = m
    return ids, mask, member


def bucketed(rows: dict[int, list[list[int]]], pad_id: int):
    """A step's rows grouped by length bucket: ``(input_ids_BT, attention_mask_BT, member_B)`` per
    bucket, each padded to the bucket's length, buckets and members in a fixed order."""
    groups: dict[int, dict[int, list[list[int]]]] = {}
    for member in sorted(rows):
        for r in rows[member]:
            groups.setdefault(_bucket(len(r)), {}).setdefault(member, []).append(r)
    for b in sorted(groups):
        members = sorted(groups[b])
        ids, mask, which = collate([groups[b][m] for m in members], pad_id, pad_to=b)
        yield ids, mask, torch.tensor(members)[which]


def eval_batches(rows: list[list[int]], batch_rows: int) -> list[list[list[int]]]:
    """Held-out rows sorted by length and cut into batches (deterministic)."""
    srt = sorted(rows, key=len)
    return [srt[i : i + batch_rows] for i in range(0, len(srt), batch_rows)]
