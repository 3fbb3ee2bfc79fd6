"""Drift monitor queries: probe sets, versions awaiting a score, drift state and strikes, the
accepted population, and the history the report reads.

Samples and actions are written by ``OpsMixin.add_divergence_samples`` / ``add_drift_actions``;
what the policy decides for one model (state, strikes, actions) is applied here in one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from fleet.errors import ConflictError, NotFoundError
from fleet.registry._core import MODELS, RegistryCore, chunks
from fleet.registry.records import StackEntry
from fleet.registry.schema import AdapterVersion, DivergenceSample, DriftActionRow, ProbeSet
from fleet.types import AdapterState, DriftState, validate_id

PROBES = ProbeSet.__table__
SAMPLES = DivergenceSample.__table__
ACTIONS = DriftActionRow.__table__
VERSIONS = AdapterVersion.__table__

# The columns a report or the population rule reads from a sample.
_SAMPLE_COLS = (
    SAMPLES.c.id,
    SAMPLES.c.model_id,
    SAMPLES.c.version,
    SAMPLES.c.tier,
    SAMPLES.c.relation,
    SAMPLES.c.probe_set,
    SAMPLES.c.kl,
    SAMPLES.c.tv,
    SAMPLES.c.top1,
    SAMPLES.c.dnll,
    SAMPLES.c.rel_weight_norm,
    SAMPLES.c.created_at,
)


@dataclass(frozen=True)
class DriftStatus:
    """What the drift policy needs to know about a model before judging one of its versions."""

    model_id: str
    tier: str
    base_model: str
    state: DriftState
    strikes: int
    active_version: int | None
    has_previous: bool
    """An earlier version exists that ``rollback`` would restore (the same rule it applies)."""


def _has_previous():
    """Correlated EXISTS mirroring ``VersionsMixin.rollback``'s choice of the version to restore."""
    return exists().where(
        VERSIONS.c.model_id == MODELS.c.id,
        VERSIONS.c.state == AdapterState.RETIRED.value,
        VERSIONS.c.activated_at.is_not(None),
        VERSIONS.c.rolled_back_at.is_(None),
        VERSIONS.c.version < MODELS.c.active_version,
    )


