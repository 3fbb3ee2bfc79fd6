"""Launching packs: one Ray Train run per pack, several at once, then gated publication.

Each pack's run is named ``pack-<cycle>-<n>`` (readable in the dashboard's Train view), asks
for its slice's resources per worker, checkpoints to ``train.storage_path`` and restarts
from its last checkpoint after a failure (``FailureConfig``). Re-running a run of the same
name resumes it; a member already published by that run is never published again.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleet.errors import FleetError
from fleet.registry import PublishRequest
from fleet.train.loop import RESULT_FILE, STATE_FILE, train_pack_loop
from fleet.train.pack import MemberSpec, PackSpec, resources_of
from fleet.types import AdapterState, RunStatus

# A gate sees a member, its tier, its run metrics and its trained adapter; says yes or why not.
Gate = Callable[[MemberSpec, dict[str, Any], Any], tuple[bool, str]]


@dataclass
class MemberOutcome:
    model_id: str
    tier: str
    published: bool
    version: int | None
    reason: str
    metrics: dict[str, Any]


@dataclass
class PackOutcome:
    name: str
    run_id: int
    status: RunStatus
    seconds: float
    steps: int = 0
    members: list[MemberOutcome] = field(default_factory=list)
    error: str | None = None

    @property
    def published(self) -> int:
        return sum(m.published for m in self.members)

    @property
    def rejected(self) -> int:
        return sum(not m.published for m in self.members)


def heldout_gate(min_improvement: float) -> Gate:
    """Publish only when the held-out loss fell by more than ``min_improvement`` nats."""

    def gate(member: MemberSpec, metrics: dict[str, Any], _adapter) -> tuple[bool, str]:
        before, after = metrics["heldout_before"], metrics["heldout_after"]
        if not (after == after) or not math.isfinite(after):
            return False, f"held-out loss is {after} (diverged)"
        if after < before - min_improvement:
            return True, f"held-out loss {before:.3f} → {after:.3f}"
        return False, f"held-out loss did not improve ({before:.3f} → {after:.3f})"

    return gate


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Where training workers post their progress (the driver's display, and tests, read it)."""

        def __init__(self) -> None:
            self.state: dict[str, dict] = {}

        def update(self, name: str, data: dict) -> None:
            self.state[name] = {**self.state.get(name, {}), **data}

        def get(self, name: str) -> dict:
            return self.state.get(name, {})

        def all(self) -> dict[str, dict]:
            return dict(self.state)

    return ProgressBoard


