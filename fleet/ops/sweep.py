"""``fleet sweep``: Ray Tune over a tier's learning schedule, the Train V2 way.

Every trial is a function that builds a TorchTrainer for a small pack of sampled models of
the tier (fresh adapters, all their data, the trial's schedule) and reports the objective —
held-out loss + λ·KL(base ‖ model) — every few steps, so that ASHA stops bad trials early.
Trials never publish anything. ``--apply`` stores the winner as the tier's schedule in the
registry (versioned), which training uses from then on.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleet.errors import ValidationError
from fleet.types import TIERS

# The searched fields of a LearningSchedule.
SEARCHED = ("lr", "warmup_steps", "decay", "rank", "replay_fraction", "kl_weight")


def search_space(seed: int) -> dict[str, Any]:
    from ray import tune

    return {
        "lr": tune.loguniform(3e-4, 3e-2),
        "warmup_steps": tune.randint(0, 11),
        "decay": tune.choice(["constant", "linear", "cosine"]),
        "rank": tune.choice([4, 8, 16]),
        "replay_fraction": tune.uniform(0.0, 0.5),
        "kl_weight": tune.choice([0.0, 0.01, 0.1, 0.5]),
    }


@dataclass
class SweepResult:
    tier: str
    models: list[str]
    trials: list[dict[str, Any]]  # params, objective, heldout, kl, steps reported, status
    best: dict[str, Any] | None
    applied_version: int | None
    plot: str | None
    seconds: float


def _trial(config: dict[str, Any]) -> None:
    """One trial: a TorchTrainer over the trial's pack, reporting to Tune as it trains."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from fleet.train.loop import train_pack_loop
    from fleet.train.pack import PackSpec

    pack = PackSpec.from_dict(config["pack"])
    params = {k: config[k] for k in SEARCHED}
    members = []
    for m in pack.members:
        sched = {
            **m.schedule,
            **{k: params[k] for k in ("lr", "warmup_steps", "decay", "replay_fraction", "kl_weight")},
        }
        members.append(
            {
                **m.__dict__,
                "schedule": sched,
                "rank": int(params["rank"]),
                "replay_fraction": params["replay_fraction"],
                "kl_weight": params["kl_weight"],
                "start": None,
                "ancestors": [a.__dict__ for a in m.ancestors],
            }
        )
    import ray.tune

    trial_name = ray.tune.get_context().get_trial_name() or "trial"
    spec = {**pack.to_dict(), "members": members, "name": f"{pack.name}-{trial_name}"}
    trainer = TorchTrainer(
        train_pack_loop,
        train_loop_config={
            "pack": spec,
            "cfg": config["cfg"],
            "eval_every": config["report_every"],
            "kl_lambda": config["kl_lambda"],
        },
        scaling_config=ScalingConfig(
            num_workers=1, use_gpu=config["use_gpu"], resources_per_worker=config["resources"]
        ),
        run_config=RunConfig(
            name=spec["name"], storage_path=config["storage_path"], callbacks=[TuneReportCallback()]
        ),
    )
    trainer.fit()


