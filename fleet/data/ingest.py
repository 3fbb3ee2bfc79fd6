"""Ingestion of private context: validated, deduplicated, token-counted, one transaction.

A file is JSON Lines, one item per line::

    {"kind": "document" | "conversation" | "feedback", "text": "...", "meta": {...}}   # meta optional
    {"kind": "conversation", "messages": [{"role": "user", "content": "..."},
                                          {"role": "assistant", "content": "..."}, ...]}

A conversation is best given as structured ``messages`` (roles ``system``, ``user``,
``assistant``): training renders it with the base tokenizer's own chat template, so the model
learns it in the form it is asked in, whatever the base. Such an item is stored with its
messages in ``meta.messages`` and a base-neutral ``text`` (``role: content`` lines, what
deduplication and retrieval read); its token count is that of the template's rendering.

The whole file is validated before anything is stored; the first malformed line raises an
error naming its line number and field, and nothing is written. Items whose text a model
already has (same sha256) are skipped and counted.

Lines are split on ``\n`` alone (JSON strings may hold U+2028 or U+0085, which
``str.splitlines`` would break on). Text holding NUL, and NaN or ±Infinity anywhere in an item,
are refused with the line number: the registry could not store them on PostgreSQL.

Repeated queries: a query is a ``Q: …`` line followed by an ``A: …`` line in a conversation,
a user turn followed by an assistant turn in the base's chat format, or ``meta.query`` /
``meta.answer``. Conversations are scanned once, line by line and turn by turn (linear time,
whatever the text). When at least ``data.repeated_query_min_members`` members of a team have
asked the same normalized query *and given the same normalized answer*, it becomes one
conversation item of the team's model; when that many teams of a company have, of the
company's model. A question whose askers answer it differently ("what is my badge code?") is
personal: it stays with each asker and is never copied to the parent.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.errors import ValidationError
from fleet.registry import IngestCount, NewItem, Registry
from fleet.types import ContextKind, lineage, validate_id

TokenCounter = Callable[[Sequence[str]], list[int]]
_KINDS = {k.value for k in ContextKind}
_FIELDS = {"kind", "text", "messages", "meta"}
ROLES = ("system", "user", "assistant")
# The chat format of fleet's base: "<|user|>\n…<|eos|>\n<|assistant|>\n…<|eos|>".
_USER, _ASSISTANT, _EOS = "<|user|>\n", "<|assistant|>\n", "<|eos|>"


@dataclass
class IngestReport:
    model_id: str
    lines: int
    inserted: int
    duplicates: int
    tokens: int
    promoted: list[IngestCount] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "model_id": self.model_id,
            "lines": self.lines,
            "inserted": self.inserted,
            "duplicates": self.duplicates,
            "tokens": self.tokens,
            "promoted_to_parents": [c.__dict__ for c in self.promoted if c.inserted],
        }


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def normalize_query(query: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: what counts as 'the same query'."""
    q = re.sub(r"[^\w\s]", " ", query.lower())
    return " ".join(q.split())


def jsonl_lines(text: str) -> list[str]:
    """A JSON Lines file's lines: split on ``\n`` only (a ``\r`` left at a line's end is JSON whitespace)."""
    return text.split("\n")


def _refuse_constant(name: str) -> float:
    raise ValueError(name)


def parse_jsonl(lines: Iterable[str], *, max_chars: int, source: str = "input") -> list[dict[str, Any]]:
    """Validate every line; raise ValidationError naming the first bad line and field."""
    items: list[dict[str, Any]] = []
    for no, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw, parse_constant=_refuse_constant)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"{source}: line {no}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        except ValueError as exc:
            raise ValidationError(
                f"{source}: line {no}: {exc} is not a JSON number; numbers must be finite"
            ) from None
        items.append(validate_item(obj, where=f"{source}: line {no}", max_chars=max_chars))
    if not items:
        raise ValidationError(f"{source}: no items (expected JSON Lines with kind and text)")
    return items


