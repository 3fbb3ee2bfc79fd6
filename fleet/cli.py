"""``fleet``: the operator's command line.

Each subsystem contributes its commands from ``fleet/<subsystem>/cli.py`` through a
``register(app)`` function; this module owns the entry point, the global
``--config`` option and the mapping of errors to exit codes (2: bad input or
unknown model, 3: a backing service or integrity failure, 4: not built).
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from fleet import _cli_common as common
from fleet.errors import FleetError

# Subsystems that add commands, in the order `fleet --help` lists them.
_COMMAND_MODULES = (
    "fleet.core_cli",
    "fleet.store.cli",
    "fleet.lora.cli",
    "fleet.train.cli",
    "fleet.scheduler.cli",
    "fleet.serve.cli",
    "fleet.divergence.cli",
    "fleet.ops_cli",
    "fleet.deploy.cli",
)

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


for _name in _COMMAND_MODULES:
    try:
        importlib.import_module(_name).register(app)
    except ModuleNotFoundError as exc:  # a subsystem package not present in this build
        if exc.name != _name:
            raise


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
