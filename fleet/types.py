"""Ids, levels, lifecycle states: plain values shared by every part of fleet.

Nothing here imports Ray, torch or SQLAlchemy, so any layer may use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from fleet.errors import InvalidIdError

_SEGMENT = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
MAX_DEPTH = 3


class Level(StrEnum):
    """Where a node sits in the tenant tree; also the tier a model is configured by."""

    COMPANY = "company"
    TEAM = "team"
    INDIVIDUAL = "individual"

    @property
    def depth(self) -> int:
        return _LEVEL_DEPTH[self]

    @classmethod
    def of_depth(cls, depth: int) -> Level:
        return _DEPTH_LEVEL[depth]


_LEVEL_DEPTH = {Level.COMPANY: 1, Level.TEAM: 2, Level.INDIVIDUAL: 3}
_DEPTH_LEVEL = {v: k for k, v in _LEVEL_DEPTH.items()}

# A model's tier is the level of its tenant: per-tier settings (replay, KL weight,
# minimum interval, drift caps, learning schedule) are keyed by these names.
Tier = Level
TIERS: tuple[str, ...] = tuple(level.value for level in Level)


class AdapterState(StrEnum):
    """Lifecycle of an adapter version: candidate → active → retired, or candidate → rejected."""

    CANDIDATE = "candidate"
    ACTIVE = "active"
    RETIRED = "retired"
    REJECTED = "rejected"

    @property
    def servable(self) -> bool:
        """Only the active version answers requests."""
        return self is AdapterState.ACTIVE

    @property
    def is_terminal(self) -> bool:
        """A rejected version never comes back; a retired one may be rolled back to."""
        return self is AdapterState.REJECTED

    @property
    def can_become_active(self) -> bool:
        return self in (AdapterState.CANDIDATE, AdapterState.RETIRED)

    @property
    def can_stand_in(self) -> bool:
        """A version that has served (active, or retired and not rolled back) may serve again in
        place of a newer one that cannot be read."""
        return self in (AdapterState.ACTIVE, AdapterState.RETIRED)


class ContextKind(StrEnum):
    DOCUMENT = "document"
    CONVERSATION = "conversation"
    FEEDBACK = "feedback"


class DriftState(StrEnum):
    """What the divergence monitor last decided about a model."""

    OK = "ok"
    WARNED = "warned"
    FROZEN = "frozen"

    @property
    def trains(self) -> bool:
        """Frozen models are never scheduled for training."""
        return self is not DriftState.FROZEN


class DriftAction(StrEnum):
    WARN = "warn"
    FREEZE = "freeze"
    ROLLBACK = "rollback"
    REJECT = "reject"
    UNFREEZE = "unfreeze"


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"

    @property
    def is_terminal(self) -> bool:
        return self in (RunStatus.SUCCEEDED, RunStatus.FAILED)


@dataclass(frozen=True, order=True)
class ModelId:
    """A validated tenant/model id: ``company``, ``company/team`` or ``company/team/person``.

    Validation happens here, once, so that nothing user-supplied reaches a file
    path or an object key without it.
    """

    value: str

    def __post_init__(self) -> None:
        validate_id(self.value)

    def __str__(self) -> str:
        return self.value

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.value.split("/"))

    @property
    def level(self) -> Level:
        return Level.of_depth(len(self.segments))

    @property
    def company(self) -> str:
        return self.segments[0]

    @property
    def parent(self) -> ModelId | None:
        segs = self.segments
        return None if len(segs) == 1 else ModelId("/".join(segs[:-1]))

    @property
    def lineage(self) -> tuple[ModelId, ...]:
        """Company first, this model last."""
        segs = self.segments
        return tuple(ModelId("/".join(segs[: i + 1])) for i in range(len(segs)))


def validate_id(value: object) -> str:
    """Return ``value`` if it is a valid model id, else raise :class:`InvalidIdError`."""
    if not isinstance(value, str) or not value:
        raise InvalidIdError(f"model id must be a non-empty string, got {value!r}")
    segs = value.split("/")
    if len(segs) > MAX_DEPTH:
        raise InvalidIdError(
            f"model id {value!r} has {len(segs)} segments; at most {MAX_DEPTH} (company/team/person)"
        )
    for seg in segs:
        if not _SEGMENT.fullmatch(seg):
            raise InvalidIdError(
                f"model id {value!r}: segment {seg!r} must match [a-z0-9][a-z0-9-]{{0,62}} "
                "(lowercase letters, digits and '-', starting with a letter or digit)"
            )
    return value


def lineage(model_id: str) -> list[str]:
    """Ancestors and the model itself, company first (validated)."""
    validate_id(model_id)
    segs = model_id.split("/")
    return ["/".join(segs[: i + 1]) for i in range(len(segs))]


def level_of(model_id: str) -> Level:
    """The level of a model id (validated: a bad id raises InvalidIdError, never a KeyError)."""
    return Level.of_depth(validate_id(model_id).count("/") + 1)


def version_key(model_id: str, version: int) -> str:
    """The key an adapter version is known by in caches and slot tables: ``acme/search@v3``."""
    return f"{model_id}@v{version}"
