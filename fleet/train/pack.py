"""What one training run trains: a pack spec, built and checked on the driver.

A :class:`PackSpec` is small and picklable — ids, versions, URIs, schedules — because it
crosses the Ray boundary into the training worker, which builds everything heavy (the
base, the engine, the data) itself. The data of each member is pinned by item ids
(``watermark < id ≤ upto``), so a worker restarted after a failure trains on exactly the
same rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.config import FleetConfig, LearningSchedule
from fleet.errors import ValidationError
from fleet.types import DriftState, lineage, validate_id


@dataclass(frozen=True)
class AdapterRef:
    key: str  # "<model id>@v<n>"
    uri: str
    sha256: str


@dataclass(frozen=True)
class MemberSpec:
    model_id: str
    tier: str
    rank: int
    alpha: float
    start: AdapterRef | None  # the active version training continues from (None: a fresh adapter)
    ancestors: tuple[AdapterRef, ...]  # active versions of the lineage above, company first, frozen
    watermark: int
    upto: int
    schedule: dict[str, Any]
    replay_fraction: float
    kl_weight: float
    token_budget: int | None  # tokens of new data this run learns (the plan's budget); None: all pending
    seed: int

    @property
    def train_key(self) -> str:
        return f"{self.model_id}@train"

    @property
    def learning_schedule(self) -> LearningSchedule:
        return LearningSchedule.model_validate(self.schedule)


@dataclass(frozen=True)
class PackSpec:
    name: str
    cycle_id: int
    index: int
    base_model: str
    members: tuple[MemberSpec, ...]
    slice_profile: str | None = None
    resources: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return max(m.learning_schedule.steps for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PackSpec:
        members = tuple(
            MemberSpec(
                **{
                    **m,
                    "start": AdapterRef(**m["start"]) if m["start"] else None,
                    "ancestors": tuple(AdapterRef(**a) for a in m["ancestors"]),
                }
            )
            for m in d["members"]
        )
        return cls(**{**d, "members": members})


def tier_schedule(cfg: FleetConfig, registry, tier: str) -> LearningSchedule:
    """The tier's schedule: the newest one a sweep stored in the registry, else the config's."""
    base = cfg.tier(tier).schedule
    stored = registry.tier_schedule(tier)
    if stored:
        return LearningSchedule.model_validate({**base.model_dump(), **stored["params"]})
    return base


def build_pack(
    fl,
    model_ids: list[str],
    *,
    cycle_id: int,
    index: int,
    token_budgets: list[int] | None = None,
    slice_profile: str | None = None,
    resources: dict[str, float] | None = None,
    steps: int | None = None,
    schedule: dict[str, Any] | None = None,
    from_scratch: bool = False,
    name: str | None = None,
) -> PackSpec:
    """Check a pack and pin its members' data; every problem is a clear error, nothing runs.

    ``schedule`` overrides fields of every member's learning schedule (a sweep trial's
    parameters); ``from_scratch`` trains fresh adapters on all of each member's data (what a
    sweep compares schedules on) instead of continuing the active version on new data.
    """
    if not model_ids:
        raise ValidationError("an empty pack: name at least one model to train")
    for m in model_ids:
        validate_id(m)
    if len(set(model_ids)) != len(model_ids):
        dup = next(m for m in model_ids if model_ids.count(m) > 1)
        raise ValidationError(f"model {dup!r} appears twice in the pack")
    cfg: FleetConfig = fl.cfg
    reg = fl.registry
    models = reg.get_models(model_ids)
    bases = {m.base_model for m in models.values()}
    if bases != {cfg.base.name}:
        wrong = sorted(m.id for m in models.values() if m.base_model != cfg.base.name)
        raise ValidationError(
            f"base mismatch: {', '.join(wrong[:3])} {'is' if len(wrong) == 1 else 'are'} on base "
            f"{models[wrong[0]].base_model!r} but this pack trains on {cfg.base.name!r}; "
            "a pack holds models of one base"
        )
    frozen = [m for m in model_ids if models[m].drift_state is DriftState.FROZEN]
    if frozen:
        raise ValidationError(
            f"model {frozen[0]!r} is frozen by the drift monitor; unfreeze it before training"
        )
    if token_budgets is not None and len(token_budgets) != len(model_ids):
        raise ValidationError("token_budgets must name one budget per member")
    stacks = reg.active_stacks(model_ids)
    snaps = reg.training_snapshot(model_ids)
    members = []
    for i, mid in enumerate(model_ids):
        snap = snaps[mid]
        if from_scratch:
            snap = reg.training_snapshot([mid], pins={mid: (0, snap.snapshot_max_id)})[mid]
        if not snap.new_items:
            raise ValidationError(
                f"model {mid!r} has no new data since its watermark (item {snap.watermark}); "
                "ingest context first (`fleet ingest`)"
            )
        upto = snap.snapshot_max_id
        if token_budgets is not None and not from_scratch:
            # The plan's budget is the new data this run learns; a larger backlog waits for the
            # next cycle (the watermark only advances past what was learned).
            upto = _budget_upto(reg, mid, snap.watermark, upto, int(token_budgets[i]))
        tier = models[mid].tier
        sched = tier_schedule(cfg, reg, tier)
        if schedule:
            sched = LearningSchedule.model_validate({**sched.model_dump(), **schedule})
        if steps:
            sched = sched.model_copy(update={"steps": steps})
        above = set(lineage(mid)[:-1])
        entries = stacks[mid].entries
        ancestors = tuple(AdapterRef(e.key, e.uri, e.sha256) for e in entries if e.model_id in above)
        own = None if from_scratch else next((e for e in entries if e.model_id == mid), None)
        members.append(
            MemberSpec(
                model_id=mid,
                tier=tier,
                # A model continues at its active version's rank; a fresh adapter takes the tier's.
                rank=own.rank if own else (sched.rank or models[mid].lora_rank),
                alpha=own.alpha if own else models[mid].lora_alpha,
                start=AdapterRef(own.key, own.uri, own.sha256) if own else None,
                ancestors=ancestors,
                watermark=snap.watermark,
                upto=upto,
                schedule=sched.model_dump(),
                replay_fraction=sched.replay_fraction,
                kl_weight=sched.kl_weight,
                token_budget=int(token_budgets[i]) if token_budgets else None,
                seed=cfg.train.seed,
            )
        )
    return PackSpec(
        name=name or f"pack-{cycle_id}-{index}",
        cycle_id=cycle_id,
        index=index,
        base_model=cfg.base.name,
        members=tuple(members),
        slice_profile=slice_profile,
        resources=dict(resources or {}),
    )


def _budget_upto(reg, model_id: str, watermark: int, upto: int, budget: int) -> int:
    """The last new item that fits the budget (always at least the first one)."""
    total, last = 0, None
    for item in reg.items(model_id, after=watermark):
        if item["id"] > upto:
            break
        if last is not None and total + item["tokens"] > budget:
            break
        total += item["tokens"]
        last = item["id"]
    return last if last is not None else upto


def resources_of(pack: PackSpec, cfg: FleetConfig) -> tuple[dict[str, float], bool]:
    """What the pack's worker asks for: its slice's resources, or CPUs where no slice is named."""
    res = dict(pack.resources) or {"CPU": cfg.train.cpus_per_worker}
    use_gpu = res.get("GPU", 0) > 0
    return res, use_gpu


def cpu_threads(pack: PackSpec, cfg: FleetConfig) -> int:
    """Intra-op threads of the pack's training on CPU: one per whole CPU its worker was given."""
    return max(1, int(resources_of(pack, cfg)[0].get("CPU", 1)))