def run_sweep(
    fl,
    *,
    tier: str,
    samples: int,
    models: int,
    apply: bool = False,
    steps: int | None = None,
    seed: int = 0,
    plot: str | None = None,
    console=None,
) -> SweepResult:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from fleet._ray import ensure_ray, train_storage
    from fleet.train.pack import build_pack, resources_of

    if tier not in TIERS:
        raise ValidationError(f"unknown tier {tier!r}; tiers are {', '.join(TIERS)}")
    if samples < 1 or models < 1:
        raise ValidationError("--samples and --models must be at least 1")
    cfg = fl.cfg
    candidates = [
        m.id for m in fl.registry.list_models(tier=tier) if m.item_count > 0 and m.drift_state.trains
    ]
    if not candidates:
        tier_models = fl.registry.list_models(tier=tier)
        frozen = [m.id for m in tier_models if m.item_count > 0 and not m.drift_state.trains]
        if frozen:
            raise ValidationError(
                f"every {tier} model with data is frozen by the drift monitor ({len(frozen)}: "
                f"{', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}); "
                "unfreeze one (`fleet drift unfreeze MODEL`) to sweep on it"
            )
        raise ValidationError(f"no {tier} model has data to sweep on; ingest context first")
    rng = random.Random(seed)
    chosen = sorted(rng.sample(candidates, min(models, len(candidates))))
    t0 = time.time()
    sweep_id = int(t0)
    pack = build_pack(
        fl, chosen, cycle_id=0, index=0, steps=steps, from_scratch=True, name=f"sweep-{tier}-{sweep_id}"
    )
    ensure_ray(cfg)
    storage_path, storage_fs = train_storage(cfg)
    if storage_fs is not None:
        raise ValidationError("sweeps keep their trials on a local train.storage_path for now")
    res, use_gpu = resources_of(pack, cfg)
    total_steps = pack.steps
    report_every = max(1, cfg.sweep.report_every)
    space = {
        **search_space(seed),
        "pack": pack.to_dict(),
        "cfg": cfg.model_dump(mode="json"),
        "report_every": report_every,
        "kl_lambda": cfg.sweep.kl_lambda,
        "resources": res,
        "use_gpu": use_gpu,
        "storage_path": storage_path,
    }
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=max(2, total_steps // report_every + 1),
        grace_period=1,
        reduction_factor=2,
    )
    # The trial function only drives its TorchTrainer: a sliver of a CPU (Tune refuses zero).
    driver_cpu = 0.01
    cpus = float(ray.cluster_resources().get("CPU", 1))
    concurrent = max(1, int((cpus - samples * driver_cpu) // max(1.0, res.get("CPU", 1.0))))
    tuner = tune.Tuner(
        tune.with_resources(_trial, {"CPU": driver_cpu}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="objective",
            mode="min",
            num_samples=samples,
            scheduler=scheduler,
            max_concurrent_trials=concurrent,
        ),
        run_config=tune.RunConfig(name=f"sweep-{tier}-{sweep_id}", storage_path=storage_path),
    )
    grid = tuner.fit()
    trials = []
    for r in grid:
        m = r.metrics or {}
        params = {k: r.config[k] for k in SEARCHED}
        trials.append(
            {
                "params": params,
                "objective": m.get("objective"),
                "heldout": m.get("heldout"),
                "kl": m.get("kl"),
                "reports": m.get("training_iteration"),
                "step": m.get("step"),
                "completed": bool(m.get("final")),
                "error": str(r.error).splitlines()[0] if r.error else None,
            }
        )
    done = [t for t in trials if t["objective"] is not None and t["completed"]]
    best = min(done, key=lambda t: t["objective"]) if done else None
    applied = None
    if apply:
        if best is None:
            raise ValidationError("no trial completed; nothing to apply")
        params = {
            **best["params"],
            "warmup_steps": int(best["params"]["warmup_steps"]),
            "rank": int(best["params"]["rank"]),
        }
        applied = fl.registry.set_tier_schedule(
            tier, params, source=f"fleet sweep {sweep_id}: objective {best['objective']:.4f}"
        )
    plot_path = plot_trials(trials, plot, tier) if plot else None
    out = SweepResult(tier, chosen, trials, best, applied, plot_path, time.time() - t0)
    if console is not None:
        render(out, console)
    return out


def plot_trials(trials: list[dict[str, Any]], path: str, tier: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"constant": "tab:blue", "linear": "tab:orange", "cosine": "tab:green"}
    for t in trials:
        if t["objective"] is None:
            continue
        p = t["params"]
        ax.scatter(
            p["lr"],
            t["objective"],
            s=30 + 8 * int(p["rank"]),
            c=colors[p["decay"]],
            marker="o" if t["completed"] else "x",
            alpha=0.8,
        )
    for decay, c in colors.items():
        ax.scatter([], [], c=c, label=decay)
    ax.set_xscale("log")
    ax.set_xlabel("peak learning rate")
    ax.set_ylabel("objective: held-out loss + λ·KL")
    ax.set_title(f"fleet sweep, tier {tier} (size = rank, x = stopped early by ASHA)")
    ax.legend(title="decay")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def render(res: SweepResult, console) -> None:
    from rich.table import Table

    t = Table(title=f"sweep over tier {res.tier} ({len(res.models)} models, {res.seconds:.0f} s)")
    for col in ("lr", "warmup", "decay", "rank", "replay", "KL w", "objective", "held-out", "KL", "status"):
        t.add_column(col, justify="right")
    for tr in sorted(res.trials, key=lambda x: (x["objective"] is None, x["objective"] or 0)):
        p = tr["params"]
        status = "error" if tr["error"] else ("done" if tr["completed"] else "stopped early")
        fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
        t.add_row(
            f"{p['lr']:.2e}",
            str(p["warmup_steps"]),
            p["decay"],
            str(p["rank"]),
            f"{p['replay_fraction']:.2f}",
            f"{p['kl_weight']:g}",
            fmt(tr["objective"]),
            fmt(tr["heldout"]),
            fmt(tr["kl"]),
            status,
            style="bold green" if tr is res.best else None,
        )
    console.print(t)
    if res.applied_version:
        console.print(
            f"applied: tier {res.tier} schedule v{res.applied_version} (training uses it from now on)"
        )
    if res.plot:
        console.print(f"plot: {res.plot}")
