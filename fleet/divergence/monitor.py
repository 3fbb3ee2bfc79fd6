"""The drift monitor: score versions, record every sample, decide with the policy, act on the registry.

Three entry points share one core (:func:`score_and_act`):

- :func:`publication_gate` — the training gate hook. Before a trained candidate is published it is
  judged by its tier's hard caps on what is cheap: its adapter's ‖ΔW‖_F / ‖W₀‖_F (weight space,
  base norms cached in the store per base fingerprint) and the KL / top-1 agreement with the base
  that training measured on the member's held-out data. No model forward.
- :func:`scan_after_training` — after a cycle published, every version published in that cycle is
  scored in function space on the probe set (many models per engine forward), against the base and
  its parent stack; the policy (hard caps, then the tier's population rule) decides, and the actions
  are applied: warn → ``warned``, freeze → ``frozen`` (the scheduler skips it), rollback → the
  previous active version is restored for serving (``Registry.rollback``, one transaction).
- :func:`scan` — ``fleet drift scan``: every active version not yet scored on the current probe set.

Every sample (relation ``base`` and ``parent``) and every action is written to the registry with
the model's id and version; Ray metrics get the same figures tagged by tier, base and relation only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fleet.divergence import probes as probe_sets
from fleet.divergence._basenorms import base_norms
from fleet.divergence.policy import (
    Decision,
    DriftMetrics,
    DriftPolicy,
    DriftSample,
    decide,
    population_stats,
)
from fleet.divergence.scoring import FunctionScorer, ScoreItem, VersionScore
from fleet.divergence.telemetry import TELEMETRY
from fleet.errors import ConflictError, ValidationError
from fleet.types import DriftAction, DriftState, validate_id, version_key

GATE_PREFIX = "drift"


@dataclass
class ScanResult:
    """What a scan did: counts, one line per scored version, versions it could not score."""

    probe_set: str | None
    counts: dict[str, int] = field(
        default_factory=lambda: {"scored": 0, "warned": 0, "frozen": 0, "rolled_back": 0}
    )
    versions: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def scored(self) -> int:
        return self.counts["scored"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def policy_of(cfg) -> DriftPolicy:
    return DriftPolicy.from_config(cfg, freeze_after=cfg.divergence.freeze_after)


# ---------------------------------------------------------------------- the gate
def adapter_rel_norm(adapter, norms: dict[str, float]) -> float:
    """‖ΔW‖_F / ‖W₀‖_F of one adapter over all its modules (Gram matrices; B·A never formed)."""
    from fleet.divergence.metrics import lora_batches, weight_metrics

    return float(weight_metrics(lora_batches([adapter.modules()], [adapter.scale]), norms).rel_fro_N[0])


def _num(x: Any) -> float | None:
    return None if x is None else float(x)


def publication_gate(fl) -> Callable[[Any, dict[str, Any], Any], tuple[bool, str]]:
    """The training gate hook: ``gate(member, metrics, adapter) -> (publish?, reason)``.

    A candidate over its tier's hard caps is rejected; the REJECT (and a FREEZE when the strikes
    reach ``divergence.freeze_after``) is recorded with the model's history at once. The rejected
    version's number is assigned by the publication that follows, so these rows carry no version;
    the rejected version itself records the same reason.
    """
    policy = policy_of(fl.cfg)

    def gate(member, metrics: dict[str, Any], adapter) -> tuple[bool, str]:
        rel = adapter_rel_norm(adapter, base_norms(fl))
        dm = DriftMetrics(
            kl=_num(metrics.get("kl_base")),
            rel_weight_norm=rel,
            top1_agreement=_num(metrics.get("top1_base")),
            general_dnll=_num(metrics.get("general_dnll")),
        )
        status = fl.registry.drift_status([member.model_id])[member.model_id]
        sample = DriftSample(
            member.model_id, 0, member.tier, dm, candidate=True, state=status.state, strikes=status.strikes
        )
        decisions = decide([sample], policy, population={})
        if decisions[0].action is None:
            return True, f"{GATE_PREFIX}: within the {member.tier} caps (rel ‖ΔW‖ {rel:.3g})"
        last = decisions[-1]
        actions = [
            (d.action.value, None, f"candidate rejected at publication: {d.reason}")
            for d in decisions
            if d.action
        ]
        fl.registry.apply_drift(member.model_id, state=last.state, strikes=last.strikes, actions=actions)
        base = fl.cfg.base.name
        for d in decisions:
            if d.action:
                TELEMETRY.action(member.tier, base, d.action.value)
        return False, f"{GATE_PREFIX} cap: {decisions[0].reason}"

    return gate


# ---------------------------------------------------------------------- scans
def scan_after_training(fl, cycle_id: int, outcomes: Iterable[Any]) -> dict[str, int]:
    """Score and act on every version published in this cycle; counts join the cycle's summary."""
    versions = sorted(
        {
            (m.model_id, int(m.version), str(m.tier))
            for o in outcomes
            for m in o.members
            if m.published and m.version
        }
    )
    if not versions:
        return {"scored": 0, "warned": 0, "frozen": 0, "rolled_back": 0}
    return score_and_act(fl, versions).counts


