"""Facts to ask a model: ``FactCase`` and the facts file ``fleet eval --facts`` reads (one JSON
object per line; the format is in the README). The casebook and the synthetic organisation
both produce them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("plain", "updated", "two_hop", "repeated", "personal")


@dataclass(frozen=True)
class FactCase:
    """One fact to ask, as a line of the facts file ``fleet eval`` reads.

    ``model`` is whose stack is asked; ``owner`` whose data holds the fact (``level`` is the
    owner's level). A reply is correct when it contains ``answer`` (case-insensitive, as a whole
    token) and none of ``stale``. ``sources`` are the documents that state it: the oracle context.
    """

    id: str
    model: str
    owner: str
    level: str
    kind: str  # plain | updated | two_hop | repeated | personal (a leak probe, not a recall measure)
    questions: tuple[str, ...]
    answer: str
    stale: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    form: str = "chat"  # chat: asked through the base's chat template; completion: a prefix to continue

    def to_json(self) -> dict[str, object]:
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}
        return out


def read_facts_jsonl(text: str, *, source: str = "facts") -> list[FactCase]:
    """Parse a facts file (one JSON object per line). The older single-question form
    (``{"model", "question", "answer", "source"}``) is read as a one-question plain fact."""
    from fleet.errors import InvalidIdError, ValidationError
    from fleet.types import level_of, validate_id

    out = []
    for no, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        where = f"{source}: line {no}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(d, dict):
            raise ValidationError(f"{where}: expected a JSON object")
        legacy = "questions" not in d and isinstance(d.get("question"), str)  # the older cloze format
        questions = [d["question"]] if legacy else d.get("questions")
        sources = d.get("sources", [d["source"]] if isinstance(d.get("source"), str) and d["source"] else [])
        model, answer = d.get("model"), d.get("answer")
        if not isinstance(model, str) or not isinstance(answer, str) or not answer.strip():
            raise ValidationError(f"{where}: 'model' and a non-empty 'answer' are required")
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValidationError(f"{where}: 'questions' must be a non-empty list of strings")
        owner = d.get("owner", model)
        try:
            validate_id(model)
            validate_id(owner)
        except InvalidIdError as exc:
            raise ValidationError(f"{where}: {exc}") from None
        stale = d.get("stale", [])
        if not isinstance(stale, list) or not all(isinstance(s, str) for s in stale):
            raise ValidationError(f"{where}: 'stale' must be a list of strings")
        if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
            raise ValidationError(f"{where}: 'sources' must be a list of strings")
        kind, form = str(d.get("kind", "plain")), str(d.get("form", "completion" if legacy else "chat"))
        if kind not in KINDS:
            raise ValidationError(f"{where}: 'kind' {kind!r} is not one of {', '.join(KINDS)}")
        if form not in ("chat", "completion"):
            raise ValidationError(f"{where}: 'form' {form!r} is not 'chat' or 'completion'")
        out.append(
            FactCase(
                str(d.get("id", f"line{no}")),
                model,
                owner,
                str(d.get("level", level_of(owner).value)),
                kind,
                tuple(q.strip() for q in questions),
                answer.strip(),
                tuple(stale),
                tuple(sources),
                form,
            )
        )
    if not out:
        raise ValidationError(f"{source}: no facts")
    return out


def pairs(cases: Sequence[FactCase]) -> list[tuple[FactCase, str]]:
    """Every (fact, question) to ask."""
    return [(f, q) for f in cases for q in f.questions]