def validate_item(obj: Any, *, where: str, max_chars: int) -> dict[str, Any]:
    """A checked item ``{"kind", "text", "meta"}``; structured messages are in ``meta.messages``."""
    if not isinstance(obj, dict):
        raise ValidationError(f"{where}: expected a JSON object with 'kind' and 'text' (or 'messages')")
    extra = sorted(set(obj) - _FIELDS)
    if extra:
        raise ValidationError(f"{where}: unknown field {extra[0]!r} (allowed: kind, text, messages, meta)")
    kind = obj.get("kind")
    if kind not in _KINDS:
        raise ValidationError(f"{where}: field 'kind' must be one of {sorted(_KINDS)}, got {kind!r}")
    meta = obj.get("meta")
    messages = obj.get("messages")
    if messages is None and isinstance(meta, dict) and "messages" in meta and "text" in obj:
        messages = meta["messages"]  # a stored item read back: its messages are its source of truth
    if messages is not None:
        if kind != ContextKind.CONVERSATION.value:
            raise ValidationError(f"{where}: field 'messages' belongs to a conversation, not a {kind}")
        if "text" in obj and "messages" in obj:
            raise ValidationError(f"{where}: give a conversation as 'text' or as 'messages', not both")
        messages = validate_messages(messages, where)
        obj = {**obj, "text": messages_text(messages)}
        meta = {**(meta if isinstance(meta, dict) else {}), "messages": messages}
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise ValidationError(f"{where}: field 'text' must be a non-empty string")
    if len(text) > max_chars:
        raise ValidationError(f"{where}: field 'text' has {len(text)} characters; the limit is {max_chars}")
    if "\x00" in text:
        raise ValidationError(
            f"{where}: field 'text' holds a NUL character (\\u0000) at offset {text.index(chr(0))}; remove it"
        )
    if meta is not None and not isinstance(meta, dict):
        raise ValidationError(f"{where}: field 'meta' must be an object when present")
    if meta:
        _check_storable(meta, where, "meta")
        for k in ("query", "answer"):
            if k in meta and (not isinstance(meta[k], str) or not meta[k].strip()):
                raise ValidationError(f"{where}: field 'meta.{k}' must be a non-empty string")
        if ("query" in meta) != ("answer" in meta):
            raise ValidationError(f"{where}: 'meta.query' and 'meta.answer' come together")
    return {"kind": kind, "text": text, "meta": meta}


