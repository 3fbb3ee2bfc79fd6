"""``fleet``: the operator's command line.

One module per command group (``fleet/cli/<group>.py``, each a module-level Typer app whose
commands parse their arguments, call a package's contract and print); this module merges them
into one ``fleet`` app and owns the entry point, the global ``--config`` option and the mapping
of errors to exit codes (2: bad input or unknown model, 3: a backing service or integrity
failure, 4: not built). Command modules import torch, Ray and the registry only inside their
commands, so ``fleet --help`` stays quick.
"""

from __future__ import annotations

import os
import sys

import typer

from fleet.cli import _common as common
from fleet.cli import core, deploy, divergence, lora, ops, scheduler, serve, store, train
from fleet.errors import FleetError

app = typer.Typer(
    name="fleet",
    help="Run a fleet of personalized LoRA models on one shared base model, on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _main(
    config: str = typer.Option(
        None, "--config", "-c", help="fleet.yaml to use (default: $FLEET_CONFIG, ./fleet.yaml, built-ins)."
    ),
) -> None:
    common.set_config_path(config)


# Command groups, in the order `fleet --help` lists them.
for _group in (core, store, lora, train, scheduler, serve, divergence, ops, deploy):
    app.add_typer(_group.app)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        app(args=argv, standalone_mode=False)
    except FleetError as exc:
        from fleet.config import redact

        common.err_console.print(common.styled(("error:", "bold red"), " ", redact(exc.message)))
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        common.err_console.print("aborted")
        return 130
    except KeyboardInterrupt:
        common.err_console.print("interrupted")
        return 130
    except Exception as exc:  # click usage errors carry their own exit code
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
