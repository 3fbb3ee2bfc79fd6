"""Core commands: init, tenants, keys, ingest, base build, status, demo."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from fleet.cli import _common as common

app = typer.Typer()


@app.command()
def init(
    data_dir: str = typer.Option(None, "--data-dir", help="Data directory (default: ./fleet-data)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing fleet.yaml."),
) -> None:
    """Write a commented default fleet.yaml and create the data directory."""
    from fleet.config import DEFAULT_CONFIG_NAME, FleetConfig, find_config_path, render_commented_yaml
    from fleet.errors import ConflictError

    target = find_config_path(common._state["config_path"]) or Path.cwd() / DEFAULT_CONFIG_NAME
    if target.exists() and not force:
        raise ConflictError(f"{target} already exists; pass --force to overwrite it")
    cfg = FleetConfig(data_dir=data_dir) if data_dir else FleetConfig()
    data = Path(cfg.data_dir)
    if not data.is_absolute():
        data = (target.resolve().parent / data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(render_commented_yaml(cfg))
    tmp.replace(target)
    common.console.print(f"wrote {target}; data directory {data}")


tenants = typer.Typer(help="The company → team → individual tree.", no_args_is_help=True)


@tenants.command("add")
def tenants_add(
    tenant_id: str = typer.Argument(..., metavar="ID", help="company, company/team or company/team/person"),
    shares: float = typer.Option(1.0, "--shares", help="Fair-share weight among its siblings."),
    budget: float = typer.Option(None, "--budget", help="Company budget, GPU-seconds per day."),
) -> None:
    """Create a tenant and its model (same id); the parent must exist."""
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    m = fl.add_tenant(tenant_id, shares=shares, budget=budget)
    common.console.print(f"created {m.tier} {m.id} (model on {m.base_model}, rank {m.lora_rank})")


@tenants.command("list")
def tenants_list(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """List tenants with their models' state."""
    from fleet.handles import Fleet

    fl = Fleet(common.config())
    models = {m.id: m for m in fl.registry.list_models()}
    rows = []
    for t in fl.registry.list_tenants():
        m = models.get(t.id)
        rows.append(
            {
                "id": t.id,
                "level": t.level.value,
                "shares": t.shares,
                "active_version": m.active_version if m else None,
                "pending_tokens": m.pending_tokens if m else 0,
                "drift_state": m.drift_state.value if m else None,
            }
        )
    if json_out:
        common.print_json(rows)
        return
    table = Table(title=f"{len(rows)} tenants")
    for col in ("id", "level", "shares", "active", "pending tokens", "drift"):
        table.add_column(col, justify="right" if col in ("shares", "active", "pending tokens") else "left")
    for r in rows:
        v = r["active_version"]
        table.add_row(
            r["id"],
            r["level"],
            f"{r['shares']:g}",
            f"v{v}" if v else "-",
            str(r["pending_tokens"]),
            r["drift_state"] or "",
        )
    common.console.print(table)


app.add_typer(tenants, name="tenants")

keys = typer.Typer(help="API keys (scoped to a company, stored hashed).", no_args_is_help=True)


@keys.command("create")
def keys_create(
    company: str = typer.Option(..., "--company", help="Company id the key belongs to."),
    name: str = typer.Option(None, "--name", help="A label for the key."),
) -> None:
    """Create an API key; it is printed once, alone on the last line."""
    from fleet.handles import Fleet

    key = Fleet(common.config()).registry.create_key(company, name=name)
    common.console.print(f"API key for {company} (store it now; it is not shown again):")
    print(key, flush=True)


@keys.command("list")
def keys_list(company: str = typer.Option(None, "--company")) -> None:
    """List key prefixes (never the keys)."""
    from fleet.handles import Fleet

    for k in Fleet(common.config()).registry.list_keys(company):
        state = "revoked" if k["revoked_at"] else "active"
        common.console.print(f"{k['prefix']}  {k['company_id']}  {k['name'] or ''}  {state}")


@keys.command("revoke")
def keys_revoke(prefix: str) -> None:
    """Revoke the key with this prefix."""
    from fleet.handles import Fleet

    Fleet(common.config()).registry.revoke_key(prefix)
    common.console.print(f"revoked {prefix}")