def scan(fl, models: Sequence[str] | None = None, *, probe_set: str | None = None, engine=None) -> ScanResult:
    """Score every active version not yet scored on the probe set (of ``models``, or all), and act."""
    t0 = time.perf_counter()
    reg = fl.registry
    skipped: list[dict[str, str]] = []
    if models:
        ids = list(dict.fromkeys(validate_id(m) for m in models))
        status = reg.drift_status(ids)  # NotFoundError names unknown models
        counts = reg.version_counts(ids)
        never = [m for m in ids if counts[m] == 0]
        if never:
            raise ValidationError(
                f"model(s) without any version: {', '.join(never[:5])}; there is nothing to score until they "
                "are trained (`fleet train`) or imported (`fleet adapters import`)"
            )
        foreign = [m for m in ids if status[m].base_model != fl.cfg.base.name]
        if foreign:
            raise ValidationError(
                f"model(s) {', '.join(foreign[:5])} are on another base ({status[foreign[0]].base_model!r}) than "
                f"this configuration's {fl.cfg.base.name!r}; scan them with that base's configuration"
            )
        skipped = [
            {"model_id": m, "reason": "no active version"} for m in ids if status[m].active_version is None
        ]
    row = probe_sets.current(fl, probe_set)
    name = row["name"] if row else None
    # A probe set that does not exist yet has scored nothing: every active version is to do.
    todo = reg.unscored_versions(name or "", models or None, base_model=fl.cfg.base.name)
    if not todo:
        res = ScanResult(name, skipped=skipped)
        res.seconds = time.perf_counter() - t0
        return res
    res = score_and_act(fl, todo, probe_set=probe_set, engine=engine)
    res.skipped = skipped + res.skipped
    res.seconds = time.perf_counter() - t0
    return res


