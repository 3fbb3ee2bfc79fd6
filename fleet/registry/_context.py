"""Context items (the private data models learn from), training snapshots, repeated queries.

Ingestion locks the model row *before* inserting items; a training snapshot takes a shared
lock on the same rows before reading. Item ids of one model therefore become visible in id
order, and a watermark (the newest item id a version learned) never skips an item that was
still being committed when the snapshot was read.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, func, select, update

from fleet.registry._core import MODELS, RegistryCore
from fleet.registry.records import SnapshotItem, TrainingSnapshot
from fleet.registry.schema import ContextItem, ItemForms, QueryLog
from fleet.types import validate_id

ITEMS = ContextItem.__table__
QUERIES = QueryLog.__table__
FORMS = ItemForms.__table__


@dataclass(frozen=True)
class NewItem:
    kind: str
    text: str
    tokens: int
    sha256: str
    meta: dict[str, Any] | None = None


@dataclass(frozen=True)
class IngestCount:
    model_id: str
    inserted: int
    duplicates: int
    tokens: int


_BUMP = (
    update(MODELS)
    .where(MODELS.c.id == bindparam("mid"))
    .values(
        pending_tokens=MODELS.c.pending_tokens + bindparam("tok"),
        total_tokens=MODELS.c.total_tokens + bindparam("tok"),
        item_count=MODELS.c.item_count + bindparam("n"),
        pending_since=func.coalesce(MODELS.c.pending_since, bindparam("at")),
    )
)


class ContextMixin(RegistryCore):
    def add_items(
        self, batches: dict[str, Sequence[NewItem]], *, received_at: float | None = None
    ) -> list[IngestCount]:
        """Insert items for one or more models in ONE transaction, skipping duplicates by sha256."""
        now = received_at if received_at is not None else self.now()
        counts: list[IngestCount] = []
        with self.tx() as conn:
            self.lock_models(conn, batches.keys())
            stmt = self.insert_ignoring(ITEMS, ["model_id", "sha256"]).returning(ITEMS.c.tokens)
            bumps = []
            for mid in sorted(batches):
                seen: set[str] = set()
                rows = []
                for it in batches[mid]:
                    if it.sha256 in seen:
                        continue
                    seen.add(it.sha256)
                    rows.append(
                        {
                            "model_id": mid,
                            "kind": it.kind,
                            "text": it.text,
                            "tokens": int(it.tokens),
                            "sha256": it.sha256,
                            "meta": it.meta,
                            "received_at": now,
                        }
                    )
                inserted_tokens = [t for (t,) in conn.execute(stmt, rows).all()] if rows else []
                n, tok = len(inserted_tokens), int(sum(inserted_tokens))
                counts.append(IngestCount(mid, n, len(batches[mid]) - n, tok))
                if n:
                    bumps.append({"mid": mid, "tok": tok, "n": n, "at": now})
            if bumps:
                conn.execute(_BUMP, bumps)
        return counts

    def training_snapshot(
        self,
        model_ids: Sequence[str],
        *,
        replay_fraction: float | dict[str, float] = 0.0,
        seed: int = 0,
        pins: dict[str, tuple[int, int]] | None = None,
    ) -> dict[str, TrainingSnapshot]:
        """Each member's items after its watermark plus a replayed sample of older ones.

        ``snapshot_max_id`` is what a version trained on this snapshot records as its watermark.
        With ``pins`` (model id → (watermark, upto)), the snapshot is re-read exactly as it was
        first taken: items with ``watermark < id <= upto`` are new, and the replay sample is the
        same, so a restarted training worker sees the same data.
        """
        out: dict[str, TrainingSnapshot] = {}
        with self.read() as conn:
            models = {r.id: r for r in self.lock_models(conn, model_ids, shared=True)}
            for mid in sorted(models):
                wm, upto = pins[mid] if pins else (int(models[mid].watermark or 0), None)
                stmt = (
                    select(ITEMS.c.id, ITEMS.c.text, ITEMS.c.kind, ITEMS.c.meta)
                    .where(ITEMS.c.model_id == mid)
                    .order_by(ITEMS.c.id)
                )
                if upto is not None:
                    stmt = stmt.where(ITEMS.c.id <= upto)
                rows = [SnapshotItem.of(r) for r in conn.execute(stmt)]
                new = [r for r in rows if r.id > wm]
                old = earlier = [r for r in rows if r.id <= wm]
                frac = replay_fraction.get(mid, 0.0) if isinstance(replay_fraction, dict) else replay_fraction
                # Replay enough old items that they make up `frac` of the training data, rounding
                # up: a small update (one new item) still replays the member's older facts.
                want = (
                    math.ceil(len(new) * frac / (1 - frac) - 1e-9)
                    if 0 < frac < 1
                    else (len(old) if frac >= 1 else 0)
                )
                if old and want:
                    rng = random.Random(f"{seed}:{mid}:{wm}")
                    old = sorted(rng.sample(old, min(want, len(old))))
                else:
                    old = []
                top = upto if upto is not None else (rows[-1].id if rows else wm)
                out[mid] = TrainingSnapshot(mid, wm, max(top, wm), new, old, earlier)
        return out

    def items(self, model_id: str, *, after: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        validate_id(model_id)
        stmt = select(ITEMS).where(ITEMS.c.model_id == model_id, ITEMS.c.id > after).order_by(ITEMS.c.id)
        if limit:
            stmt = stmt.limit(limit)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # -- generated training forms --------------------------------------------------------------
    def item_forms(self, item_ids: Sequence[int], *, base_model: str, recipe: str) -> dict[int, list[Any]]:
        """Stored training forms of these items on this base and recipe (items without are absent)."""
        if not item_ids:
            return {}
        out: dict[int, list[Any]] = {}
        with self.read() as conn:
            ids = sorted(set(int(i) for i in item_ids))
            for k in range(0, len(ids), 500):
                stmt = select(FORMS.c.item_id, FORMS.c.forms).where(
                    FORMS.c.item_id.in_(ids[k : k + 500]),
                    FORMS.c.base_model == base_model,
                    FORMS.c.recipe == recipe,
                )
                out.update({int(r.item_id): list(r.forms or []) for r in conn.execute(stmt)})
        return out

    def add_item_forms(self, forms: dict[int, list[Any]], *, base_model: str, recipe: str) -> int:
        """Store forms once per (item, base, recipe); forms already stored are kept (first wins, so
        every run and restart trains on the same forms). Returns how many were new."""
        if not forms:
            return 0
        now = self.now()
        stmt = self.insert_ignoring(FORMS, ["item_id", "base_model", "recipe"]).returning(FORMS.c.item_id)
        rows = [
            {"item_id": int(i), "base_model": base_model, "recipe": recipe, "forms": f, "created_at": now}
            for i, f in sorted(forms.items())
        ]
        with self.tx() as conn:
            return len(conn.execute(stmt, rows).all())

    def model_item_forms(self, model_id: str) -> list[list[Any]]:
        """Every stored form list of the model's items, whatever the base or recipe (for audits)."""
        validate_id(model_id)
        stmt = (
            select(FORMS.c.forms)
            .join(ITEMS, ITEMS.c.id == FORMS.c.item_id)
            .where(ITEMS.c.model_id == model_id)
            .order_by(FORMS.c.item_id)
        )
        with self.read() as conn:
            return [list(r.forms or []) for r in conn.execute(stmt)]

    # -- repeated queries ------------------------------------------------------------------
    def log_queries(self, rows: Sequence[dict[str, Any]]) -> None:
        """Record who asked which normalized query under which parent (duplicates ignored)."""
        if not rows:
            return
        now = self.now()
        stmt = self.insert_ignoring(QUERIES, ["parent_id", "query_sha256", "asker_id"])
        with self.tx() as conn:
            conn.execute(stmt, [{**r, "created_at": now} for r in rows])

    def repeated_queries(self, parent_ids: Sequence[str], min_askers: int) -> list[dict[str, Any]]:
        """Queries asked by at least ``min_askers`` distinct askers under each parent, each with
        every asker's answer (in the order they were asked): whether the askers *agree* on an answer
        is for the caller to judge, with its own notion of "the same answer"."""
        if not parent_ids:
            return []
        groups = (
            select(QUERIES.c.parent_id, QUERIES.c.query_sha256)
            .where(QUERIES.c.parent_id.in_(sorted(set(parent_ids))))
            .group_by(QUERIES.c.parent_id, QUERIES.c.query_sha256)
            .having(func.count() >= min_askers)
            .subquery()
        )
        stmt = (
            select(
                QUERIES.c.parent_id,
                QUERIES.c.query_sha256,
                QUERIES.c.asker_id,
                QUERIES.c.query,
                QUERIES.c.answer,
            )
            .join(
                groups,
                and_(
                    QUERIES.c.parent_id == groups.c.parent_id,
                    QUERIES.c.query_sha256 == groups.c.query_sha256,
                ),
            )
            .order_by(QUERIES.c.id)
        )
        out: dict[tuple[str, str], dict[str, Any]] = {}
        with self.read() as conn:
            for r in conn.execute(stmt):
                g = out.setdefault(
                    (r.parent_id, r.query_sha256),
                    {"parent_id": r.parent_id, "query_sha256": r.query_sha256, "asked": []},
                )
                g["asked"].append({"asker_id": r.asker_id, "query": r.query, "answer": r.answer})
        return list(out.values())