app.add_typer(keys, name="keys")


@app.command()
def ingest(
    model_id: str = typer.Argument(..., help="Model the items belong to."),
    file: str = typer.Argument(..., metavar="FILE.jsonl", help='Lines of {"kind", "text", "meta"?}.'),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Add a JSONL file of context items to a model (all or nothing)."""
    from fleet.handles import Fleet
    from fleet.types import validate_id

    validate_id(model_id)
    fl = Fleet(common.config())
    fl.registry.get_model(model_id)
    report = fl.ingestor().ingest_file(model_id, file)
    if json_out:
        common.print_json(report.as_dict())
        return
    common.console.print(
        f"{model_id}: {report.inserted} items added ({report.tokens} tokens), {report.duplicates} duplicates skipped"
    )
    for c in report.promoted:
        if c.inserted:
            common.console.print(f"  repeated queries → {c.model_id}: {c.inserted} items")


base = typer.Typer(help="The shared base model.", no_args_is_help=True)


@base.command("build")
def base_build(
    out: str = typer.Option(None, "--out", help="Directory (default: base.path, else the data dir's base/)."),
    seed: int = typer.Option(0, "--seed"),
    force: bool = typer.Option(False, "--force", help="Replace a base fleet built or imported there before."),
) -> None:
    """Build the tiny offline base model (deterministic, ≤60 s on 2 cores).

    The target must be missing, empty, or (with --force) a base fleet wrote: anything else
    there, such as a real checkpoint, is never replaced."""
    from fleet.base import build_tiny_base

    cfg = common.config()
    path = build_tiny_base(Path(out) if out else cfg.base_path, seed=seed, progress=True, force=force)
    common.console.print(f"base model written to {path}")


@base.command("import")
def base_import(
    source: str = typer.Argument(
        ..., help="A .gguf file, a Hugging Face model directory, or a packaged model's name (smollm2)."
    ),
    out: str = typer.Option(None, "--out", help="Directory (default: the data dir's bases/<name>/)."),
    name: str = typer.Option(None, "--name", help="Name to register the base under (default: the source's)."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="auto (GGUF: float32; a directory: as stored), float32, bfloat16, float16.",
    ),
    force: bool = typer.Option(False, "--force", help="Replace a base fleet wrote there before."),
) -> None:
    """Import a real base model: writes a plain Hugging Face directory plus fleet's base record."""
    from fleet.base import import_base, resolve_source

    cfg = common.config()
    target = Path(out) if out else cfg.data_path / "bases" / (name or resolve_source(source).name)
    path = import_base(source, target, name=name, dtype=dtype, force=force, progress=True)
    from fleet.base import base_meta

    meta = base_meta(path)
    common.console.print(
        f"base {meta['name']} ({meta['architecture']}, {meta['params'] / 1e6:.0f}M parameters, "
        f"{meta['dtype']}; held-out NLL {meta['heldout_nll']} nats/token) written to {path}"
    )
    common.console.print(f"use it with fleet.yaml:\n  base:\n    path: {path}\n    name: {meta['name']}")


app.add_typer(base, name="base")


@app.command()
def status(json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Models per tier, pending tokens, versions, recent cycles."""
    from fleet.handles import Fleet
    from fleet.status import collect_status, render_status

    st = collect_status(Fleet(common.config()))
    if json_out:
        common.print_json(st)
    else:
        render_status(st, common.console)


@app.command()
def demo(
    individuals: int = typer.Option(
        24,
        "--individuals",
        min=6,
        help="Individuals in the synthetic organisation (at least one per team).",
    ),
    quick: bool = typer.Option(False, "--quick", help="Skip the slow steps (for smoke tests)."),
    base: str = typer.Option(
        "tiny", "--base", help="tiny (the offline base, minutes) or smollm2 (the real base, ~15 min)."
    ),
) -> None:
    """Build the base, a synthetic organisation, ingest its context, and show the fleet."""
    from fleet.demo import run_demo

    run_demo(common.config(), individuals=individuals, quick=quick, base=base, console=common.console)