def _fit(
    pack: dict,
    cfg: dict,
    progress,
    storage_path: str,
    storage_fs,
    resources: dict,
    use_gpu: bool,
    max_failures: int,
) -> dict:
    """Runs one TorchTrainer to completion (inside a Ray task) and returns its final outputs."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        train_pack_loop,
        train_loop_config={"pack": pack, "cfg": cfg, "progress": progress},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=pack["name"],
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    fit_s = time.perf_counter() - t0
    if result.error:
        raise result.error
    with result.checkpoint.as_directory() as d:
        out = json.loads((Path(d) / RESULT_FILE).read_text())
        import torch

        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=False)
    out["adapters"] = state["adapters"]
    out["fit_s"] = round(fit_s, 2)
    return out


def run_packs(
    fl,
    packs: Sequence[PackSpec],
    *,
    gates: Sequence[Gate] = (),
    console=None,
    on_progress: Callable[[dict[str, dict]], None] | None = None,
    poll_s: float = 0.5,
    start_timeout_s: float | None = None,
) -> list[PackOutcome]:
    """Train every pack (concurrently), then publish each member that passes every gate.

    Packs queue for their slices; a pack that cannot be placed for ``start_timeout_s`` (default
    ``train.start_timeout_s``) while none of these packs is training fails with what it asked for
    and what the cluster has free, instead of waiting forever.
    """
    import ray

    from fleet._ray import ensure_ray, train_storage

    cfg = fl.cfg
    ensure_ray(cfg)
    start_timeout_s = cfg.train.start_timeout_s if start_timeout_s is None else start_timeout_s
    _reclaim(console)
    board = _progress_board().remote()
    storage_path, storage_fs = train_storage(cfg)
    fit = ray.remote(num_cpus=0, max_retries=0)(_fit)
    gates = [heldout_gate(cfg.train.min_heldout_improvement), *gates]
    running: dict[Any, tuple[PackSpec, int, float, dict]] = {}
    for pack in packs:
        run_id = fl.registry.create_run(
            pack.name,
            base_model=pack.base_model,
            members=[m.model_id for m in pack.members],
            cycle_id=pack.cycle_id,
            slice_profile=pack.slice_profile,
        )
        res, use_gpu = resources_of(pack, cfg)
        ref = fit.remote(
            pack.to_dict(),
            cfg.model_dump(mode="json"),
            board,
            storage_path,
            storage_fs,
            res,
            use_gpu,
            cfg.train.max_failures,
        )
        running[ref] = (pack, run_id, time.time(), res)
    outcomes: list[PackOutcome] = []
    pending = list(running)
    stalled_since, reclaimed_at = time.time(), time.time()
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=poll_s)
        board_state = ray.get(board.all.remote())
        if on_progress is not None:
            on_progress(board_state)
        unplaced = [r for r in pending if running[r][0].name not in board_state]
        if done or len(unplaced) < len(pending):
            stalled_since = time.time()  # a pack is training, or one just ended: the queue moves
        elif time.time() - stalled_since > start_timeout_s:
            outcomes += _give_up(fl, unplaced, running, start_timeout_s)
            pending = [r for r in pending if r not in unplaced]
            _reclaim(console, settle_s=10.0)
        elif time.time() - reclaimed_at > 10.0:  # a run that died may still hold a slice
            reclaimed_at = time.time()
            if _reclaim(console):
                stalled_since = time.time()
        for ref in done:
            pack, run_id, t0, _ = running[ref]
            try:
                out = ray.get(ref)
            except Exception as exc:  # the run failed beyond its retries: nothing is published
                outcomes.append(_failed(fl, pack, run_id, t0, _describe(exc)))
                continue
            outcomes.append(finish_pack(fl, pack, run_id, t0, out, gates))
    order = {p.name: i for i, p in enumerate(packs)}
    return sorted(outcomes, key=lambda o: order[o.name])


def _failed(fl, pack: PackSpec, run_id: int, t0: float, error: str) -> PackOutcome:
    fl.registry.finish_run(run_id, RunStatus.FAILED, error=error)
    return PackOutcome(pack.name, run_id, RunStatus.FAILED, time.time() - t0, error=error)


def finish_pack(
    fl, pack: PackSpec, run_id: int, t0: float, out: dict[str, Any], gates: Sequence[Gate]
) -> PackOutcome:
    """Gate and publish one finished run, and record the run. A publication that fails (a gate, the
    store, the registry) fails this pack alone, with nothing of it published or left staged; the
    other packs of the cycle are collected as usual."""
    t_publish = time.perf_counter()
    try:
        outcome = publish(fl, pack, run_id, out, gates)
    except Exception as exc:  # noqa: BLE001 - recorded as this pack's failure, with the cause
        why = exc.message if isinstance(exc, FleetError) else f"{type(exc).__name__}: {_first_line(exc)}"
        return _failed(fl, pack, run_id, t0, f"publication failed, nothing published: {why}")
    outcome.seconds = time.time() - t0
    fl.registry.finish_run(
        run_id,
        RunStatus.SUCCEEDED,
        metrics={
            **out["metrics"],
            "published": outcome.published,
            "rejected": outcome.rejected,
            "seconds": outcome.seconds,
            # Ray Train's fit() (start, the loop, checkpoints) and gating + publication.
            "fit_s": out.get("fit_s"),
            "publish_s": round(time.perf_counter() - t_publish, 2),
        },
    )
    return outcome


def publish(fl, pack: PackSpec, run_id: int, out: dict[str, Any], gates: Sequence[Gate]) -> PackOutcome:
    """Gate every member; publish the passing ones as active and record the rest as rejected,
    all in one registry transaction (idempotent per run)."""
    from fleet.lora import AdapterWeights

    members, requests = [], []
    for m in pack.members:  # every gate first: nothing is staged until all have answered
        metrics = out["members"][m.model_id]
        adapter = AdapterWeights.from_bytes(*out["adapters"][m.model_id])
        ok, reasons = True, []
        for gate in gates:
            passed, why = gate(m, metrics, adapter)
            reasons.append(why)
            if not passed:
                ok = False
                break
        members.append(MemberOutcome(m.model_id, m.tier, ok, None, "; ".join(reasons), metrics))
    try:
        for m, mo in zip(pack.members, members, strict=True):
            requests.append(
                PublishRequest(
                    model_id=m.model_id,
                    staged=fl.store.stage(m.model_id, *out["adapters"][m.model_id]),
                    rank=m.rank,
                    alpha=m.alpha,
                    base_model=pack.base_model,
                    state=AdapterState.ACTIVE if mo.published else AdapterState.REJECTED,
                    parents=[a.key for a in m.ancestors],
                    watermark=m.upto if mo.published else m.watermark,
                    metrics=mo.metrics,
                    reason=None if mo.published else mo.reason,
                    run_id=run_id,
                )
            )
        published = {v.model_id: v for v in fl.registry.publish_versions(fl.store, requests)}
    except BaseException:
        for r in requests:  # nothing was published: what this pack staged goes too
            _discard(fl.store, r.staged)
        raise
    for mo in members:
        v = published.get(mo.model_id)
        mo.version = v.version if v else None
    for r in requests:
        if r.model_id not in published:
            fl.store.discard(r.staged)  # this run published the member before (a resumed run)
    return PackOutcome(
        pack.name, run_id, RunStatus.SUCCEEDED, 0.0, steps=int(out["metrics"]["step"]), members=members
    )


def _discard(store, staged) -> None:
    try:
        store.discard(staged)
    except Exception:  # noqa: BLE001 - the original failure matters; `fleet store gc` removes leftovers
        import logging

        logging.getLogger(__name__).warning("could not discard staged object %s", staged.token, exc_info=True)


def _give_up(fl, refs, running, timeout_s: float) -> list[PackOutcome]:
    """Cancel pack runs that could not be placed; record each as failed with what to fix."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    outcomes = []
    for ref in refs:
        pack, run_id, t0, asked = running[ref]
        ray.cancel(ref, force=True)  # its Train controller dies with the task
        asked = _resources_text(asked)
        err = (
            f"pack {pack.name} could not start within {timeout_s:g} s: its worker asks for {asked}; "
            f"the cluster has {_resources_text(free, total)} free. Free or add a slice that fits, "
            "or raise train.start_timeout_s where nodes take longer to join"
        )
        outcomes.append(_failed(fl, pack, run_id, t0, err))
    ray.wait(list(refs), num_returns=len(refs), timeout=10.0)
    return outcomes


def _resources_text(res: dict[str, float], total: dict[str, float] | None = None) -> str:
    keys = [
        k
        for k in sorted(res if total is None else total)
        if not k.startswith(("node:", "memory", "object_store"))
    ]
    if total is None:
        return ", ".join(f"{res[k]:g} {k}" for k in keys) or "nothing"
    return ", ".join(f"{res.get(k, 0):g} of {total[k]:g} {k}" for k in keys) or "nothing"


def _reclaim(console, settle_s: float = 0.0) -> list[str]:
    """Free slices held by Train runs whose controller died (waiting up to ``settle_s`` for one
    just cancelled to be seen dead)."""
    from fleet._ray import reclaim_train_reservations

    deadline = time.time() + settle_s
    while True:
        removed = reclaim_train_reservations()
        if removed or time.time() >= deadline:
            break
        time.sleep(0.5)
    if removed and console is not None:
        console.print(f"freed {len(removed)} slice reservation(s) left by Train runs that died")
    return removed


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _describe(exc: BaseException) -> str:
    cause = exc
    while getattr(cause, "cause", None) is not None:
        cause = cause.cause
    if isinstance(cause, FleetError):
        return cause.message
    text = str(cause).strip().splitlines()
    return text[-1] if text else type(cause).__name__