class DriftMixin(RegistryCore):
    # -- probe sets ------------------------------------------------------------------------------
    def add_probe_set(
        self, name: str, *, base_model: str, uri: str, sha256: str, meta: dict[str, Any]
    ) -> dict[str, Any]:
        """Register a probe set (its tokens and cached base log-probs already in the store)."""
        try:
            with self.tx() as conn:
                conn.execute(
                    PROBES.insert().values(
                        name=name,
                        base_model=base_model,
                        uri=uri,
                        sha256=sha256,
                        meta=meta,
                        created_at=self.now(),
                    )
                )
        except SAIntegrityError:
            raise ConflictError(f"probe set {name!r} already exists") from None
        return self.get_probe_set(name)

    def get_probe_set(self, name: str) -> dict[str, Any]:
        with self.read() as conn:
            row = conn.execute(select(PROBES).where(PROBES.c.name == name)).first()
        if row is None:
            known = [p["name"] for p in self.list_probe_sets()][:5]
            hint = (
                f"known: {', '.join(known)}" if known else "none exists yet; `fleet drift scan` creates one"
            )
            raise NotFoundError(f"no probe set {name!r} ({hint})")
        return dict(row._mapping)

    def list_probe_sets(self, base_model: str | None = None) -> list[dict[str, Any]]:
        """Probe sets, newest first."""
        stmt = select(PROBES).order_by(PROBES.c.id.desc())
        if base_model is not None:
            stmt = stmt.where(PROBES.c.base_model == base_model)
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    # -- work to do ------------------------------------------------------------------------------
    def unscored_versions(
        self, probe_set: str, model_ids: Sequence[str] | None = None, *, base_model: str | None = None
    ) -> list[tuple[str, int, str]]:
        """``(model id, version, tier)`` of every active version with no sample on ``probe_set``
        (of ``model_ids`` and of models on ``base_model``, when given)."""
        scored = exists().where(
            SAMPLES.c.probe_set == probe_set,
            SAMPLES.c.model_id == MODELS.c.id,
            SAMPLES.c.version == MODELS.c.active_version,
            SAMPLES.c.relation == "base",
        )
        stmt = (
            select(MODELS.c.id, MODELS.c.active_version, MODELS.c.tier)
            .where(MODELS.c.active_version.is_not(None), ~scored)
            .order_by(MODELS.c.id)
        )
        if base_model is not None:
            stmt = stmt.where(MODELS.c.base_model == base_model)
        out: list[tuple[str, int, str]] = []
        with self.read() as conn:
            if model_ids is None:
                out = [(r[0], int(r[1]), r[2]) for r in conn.execute(stmt)]
            else:
                for part in chunks(sorted({validate_id(m) for m in model_ids})):
                    out += [(r[0], int(r[1]), r[2]) for r in conn.execute(stmt.where(MODELS.c.id.in_(part)))]
        return sorted(out)

    def version_counts(self, model_ids: Sequence[str]) -> dict[str, int]:
        """How many versions (any state) each model has."""
        ids = sorted({validate_id(m) for m in model_ids})
        out = dict.fromkeys(ids, 0)
        with self.read() as conn:
            for part in chunks(ids):
                rows = conn.execute(
                    select(VERSIONS.c.model_id, func.count())
                    .where(VERSIONS.c.model_id.in_(part))
                    .group_by(VERSIONS.c.model_id)
                )
                out.update({m: int(n) for m, n in rows})
        return out

    def version_entries(self, pairs: Sequence[tuple[str, int]]) -> dict[tuple[str, int], StackEntry]:
        """The stack entries (uri, sha256, rank, alpha) of specific versions, whatever their state."""
        want = {(validate_id(m), int(v)) for m, v in pairs}
        out: dict[tuple[str, int], StackEntry] = {}
        ids = sorted({m for m, _ in want})
        with self.read() as conn:
            for part in chunks(ids):
                rows = conn.execute(
                    select(
                        VERSIONS.c.model_id,
                        VERSIONS.c.version,
                        VERSIONS.c.sha256,
                        VERSIONS.c.uri,
                        VERSIONS.c.rank,
                        VERSIONS.c.alpha,
                    ).where(VERSIONS.c.model_id.in_(part))
                )
                for r in rows:
                    if (r.model_id, r.version) in want:
                        out[(r.model_id, r.version)] = StackEntry(
                            r.model_id, r.version, r.sha256, r.uri, r.rank, r.alpha
                        )
        missing = sorted(want - set(out))
        if missing:
            raise NotFoundError(f"no such version(s): {', '.join(f'{m}@v{v}' for m, v in missing[:5])}")
        return out

    # -- drift state ---------------------------------------------------------------------------
    def drift_status(self, model_ids: Sequence[str]) -> dict[str, DriftStatus]:
        ids = sorted({validate_id(m) for m in model_ids})
        out: dict[str, DriftStatus] = {}
        stmt = select(
            MODELS.c.id,
            MODELS.c.tier,
            MODELS.c.base_model,
            MODELS.c.drift_state,
            MODELS.c.drift_strikes,
            MODELS.c.active_version,
            _has_previous().label("has_previous"),
        )
        with self.read() as conn:
            for part in chunks(ids):
                for r in conn.execute(stmt.where(MODELS.c.id.in_(part))):
                    out[r.id] = DriftStatus(
                        r.id,
                        r.tier,
                        r.base_model,
                        DriftState(r.drift_state),
                        int(r.drift_strikes or 0),
                        r.active_version,
                        bool(r.has_previous),
                    )
        missing = [m for m in ids if m not in out]
        if missing:
            raise NotFoundError(
                f"unknown model(s): {', '.join(missing[:5])}; `fleet tenants list` shows the models"
            )
        return out

    def apply_drift(
        self,
        model_id: str,
        *,
        state: DriftState,
        strikes: int,
        actions: Sequence[tuple[str, int | None, str]] = (),
    ) -> None:
        """Set a model's drift state and strike count and record its actions, in one transaction.

        ``actions``: ``(action, version, reason)`` rows (the drift history).
        """
        now = self.now()
        with self.tx() as conn:
            self.lock_models(conn, [model_id])
            conn.execute(
                update(MODELS)
                .where(MODELS.c.id == model_id)
                .values(drift_state=state.value, drift_strikes=int(strikes))
            )
            if actions:
                conn.execute(
                    ACTIONS.insert(),
                    [
                        {"model_id": model_id, "version": v, "action": str(a), "reason": r, "created_at": now}
                        for a, v, r in actions
                    ],
                )

    # -- the accepted population ---------------------------------------------------------------
    def accepted_samples(self, probe_set: str) -> list[dict[str, Any]]:
        """The newest sample per (model, relation) of every model's ACTIVE version on ``probe_set``."""
        stmt = (
            select(*_SAMPLE_COLS)
            .select_from(
                SAMPLES.join(
                    MODELS,
                    and_(MODELS.c.id == SAMPLES.c.model_id, MODELS.c.active_version == SAMPLES.c.version),
                )
            )
            .where(SAMPLES.c.probe_set == probe_set)
            .order_by(SAMPLES.c.id)
        )
        latest: dict[tuple[str, str], dict[str, Any]] = {}
        with self.read() as conn:
            for r in conn.execute(stmt):
                latest[(r.model_id, r.relation)] = dict(r._mapping)
        return list(latest.values())

    # -- history (reports) -----------------------------------------------------------------------
    def drift_samples(
        self, *, since: float | None = None, model_id: str | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Samples, oldest first (``limit``: the newest that many)."""
        stmt = select(*_SAMPLE_COLS, SAMPLES.c.metrics).order_by(SAMPLES.c.id.desc())
        if since is not None:
            stmt = stmt.where(SAMPLES.c.created_at >= since)
        if model_id is not None:
            stmt = stmt.where(SAMPLES.c.model_id == validate_id(model_id))
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.read() as conn:
            rows = [dict(r._mapping) for r in conn.execute(stmt)]
        return rows[::-1]

    def drift_actions(self, *, limit: int = 20, model_id: str | None = None) -> list[dict[str, Any]]:
        """The newest actions first."""
        stmt = select(ACTIONS).order_by(ACTIONS.c.id.desc()).limit(limit)
        if model_id is not None:
            stmt = stmt.where(ACTIONS.c.model_id == validate_id(model_id))
        with self.read() as conn:
            return [dict(r._mapping) for r in conn.execute(stmt)]

    def drift_state_counts(self) -> dict[str, dict[str, int]]:
        """Per tier: models in each drift state."""
        with self.read() as conn:
            rows = conn.execute(
                select(MODELS.c.tier, MODELS.c.drift_state, func.count()).group_by(
                    MODELS.c.tier, MODELS.c.drift_state
                )
            ).all()
        out: dict[str, dict[str, int]] = {}
        for tier, state, n in rows:
            out.setdefault(tier, {s.value: 0 for s in DriftState})[state] = int(n)
        return out