def score_and_act(
    fl, versions: Sequence[tuple[str, int, str]], *, probe_set: str | None = None, engine=None
) -> ScanResult:
    """Score ``(model id, version, tier)`` s, record samples, decide, apply. See the module docstring."""
    t0 = time.perf_counter()
    reg, cfg = fl.registry, fl.cfg
    items, entries = _items(reg, versions)
    if engine is None:
        engine = scoring_engine(fl, max(e.rank for e in entries.values()))
    probe = probe_sets.ensure(fl, engine.model, name=probe_set)

    def fetch(key: str):
        from fleet.lora import AdapterWeights

        e = entries[key]
        files = fl.store.read_version(e.uri, e.sha256)
        return AdapterWeights.from_bytes(files.config, files.weights)

    scorer = FunctionScorer(
        engine, probe, fetch, batch_models=cfg.divergence.batch_models, base_norms=base_norms(fl)
    )
    scores = scorer.score(items)
    res = ScanResult(probe.name)
    res.errors = [asdict(e) for e in scorer.errors]
    _record(fl, probe.name, scores)
    res.counts["scored"] = len(scores)
    decisions = _decide(fl, probe.name, scores)
    applied = _apply(fl, decisions, {s.model_id: s.tier for s in scores})
    for k in ("warned", "frozen", "rolled_back"):
        res.counts[k] = applied[k]
    acted = applied["by_model"]
    for s in scores:
        res.versions.append({
            "model_id": s.model_id, "version": s.version, "tier": s.tier,
            "kl": s.base["kl"], "kl_upper": s.base["kl_upper"], "top1": s.base["top1"], "dnll": s.base["dnll"],
            "rel_weight_norm": s.own_rel_weight_norm,
            "parent_kl": None if s.parent is None else s.parent["kl"],
            "actions": acted.get(s.model_id, []),
        })  # fmt: skip
    res.seconds = time.perf_counter() - t0
    return res


def _items(reg, versions: Sequence[tuple[str, int, str]]):
    """Score items (the version on top of its parent's active stack) and the stack entries by key."""
    parents = sorted({m.rsplit("/", 1)[0] for m, _, _ in versions if "/" in m})
    stacks = reg.active_stacks(parents) if parents else {}
    own = reg.version_entries([(m, v) for m, v, _ in versions])
    entries = {}
    items = []
    for m, v, tier in versions:
        above = stacks[m.rsplit("/", 1)[0]].entries if "/" in m else ()
        levels = (*above, own[(m, v)])
        # Engine keys carry the content hash: a process-wide engine never mistakes another
        # registry's (or a rebuilt store's) version of the same name for a resident one.
        keys = tuple(f"{e.key}#{e.sha256[:16]}" for e in levels)
        entries.update(zip(keys, levels, strict=True))
        items.append(ScoreItem(m, v, tier, keys))
    return items, entries


_ENGINES: dict[tuple, Any] = {}


def scoring_engine(fl, max_rank: int):
    """An engine over the base with room for a chunk of stacks; kept per process and reused
    (resident adapters are immutable versions, so a later scan may use them as they are)."""
    from fleet.lora.build import build_engine

    div = fl.cfg.divergence
    slots = 3 * max(4 * div.batch_models, 16)
    key = (str(fl.cfg.base_path), fl.cfg.base.device, slots)
    engine = _ENGINES.get(key)
    if engine is None or engine.max_rank < max_rank:
        engine, _ = build_engine(fl.cfg, slots=slots, ranks=[max_rank])
        _ENGINES.clear()  # one base per process: drop an older engine before keeping this one
        _ENGINES[key] = engine
    return engine


def _record(fl, probe_name: str, scores: Sequence[VersionScore]) -> None:
    base_model = fl.cfg.base.name
    rows = []
    for s in scores:
        for relation, d in (("base", s.base), ("parent", s.parent)):
            if d is None:
                continue
            core = {k: d.get(k) for k in ("kl", "tv", "top1", "dnll", "rel_weight_norm")}
            extra = {k: v for k, v in d.items() if k not in core}
            rows.append({"model_id": s.model_id, "version": s.version, "tier": s.tier, "relation": relation,
                         "probe_set": probe_name, **core, "metrics": extra})  # fmt: skip
            TELEMETRY.scored(s.tier, base_model, relation, d)
    fl.registry.add_divergence_samples(rows)


def accepted_metrics(samples: Iterable[dict[str, Any]]) -> dict[str, tuple[str, DriftMetrics]]:
    """Model id → (tier, the policy's metrics) from the base and parent samples of active versions:
    function space against the base; the own adapter's size (the parent distance, or the stack's
    size when the parent is the base)."""
    by: dict[str, dict[str, dict[str, Any]]] = {}
    for r in samples:
        by.setdefault(r["model_id"], {})[r["relation"]] = r
    out = {}
    for m, rel in by.items():
        b = rel.get("base")
        if b is None:
            continue
        own = (rel.get("parent") or b).get("rel_weight_norm")
        out[m] = (
            b["tier"],
            DriftMetrics(kl=b["kl"], rel_weight_norm=own, top1_agreement=b["top1"], general_dnll=b["dnll"]),
        )
    return out


