"""``fleet store gc``: remove what failed publications left in the adapter store."""

from __future__ import annotations

import typer

from fleet.cli import _common as common

app = typer.Typer()

store = typer.Typer(help="The adapter store.", no_args_is_help=True)


@store.command("gc")
def gc(
    older_than: str = typer.Option(
        "24h", "--older-than", help="Grace period: only objects untouched this long (90s, 10m, 24h)."
    ),
    delete: bool = typer.Option(False, "--delete", help="Remove them (default: only list them)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List (or with --delete remove) staged objects and version directories no version references."""
    import time

    from fleet.handles import Fleet
    from fleet.store import find_garbage, remove

    grace_s = common.parse_interval(older_than)
    fl = Fleet(common.config())
    now = time.time()
    garbage = find_garbage(fl.store, fl.registry.version_uris, grace_s=grace_s, now=now)
    freed = remove(fl.store, garbage) if delete else 0
    if json_out:
        common.print_json(
            {
                "deleted": delete,
                "bytes": sum(g.bytes for g in garbage),
                "garbage": [g.as_dict() for g in garbage],
            }
        )
        return
    verb = "removed" if delete else "would remove"
    for g in garbage:
        common.console.print(
            f"{verb} {g.uri}  ({g.kind}, {g.objects} objects, {g.bytes:,} bytes, {g.age_s / 3600:.1f} h old)"
        )
    total = sum(g.bytes for g in garbage)
    if delete:
        common.console.print(f"{len(garbage)} directories removed, {freed:,} bytes freed")
    elif garbage:
        common.console.print(
            f"{len(garbage)} directories ({total:,} bytes) no version references; "
            "nothing removed (dry run): add --delete to remove them"
        )
    else:
        common.console.print(f"nothing to remove in {fl.store.uri} (grace period {older_than})")


app.add_typer(store, name="store")