def validate_messages(messages: Any, where: str) -> list[dict[str, str]]:
    """``[{"role", "content"}, ...]``: roles system/user/assistant, non-empty string contents."""
    if not isinstance(messages, list) or not messages:
        raise ValidationError(
            f"{where}: field 'messages' must be a non-empty list of {{role, content}} objects"
        )
    out = []
    for i, m in enumerate(messages):
        at = f"{where}: messages[{i}]"
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise ValidationError(f"{at} must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValidationError(f"{at}: role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        if not isinstance(m["content"], str) or not m["content"].strip():
            raise ValidationError(f"{at}: content must be a non-empty string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise ValidationError(f"{where}: a conversation needs at least one user message")
    return out


def messages_text(messages: Sequence[dict[str, str]]) -> str:
    """A conversation's base-neutral text: one ``role: content`` line per message."""
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def message_pairs(messages: Sequence[dict[str, str]]) -> list[tuple[str, str]]:
    """Each user message answered by the assistant message right after it."""
    return [
        (u["content"].strip(), a["content"].strip())
        for u, a in zip(messages, messages[1:], strict=False)
        if u["role"] == "user" and a["role"] == "assistant"
    ]


def _check_storable(value: Any, where: str, path: str) -> None:
    """Refuse what no registry database stores: NUL in strings (keys too), non-finite numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValidationError(f"{where}: field {path!r} is {value}; numbers must be finite")
    if isinstance(value, str) and "\x00" in value:
        raise ValidationError(f"{where}: field {path!r} holds a NUL character (\\u0000); remove it")
    if isinstance(value, dict):
        for k, v in value.items():
            if "\x00" in k:
                raise ValidationError(f"{where}: a key of field {path!r} holds a NUL character (\\u0000)")
            _check_storable(v, where, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_storable(v, where, f"{path}[{i}]")


def extract_queries(item: dict[str, Any]) -> list[tuple[str, str]]:
    meta = item.get("meta") or {}
    out = []
    if "query" in meta:
        out.append((meta["query"].strip(), meta["answer"].strip()))
    if item["kind"] == ContextKind.CONVERSATION.value:
        if "messages" in meta:
            return out + message_pairs(meta["messages"])
        out += qa_pairs(item["text"])
        out += chat_pairs(item["text"])
    return out


def qa_pairs(text: str) -> list[tuple[str, str]]:
    """``Q: …`` lines answered by the next non-blank line, ``A: …``; one pass over the lines.

    A blank run is scanned only from the line just above it, so the work is linear in the text.
    """
    lines = text.split("\n")
    out, i = [], 0
    while i < len(lines):
        if not lines[i].startswith("Q:"):
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        answer = lines[j].lstrip() if j < len(lines) else ""
        q, a = lines[i][2:].strip(), answer[2:].strip()
        if answer.startswith("A:") and q and a:
            out.append((q, a))
            j += 1
        i = j  # the line after the blank run is looked at next (it may ask a question itself)
    return out


def chat_pairs(text: str) -> list[tuple[str, str]]:
    """A user turn followed by an assistant turn in the base's chat format; one pass over the turns.

    Turns end at ``<|eos|>``; a turn is the text after its last role marker, so splitting once on
    the end marker and looking at each piece once is linear in the text.
    """
    out = []
    turns = text.split(_EOS)  # the last piece ends without <|eos|>: it is no finished turn
    for k in range(len(turns) - 2):
        start = turns[k].rfind(_USER)
        reply = turns[k + 1].lstrip()
        if start < 0 or not reply.startswith(_ASSISTANT):
            continue
        q, a = turns[k][start + len(_USER) :].strip(), reply[len(_ASSISTANT) :].strip()
        if q and a:
            out.append((q, a))
    return out


class Ingestor:
    """Ingests items into the registry with a base-tokenizer token counter."""

    def __init__(
        self,
        registry: Registry,
        count_tokens: TokenCounter,
        *,
        max_chars: int,
        repeated_min: int,
        render_chat: Callable[[list[dict[str, str]]], str] | None = None,
    ) -> None:
        self.registry = registry
        self.count_tokens = count_tokens
        self.max_chars = max_chars
        self.repeated_min = repeated_min
        # A conversation's messages as the base's chat template renders them (what training sees).
        self.render_chat = render_chat or messages_text

    def _new_items(self, items: Sequence[dict[str, Any]]) -> list[NewItem]:
        """Validated items → rows, each counted in the form training reads it."""
        counted = [
            self.render_chat(it["meta"]["messages"])
            if it["meta"] and "messages" in it["meta"]
            else it["text"]
            for it in items
        ]
        return [
            NewItem(it["kind"], it["text"], n, text_sha256(it["text"]), it["meta"])
            for it, n in zip(items, self.count_tokens(counted), strict=True)
        ]

    def ingest_file(self, model_id: str, path: str | Path) -> IngestReport:
        validate_id(model_id)
        p = Path(path)
        if not p.is_file():
            raise ValidationError(f"{p}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(f"{p}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        return self.ingest_items(
            model_id, parse_jsonl(jsonl_lines(text), max_chars=self.max_chars, source=str(p))
        )

    def ingest_items(self, model_id: str, items: Sequence[dict[str, Any]]) -> IngestReport:
        """Validated item dicts → one transaction; then repeated-query promotion to parents."""
        return self.ingest_many({model_id: items})[0]

    def ingest_many(self, batches: dict[str, Sequence[dict[str, Any]]]) -> list[IngestReport]:
        """Several models' items in ONE transaction (the demo's bulk path)."""
        for mid in batches:
            validate_id(mid)
        self.registry.get_models(list(batches))  # unknown models fail before any work
        checked = {
            mid: [
                validate_item(it, where=f"{mid} item {i}", max_chars=self.max_chars)
                for i, it in enumerate(items, 1)
            ]
            for mid, items in batches.items()
        }
        new = {mid: self._new_items(items) for mid, items in checked.items()}
        counts = {c.model_id: c for c in self.registry.add_items(new)}
        promoted = self._promote_queries(checked)
        return [
            IngestReport(
                mid,
                len(batches[mid]),
                counts[mid].inserted,
                counts[mid].duplicates,
                counts[mid].tokens,
                promoted,
            )
            for mid in batches
        ]

    def _promote_queries(self, batches: dict[str, Sequence[dict[str, Any]]]) -> list[IngestCount]:
        logs = []
        for mid, items in batches.items():
            lin = lineage(mid)
            if len(lin) < 2:
                continue  # a company has no parent to teach
            for it in items:
                for q, a in extract_queries(it):
                    norm = normalize_query(q)
                    if norm:
                        logs.append(
                            {
                                "parent_id": lin[-2],
                                "query_sha256": text_sha256(norm),
                                "asker_id": mid,
                                "query": q,
                                "answer": a,
                            }
                        )
        if not logs:
            return []
        self.registry.log_queries(logs)
        promoted: list[IngestCount] = []
        parents = sorted({row["parent_id"] for row in logs})
        # Team-level promotions are themselves "asked" by the team at company level.
        while parents:
            found = agreed_answers(
                self.registry.repeated_queries(parents, self.repeated_min), self.repeated_min
            )
            if not found:
                break
            batches2: dict[str, list[dict[str, Any]]] = {}
            next_logs = []
            for f in found:
                exchange = [
                    {"role": "user", "content": f["query"]},
                    {"role": "assistant", "content": f["answer"]},
                ]
                batches2.setdefault(f["parent_id"], []).append(
                    validate_item(
                        {
                            "kind": "conversation",
                            "messages": exchange,
                            "meta": {"source": "repeated-query", "askers": f["askers"]},
                        },
                        where=f"repeated query of {f['parent_id']}",
                        max_chars=self.max_chars,
                    )
                )
                lin = lineage(f["parent_id"])
                if len(lin) >= 2:
                    next_logs.append(
                        {
                            "parent_id": lin[-2],
                            "query_sha256": f["query_sha256"],
                            "asker_id": f["parent_id"],
                            "query": f["query"],
                            "answer": f["answer"],
                        }
                    )
            new = {pid: self._new_items(items) for pid, items in batches2.items()}
            promoted += self.registry.add_items(new)
            self.registry.log_queries(next_logs)
            parents = sorted({row["parent_id"] for row in next_logs})
        return promoted


def agreed_answers(groups: Sequence[dict[str, Any]], min_members: int) -> list[dict[str, Any]]:
    """Of each repeated query, the answers that at least ``min_members`` askers agree on (normalized
    like queries), in the wording of the first of them. Answers that differ stay personal."""
    out = []
    for g in groups:
        by_answer: dict[str, list[dict[str, str]]] = {}
        for asked in g["asked"]:
            norm = normalize_query(asked["answer"])
            if norm:
                by_answer.setdefault(norm, []).append(asked)
        for agreeing in by_answer.values():
            if len(agreeing) >= min_members:
                first = agreeing[0]
                out.append(
                    {
                        "parent_id": g["parent_id"],
                        "query_sha256": g["query_sha256"],
                        "askers": len(agreeing),
                        "query": first["query"],
                        "answer": first["answer"],
                    }
                )
    return out


def tokenizer_counter(tokenizer) -> TokenCounter:
    """Token counts from a Hugging Face tokenizer, without special tokens."""

    def count(texts: Sequence[str]) -> list[int]:
        if not texts:
            return []
        enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(ids) for ids in enc]

    return count
