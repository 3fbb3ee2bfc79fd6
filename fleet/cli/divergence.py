"""``fleet drift scan|watch|report|unfreeze``."""

from __future__ import annotations

import typer

from fleet.cli import _common as common


def _split(models: list[str] | None) -> list[str] | None:
    """``--models a --models b`` and ``--models a,b`` alike."""
    if not models:
        return None
    return [m.strip() for arg in models for m in arg.split(",") if m.strip()]


app = typer.Typer()

drift = typer.Typer(help="Measure and act on how far models drift.", no_args_is_help=True)


@drift.command()
def scan(
    models: list[str] = typer.Option(None, "--models", help="Only these models (repeat or comma-separate)."),
    probe_set: str = typer.Option(
        None, "--probe-set", help="Score on this probe set (default: the current one)."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Score active versions not yet scored on the probe set, record samples, act on the policy."""
    from fleet.divergence import scan as run_scan
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    res = run_scan(fl, _split(models), probe_set=probe_set)
    if json_out:
        common.print_json(res.to_dict())
    else:
        _render_scan(res)
    fl.close()


@drift.command()
def watch(
    every: str = typer.Option(
        None, "--every", help="Interval between scans: 90s, 10m, 1h (default: divergence.watch_every_s)."
    ),
    probe_set: str = typer.Option(
        None, "--probe-set", help="Probe set to score on (default: the current one)."
    ),
    scans: int = typer.Option(
        None, "--scans", min=1, help="Stop after this many scans (default: until stopped)."
    ),
    detach: bool = typer.Option(
        False, "--detach", help="Submit and return (needs a persistent cluster, ray.address)."
    ),
    in_job: bool = typer.Option(False, "--in-job", hidden=True),
) -> None:
    """Scan periodically as a Ray job (visible in the dashboard) until stopped."""
    from fleet.divergence import follow, local_cluster, submit_watch, watch_loop
    from fleet.errors import ValidationError
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    every_s = common.parse_interval(every) if every else fl.cfg.divergence.watch_every_s
    if in_job:
        watch_loop(fl, every_s=every_s, probe_set=probe_set, scans=scans, emit=lambda s: print(s, flush=True))
        return
    if detach and local_cluster(fl.cfg):
        raise ValidationError(
            "--detach needs a persistent Ray cluster (set ray.address): the local Ray this command "
            "starts ends when it exits, and the watch job with it"
        )
    client, name, meta = submit_watch(
        fl, every_s=every_s, probe_set=probe_set, scans=scans, config_path=common._state["config_path"]
    )
    common.console.print(
        f"submitted {name}: scans every {every_s:g} s on {meta['probe_set']} "
        f"(Jobs view of the Ray dashboard; stop with `ray job stop {name}`{'' if detach else ' or Ctrl-C'})"
    )
    if detach:
        return
    status = follow(client, name, lambda s: common.console.print(s, markup=False, highlight=False))
    common.console.print(f"{name} {status.lower()}")
    if status == "FAILED":
        raise typer.Exit(3)


@drift.command()
def report(
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: str = typer.Option(None, "--plot", help="Also draw the distributions over time to this PNG."),
    days: float = typer.Option(30.0, "--days", min=0.0, help="Window of samples over time, days."),
    worst: int = typer.Option(10, "--worst", min=0, help="How many worst offenders to list."),
) -> None:
    """Per-tier distributions over time, worst offenders, recent actions."""
    from fleet.divergence import build_report, plot_report, render_report
    from fleet.errors import ValidationError
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    rep = build_report(fl, since_days=days, worst=worst)
    if plot:
        try:
            rep["plot"] = str(plot_report(rep, plot))
        except OSError as exc:
            raise ValidationError(f"cannot write the plot to {plot}: {exc.strerror or exc}") from None
    if json_out:
        common.print_json(rep)
    else:
        render_report(rep, common.console)
        if plot:
            common.console.print(f"plot: {rep['plot']}")
    fl.close()


@drift.command()
def unfreeze(
    model: str = typer.Argument(..., help="The frozen model."),
    reason: str = typer.Option("unfrozen by operator", "--reason"),
) -> None:
    """Let a frozen model train again (its strikes start from zero)."""
    from fleet.divergence import unfreeze as do_unfreeze
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    do_unfreeze(fl, model, reason)
    common.console.print(f"{model} unfrozen")
    fl.close()


app.add_typer(drift, name="drift")


def _render_scan(res) -> None:
    from rich.table import Table
    from rich.text import Text

    console = common.console
    if res.versions:
        t = Table(title=f"scored on {res.probe_set}")
        for col in (
            "model",
            "version",
            "tier",
            "KL (bounds)",
            "top-1",
            "ΔNLL",
            "rel ‖ΔW‖",
            "KL vs parent",
            "actions",
        ):
            t.add_column(col, justify="left" if col in ("model", "tier", "actions") else "right")
        f = lambda x, fmt=".4g": "-" if x is None else format(x, fmt)  # noqa: E731
        for v in res.versions:
            t.add_row(
                v["model_id"], f"v{v['version']}", v["tier"], f"{f(v['kl'])} … {f(v['kl_upper'])}", f(v["top1"], ".3f"),
                f(v["dnll"]), f(v["rel_weight_norm"]), f(v["parent_kl"]), ", ".join(v["actions"]) or "-",
            )  # fmt: skip
        console.print(t)
    c = res.counts
    console.print(
        f"{c['scored']} scored, {c['warned']} warned, {c['frozen']} frozen, {c['rolled_back']} rolled back"
        f" on {res.probe_set or '(no probe set yet: nothing was active)'} in {res.seconds:.1f} s"
    )
    for s in res.skipped:
        console.print(Text.assemble(("skipped", "yellow"), f" {s['model_id']}: {s['reason']}"))
    for e in res.errors:
        where = f"{e.get('model_id', '')}@v{e.get('version', '?')}"
        console.print(Text.assemble(("not scored", "red"), f" {where}: {e['message']}"))