def _decide(fl, probe_name: str, scores: Sequence[VersionScore]) -> list[Decision]:
    """The policy on the scored versions that are still active, against their tiers' populations
    (the newest sample of every active version on this probe set, the new ones included)."""
    reg = fl.registry
    status = reg.drift_status([s.model_id for s in scores])
    accepted = accepted_metrics(reg.accepted_samples(probe_name))
    population = population_stats(DriftSample(m, 0, tier, dm) for m, (tier, dm) in accepted.items())
    samples = [
        DriftSample(s.model_id, s.version, s.tier, s.drift_metrics(), state=status[s.model_id].state,
                    strikes=status[s.model_id].strikes, has_previous=status[s.model_id].has_previous)
        for s in scores
        if status[s.model_id].active_version == s.version  # rolled back or replaced meanwhile: history only
    ]  # fmt: skip
    return decide(samples, policy_of(fl.cfg), population)


def _apply(fl, decisions: Sequence[Decision], tiers: dict[str, str]) -> dict[str, Any]:
    """Apply decisions model by model: the rollback (its own registry transaction), then state,
    strikes and the action rows in one transaction."""
    reg, base = fl.registry, fl.cfg.base.name
    grouped: dict[str, list[Decision]] = {}
    for d in decisions:
        grouped.setdefault(d.model_id, []).append(d)
    status = reg.drift_status(list(grouped)) if grouped else {}
    out: dict[str, Any] = {"warned": 0, "frozen": 0, "rolled_back": 0, "by_model": {}}
    for mid, ds in grouped.items():
        last = ds[-1]
        actions = []
        for d in ds:
            if d.action is DriftAction.ROLLBACK:
                # Another scan (a cycle's, a watch job's) may have acted on this version since it was
                # judged; roll back only the version that was judged, never the one restored before it.
                try:
                    restored = reg.rollback(
                        mid, reason=f"drift rollback: {d.reason}", expected_version=d.version
                    )
                except ConflictError:  # no longer the active version (another scan or an operator acted)
                    continue
                to = version_key(mid, restored.version) if restored else "its ancestors' stack"
                actions.append((d.action.value, d.version, f"{d.reason}; serving {to}"))
                out["rolled_back"] += 1
            elif d.action is not None:
                actions.append((d.action.value, d.version, d.reason))
                if d.action is DriftAction.WARN:
                    out["warned"] += 1
                elif d.action is DriftAction.FREEZE:
                    out["frozen"] += 1
        st = status[mid]
        if actions or st.state is not last.state or st.strikes != last.strikes:
            reg.apply_drift(mid, state=last.state, strikes=last.strikes, actions=actions)
        for a, _, _ in actions:
            TELEMETRY.action(tiers.get(mid, "unknown"), base, a)
        out["by_model"][mid] = [a for a, _, _ in actions]
    return out


def unfreeze(fl, model_id: str, reason: str = "unfrozen by operator") -> None:
    """An operator's decision: the model trains again; its strikes start from zero."""
    status = fl.registry.drift_status([validate_id(model_id)])[model_id]
    if status.state is not DriftState.FROZEN:
        raise ConflictError(f"{model_id!r} is not frozen (its drift state is {status.state.value})")
    fl.registry.apply_drift(model_id, state=DriftState.OK, strikes=0,
                            actions=[(DriftAction.UNFREEZE.value, status.active_version, reason)])  # fmt: skip
    TELEMETRY.action(status.tier, fl.cfg.base.name, DriftAction.UNFREEZE.value)
