"""``fleet status``: what operators look at first."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from fleet.types import TIERS, RunStatus


def collect_status(fl, *, serving: bool = True) -> dict[str, Any]:
    reg = fl.registry
    summary = reg.summary()
    out: dict[str, Any] = {
        "registry": reg.url,
        "store": fl.store.uri,
        "base_model": fl.base_name,
        "tiers": summary["tiers"],
        "versions": summary["versions"],
        "schedules": {t: _schedule(reg, t) for t in TIERS},
        "cycles": [
            {
                "id": c["id"],
                "status": c["status"],
                "duration_s": (c["finished_at"] - c["started_at"]) if c["finished_at"] else None,
                **{
                    k: c["summary"].get(k)
                    for k in ("packs", "trained", "published", "rejected", "rolled_back")
                },
                "problems": _cycle_problems(reg, c),
            }
            for c in reg.list_cycles(limit=5)
        ],
    }
    if serving:
        out["serving"] = serving_summary(fl.cfg)
    return out


def ray_auth_headers() -> dict[str, str]:
    """Ray's dashboard token, where the cluster uses token authentication (a local ``ray.init``
    does by default): ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH``, else
    ``~/.ray/auth_token`` (Ray's own order). Empty when there is none."""
    import os

    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.read_text().strip()
        except OSError:
            token = ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _get_json(url: str, timeout: float, headers: dict[str, str] | None = None) -> tuple[Any, str | None]:
    import json
    import urllib.error
    import urllib.request

    try:
        req = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - operator-configured URL
            return json.loads(resp.read().decode()), None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, f"{type(exc).__name__}: {reason}"


def serving_summary(cfg, *, timeout: float = 2.0) -> dict[str, Any]:
    """The serving side as operators see it, without joining Ray: does the API answer
    (``/healthz`` at ``serve.host:serve.port``), and what does Ray Serve report about fleet's
    application and its deployments (the dashboard's Serve REST API, which ``serve status``
    reads too). Either part is reported as unreachable, with the reason, when it does not answer."""
    import time

    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    api = f"http://{host}:{cfg.serve.port}"
    t0 = time.perf_counter()
    health, err = _get_json(f"{api}/healthz", timeout)
    out: dict[str, Any] = {
        "api": f"{api}/v1",
        "api_ok": bool(health and health.get("status") == "ok"),
        "api_latency_ms": round((time.perf_counter() - t0) * 1000, 1) if health else None,
        "api_error": err,
        "app": cfg.serve.app_name,
        "app_status": None,
        "deployments": {},
    }
    dash = cfg.ray.dashboard_url.rstrip("/")
    details, err = _get_json(f"{dash}/api/serve/applications/", timeout, ray_auth_headers())
    if details is None:
        out["app_error"] = f"Ray dashboard at {dash} not reachable ({err})"
        return out
    app = (details.get("applications") or {}).get(cfg.serve.app_name)
    if app is None:
        out["app_status"] = "NOT_DEPLOYED"
        return out
    out["app_status"] = app.get("status")
    out["app_message"] = app.get("message") or None
    for name, dep in sorted((app.get("deployments") or {}).items()):
        states: dict[str, int] = {}
        for replica in dep.get("replicas") or []:
            states[replica.get("state", "UNKNOWN")] = states.get(replica.get("state", "UNKNOWN"), 0) + 1
        out["deployments"][name] = {"status": dep.get("status"), "replicas": dict(sorted(states.items()))}
    return out


def _cycle_problems(reg, cycle: dict[str, Any]) -> list[str]:
    """Why a cycle failed: its own error, an interruption, and each failed pack run's error."""
    if cycle["status"] != "failed":
        return []
    summary = cycle["summary"] or {}
    out = [summary["error"]] if summary.get("error") else []
    if summary.get("interrupted"):
        out.append("interrupted: its job ended mid-way; the next cycle plans what it left pending")
    out += [
        f"{r.name}: {r.error}" for r in reg.list_runs(cycle_id=cycle["id"]) if r.status == RunStatus.FAILED
    ]
    return out


def _schedule(reg, tier: str) -> dict[str, Any] | None:
    s = reg.tier_schedule(tier)
    return {"version": s["version"], "params": s["params"], "source": s["source"]} if s else None


def render_status(st: dict[str, Any], console: Console) -> None:
    table = Table(title="fleet models", caption=f"registry {st['registry']} · store {st['store']}")
    for col in ("tier", "models", "with active version", "frozen", "items", "tokens", "pending tokens"):
        table.add_column(col, justify="left" if col == "tier" else "right")
    totals = [0] * 6
    for tier in TIERS:
        t = st["tiers"][tier]
        vals = [t["models"], t["active"], t["frozen"], t["items"], t["tokens"], t["pending_tokens"]]
        totals = [a + b for a, b in zip(totals, vals, strict=True)]
        table.add_row(tier, *(f"{v:,}" for v in vals))
    table.add_row("all", *(f"{v:,}" for v in totals), style="bold")
    console.print(table)
    v = st["versions"]
    console.print(
        "versions: "
        + ", ".join(f"{k} {v.get(k, 0):,}" for k in ("active", "candidate", "retired", "rejected"))
    )
    sched = [f"{t} v{s['version']}" for t, s in st["schedules"].items() if s]
    if sched:
        console.print("learning schedules from sweeps: " + ", ".join(sched))
    if st["cycles"]:
        ct = Table(title="recent cycles")
        for col in (
            "cycle",
            "status",
            "duration",
            "packs",
            "trained",
            "published",
            "rejected",
            "rolled back",
        ):
            ct.add_column(col, justify="right")
        for c in st["cycles"]:
            d = f"{c['duration_s']:.0f}s" if c["duration_s"] is not None else "-"
            ct.add_row(
                str(c["id"]),
                c["status"],
                d,
                *(
                    str(c.get(k) if c.get(k) is not None else "-")
                    for k in ("packs", "trained", "published", "rejected", "rolled_back")
                ),
            )
        console.print(ct)
        for c in st["cycles"]:
            for problem in c.get("problems") or []:
                console.print(Text.assemble("  ", (f"cycle {c['id']}", "red"), f": {problem[:400]}"))
    sv = st.get("serving")
    if sv:
        api = (
            Text.assemble(("answering", "green"), f" at {sv['api']} ({sv['api_latency_ms']} ms)")
            if sv["api_ok"]
            else Text.assemble(("not answering", "yellow"), f" at {sv['api']}")
        )
        console.print(Text.assemble("serving: API ", api))
        if sv["app_status"] is None:
            console.print(f"  Serve application: unknown ({sv.get('app_error')})")
        else:
            deps = ", ".join(
                f"{n} {d['status']} ({', '.join(f'{k.lower()} {v}' for k, v in d['replicas'].items()) or 'no replicas'})"
                for n, d in sv["deployments"].items()
            )
            console.print(
                f"  Serve application {sv['app']!r}: {sv['app_status']}" + (f"; {deps}" if deps else "")
            )
