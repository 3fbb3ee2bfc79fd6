"""``fleet drift report``: per-tier drift distributions over time, the worst offenders, recent actions.

:func:`build_report` reads the registry and returns plain JSON-able data; :func:`render_report`
prints it as tables and :func:`plot_report` draws the distributions over time (PNG, matplotlib's
Agg backend, no display needed).

- ``over_time``: samples bucketed by when they were taken, per tier, relation and metric: count,
  mean, p50, p90, max. The bucket width is the smallest of 1 min, 5 min, 15 min, 1 h, 6 h, 1 day,
  1 week that gives at most ``buckets`` buckets over the window.
- ``current``: per tier, the distribution of what the policy judges for every active version on
  the current probe set, with the tier's hard cap and the population limit (mean ± k·σ).
- ``worst``: active versions ranked by severity, the largest ratio of a metric to its cap
  (KL/max_kl, ‖ΔW‖/max_rel_weight_norm, ΔNLL/max_general_dnll, (1−top1)/(1−min_top1)); ≥ 1 is over.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleet.divergence.monitor import accepted_metrics, policy_of
from fleet.divergence.policy import METRICS, DriftMetrics
from fleet.types import TIERS

REPORT_METRICS = ("kl", "top1", "dnll", "rel_weight_norm")
_COLUMN = {"kl": "kl", "top1_agreement": "top1", "general_dnll": "dnll", "rel_weight_norm": "rel_weight_norm"}
_WIDTHS = (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
_LABEL = {"kl": "KL(base ‖ model), nats/token", "top1": "top-1 agreement with the base",
          "dnll": "ΔNLL on general text, nats/token", "rel_weight_norm": "‖ΔW‖_F / ‖W₀‖_F (stack vs base)"}  # fmt: skip


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"count": 0}
    return {
        "count": int(a.size), "mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()),
        "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)), "max": float(a.max()),
    }  # fmt: skip


def severity(dm: DriftMetrics, caps) -> tuple[float, list[str]]:
    """The largest metric/cap ratio (≥ 1: over a cap) and the metrics over their caps."""
    worst, over = 0.0, []
    for name, cap_field, sign in METRICS:
        value, cap = dm.get(name), float(getattr(caps, cap_field))
        if value is None or not math.isfinite(value):
            continue
        ratio = value / cap if sign > 0 else (1.0 - value) / max(1.0 - cap, 1e-9)
        worst = max(worst, ratio)
        if (value - cap) * sign > 0:
            over.append(name)
    return worst, over


def build_report(
    fl, *, since_days: float = 30.0, worst: int = 10, actions: int = 20, buckets: int = 12
) -> dict[str, Any]:
    reg, cfg = fl.registry, fl.cfg
    policy = policy_of(cfg)
    now = time.time()
    probes = reg.list_probe_sets(cfg.base.name)
    probe = probes[0] if probes else None
    samples = reg.drift_samples(since=now - since_days * 86400)

    # -- distributions over time ------------------------------------------------------------
    over_time: dict[str, Any] = {}
    width = None
    if samples:
        t_min, t_max = samples[0]["created_at"], samples[-1]["created_at"]
        width = next((w for w in _WIDTHS if (t_max - t_min) / w < buckets), _WIDTHS[-1])
        cells: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
        for s in samples:
            cells.setdefault((s["tier"], s["relation"], int(s["created_at"] // width)), []).append(s)
        for (tier, relation, b), rows in sorted(cells.items()):
            per = over_time.setdefault(tier, {}).setdefault(relation, {})
            for metric in REPORT_METRICS:
                st = _stats([r[metric] for r in rows])
                if st["count"]:
                    per.setdefault(metric, []).append({"t0": b * width, "t1": (b + 1) * width, **st})

    # -- what the policy sees now --------------------------------------------------------------
    accepted = accepted_metrics(reg.accepted_samples(probe["name"])) if probe else {}
    current: dict[str, Any] = {}
    for tier in TIERS:
        mine = [dm for t, dm in accepted.values() if t == tier]
        caps = policy.caps_for(tier)
        per = {}
        for name, cap_field, sign in METRICS:
            st = _stats([dm.get(name) for dm in mine])
            st["cap"] = float(getattr(caps, cap_field))
            if st["count"] >= policy.min_population:
                st["population_limit"] = st["mean"] + sign * policy.population_sigma * st["std"]
            per[_COLUMN[name]] = st
        current[tier] = {"models": len(mine), "metrics": per}

    ranked = []
    for mid, (tier, dm) in accepted.items():
        sev, over = severity(dm, policy.caps_for(tier))
        ranked.append((sev, mid, tier, dm, over))
    ranked.sort(key=lambda r: (-r[0], r[1]))
    top = ranked[:worst]
    status = reg.drift_status([r[1] for r in top]) if top else {}
    worst_rows = [
        {"model_id": mid, "version": status[mid].active_version, "tier": tier, "severity": sev, "over": over,
         "drift_state": status[mid].state.value, "strikes": status[mid].strikes,
         **{_COLUMN[n]: dm.get(n) for n, _, _ in METRICS}}
        for sev, mid, tier, dm, over in top
    ]  # fmt: skip

    probe_info = None
    if probe is not None:
        probe_info = {
            "name": probe["name"],
            "created_at": probe["created_at"],
            "meta": probe.get("meta") or {},
        }
    return {
        "generated_at": now,
        "base_model": cfg.base.name,
        "probe_set": probe_info,
        "window_days": since_days,
        "samples": len(samples),
        "bucket_s": width,
        "caps": {t: policy.caps_for(t).model_dump() for t in TIERS},
        "policy": {
            "population_sigma": policy.population_sigma,
            "min_population": policy.min_population,
            "freeze_after": policy.freeze_after,
        },
        "states": reg.drift_state_counts(),
        "over_time": over_time,
        "current": current,
        "worst": worst_rows,
        "actions": [
            {
                "at": a["created_at"],
                "model_id": a["model_id"],
                "version": a["version"],
                "action": a["action"],
                "reason": a["reason"],
            }
            for a in reg.drift_actions(limit=actions)
        ],
    }


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    """Per-tier p50 (solid), p90 (dashed) and max (dots) over time of KL, top-1 agreement and ΔNLL
    against the base and of the stack's relative ‖ΔW‖, with each tier's hard cap (thin line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(12, 7.5), sharex=True)
    colors = {"company": "tab:blue", "team": "tab:orange", "individual": "tab:green"}
    cap_of = {
        "kl": "max_kl",
        "top1": "min_top1_agreement",
        "dnll": "max_general_dnll",
        "rel_weight_norm": None,
    }
    series = report.get("over_time") or {}
    starts = [r["t0"] for per in series.values() for rows in per.get("base", {}).values() for r in rows]
    t0 = min(starts, default=0.0)
    for ax, metric in zip(axes.flat, REPORT_METRICS, strict=True):
        ax.set_title(_LABEL[metric], fontsize=10)
        ax.grid(alpha=0.3)
        for tier in TIERS:
            rows = series.get(tier, {}).get("base", {}).get(metric, [])
            if not rows:
                continue
            x = [((r["t0"] + r["t1"]) / 2 - t0) / 3600 for r in rows]
            c = colors[tier]
            ax.plot(x, [r["p50"] for r in rows], "-o", color=c, ms=3, label=f"{tier} p50")
            ax.plot(x, [r["p90"] for r in rows], "--", color=c, lw=1, label=f"{tier} p90")
            ax.plot(x, [r["max"] for r in rows], ":", color=c, lw=1, label=f"{tier} max")
            cap = cap_of[metric]
            if cap is not None:
                ax.axhline(report["caps"][tier][cap], color=c, lw=0.6, alpha=0.6)
        if not ax.lines:
            ax.text(
                0.5, 0.5, "no samples yet", ha="center", va="center", transform=ax.transAxes, color="gray"
            )
    for ax in axes[1]:
        ax.set_xlabel("hours since the first sample in the window")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, loc="lower center", ncol=len(handles) // 3 or 1, fontsize=8, frameon=False
        )
    probe = (report.get("probe_set") or {}).get("name", "no probe set")
    fig.suptitle(
        f"drift of {report.get('base_model')}'s models on {probe} ({report.get('samples', 0)} samples)"
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _f(x: Any, fmt: str = ".4g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render_report(report: dict[str, Any], console) -> None:
    from rich.table import Table
    from rich.text import Text

    probe = report.get("probe_set")
    console.print(
        Text.assemble(
            ("drift", "bold"),
            f" of {report['base_model']}'s models · probe set {probe['name'] if probe else '(none yet)'} · "
            f"{report['samples']} samples in the last {report['window_days']:g} days",
        )
    )
    t = Table(title="active versions by tier (what the policy judges)")
    for col in ("tier", "scored", "KL p50 / p90 / max", "top-1 p50 / min", "ΔNLL p90", "rel ‖ΔW‖ p90 / max",
                "warned", "frozen"):  # fmt: skip
        t.add_column(col, justify="left" if col == "tier" else "right")
    for tier in TIERS:
        cur = report["current"][tier]["metrics"]
        states = report["states"].get(tier, {})
        kl, top1, dnll, rel = cur["kl"], cur["top1"], cur["dnll"], cur["rel_weight_norm"]
        t.add_row(
            tier, str(report["current"][tier]["models"]),
            f"{_f(kl.get('p50'))} / {_f(kl.get('p90'))} / {_f(kl.get('max'))}",
            f"{_f(top1.get('p50'), '.3f')} / {_f(top1.get('min'), '.3f')}", _f(dnll.get("p90")),
            f"{_f(rel.get('p90'))} / {_f(rel.get('max'))}", str(states.get("warned", 0)), str(states.get("frozen", 0)),
        )  # fmt: skip
    console.print(t)
    w = Table(title="worst offenders (severity = largest metric/cap ratio; ≥ 1 is over a cap)")
    for col in ("model", "version", "tier", "severity", "KL", "top-1", "ΔNLL", "rel ‖ΔW‖", "state"):
        w.add_column(col, justify="left" if col in ("model", "tier", "state") else "right")
    for r in report["worst"]:
        w.add_row(
            r["model_id"], f"v{r['version']}", r["tier"], _f(r["severity"], ".3f"), _f(r["kl"]), _f(r["top1"], ".3f"),
            _f(r["dnll"]), _f(r["rel_weight_norm"]), r["drift_state"] + (f" ({r['strikes']} strikes)" if r["strikes"] else ""),
        )  # fmt: skip
    console.print(
        w if report["worst"] else Text("no scored active versions yet: run `fleet drift scan`", "dim")
    )
    a = Table(title="recent actions")
    for col in ("when (UTC)", "model", "version", "action", "reason"):
        a.add_column(col)
    for r in report["actions"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r["at"]))
        a.add_row(
            when, r["model_id"], "-" if r["version"] is None else f"v{r['version']}", r["action"], r["reason"]
        )
    console.print(a if report["actions"] else Text("no drift actions yet", "dim"))
