"""Plain, frozen records the registry returns (no SQLAlchemy objects leak out)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from fleet.types import AdapterState, DriftState, Level, version_key


@dataclass(frozen=True)
class TenantRecord:
    id: str
    parent_id: str | None
    level: Level
    shares: float
    budget_gpu_s_per_day: float | None
    created_at: float


@dataclass(frozen=True)
class ModelRecord:
    id: str
    company_id: str
    team_id: str | None
    tier: str
    base_model: str
    lora_rank: int
    lora_alpha: float
    drift_state: DriftState
    watermark: int
    pending_tokens: int
    total_tokens: int
    item_count: int
    active_version: int | None
    last_version_at: float | None
    created_at: float

    @property
    def level(self) -> Level:
        return Level.of_depth(self.id.count("/") + 1)


@dataclass(frozen=True)
class VersionRecord:
    model_id: str
    version: int
    state: AdapterState
    sha256: str
    uri: str
    size_bytes: int
    rank: int
    alpha: float
    base_model: str
    parents: list[str]
    watermark: int
    metrics: dict[str, Any]
    reason: str | None
    run_id: int | None
    created_at: float
    activated_at: float | None
    retired_at: float | None
    rolled_back_at: float | None

    @property
    def key(self) -> str:
        return version_key(self.model_id, self.version)


@dataclass(frozen=True)
class StackEntry:
    """One level of a resolved stack: the active version of that lineage node."""

    model_id: str
    version: int
    sha256: str
    uri: str
    rank: int
    alpha: float

    @property
    def key(self) -> str:
        return version_key(self.model_id, self.version)


@dataclass(frozen=True)
class Stack:
    """What answers for a model: its lineage's active versions, company first.

    Levels without an active version are skipped; an empty stack is the base alone.
    """

    model_id: str
    base_model: str
    entries: tuple[StackEntry, ...] = field(default_factory=tuple)

    @property
    def served_by(self) -> str:
        """``<id>@v<n>`` of the deepest level that has an active version, else ``base``."""
        return self.entries[-1].key if self.entries else "base"

    @property
    def key(self) -> str:
        """A routing key naming the stack with its versions (Serve's multiplexed model id)."""
        return "+".join(e.key for e in self.entries) or f"base:{self.base_model}"


class SnapshotItem(NamedTuple):
    """One context item as training reads it: structured ``messages`` for a conversation given as
    messages (rendered with the base's chat template), else ``text``."""

    id: int
    text: str
    kind: str = "document"
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs

    @classmethod
    def of(cls, row: Any) -> SnapshotItem:
        msgs = (row.meta or {}).get("messages") if isinstance(row.meta, dict) else None
        return cls(
            int(row.id), row.text, row.kind, tuple((m["role"], m["content"]) for m in msgs) if msgs else None
        )

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages or ()]


@dataclass(frozen=True)
class TrainingSnapshot:
    """A member's training data as of one consistent read."""

    model_id: str
    watermark: int
    snapshot_max_id: int
    new_items: list[SnapshotItem]
    old_items: list[SnapshotItem]  # the replayed sample of the items at or below the watermark
    # Every item at or below the watermark, sampled or not: what a later document may revise.
    earlier_items: list[SnapshotItem] = field(default_factory=list)


@dataclass(frozen=True)
class RunRecord:
    id: int
    name: str
    cycle_id: int | None
    status: str
    base_model: str
    slice_profile: str | None
    members: list[str]
    metrics: dict[str, Any]
    error: str | None
    started_at: float
    finished_at: float | None
