"""`guard config show|check`."""

from __future__ import annotations

import typer

from guard.config import load_config
from guardcli.common import ConfigOpt

app = typer.Typer(help="Inspect the guard configuration.", no_args_is_help=True)


@app.command("show")
def show(config: ConfigOpt = None) -> None:
    """Print the effective config (file values over defaults) as YAML."""
    typer.echo(load_config(config).to_yaml(), nl=False)


@app.command("check")
def check(config: ConfigOpt = None) -> None:
    """Validate a config file; exit 1 with the offending key's path when it is wrong."""
    load_config(config)
    typer.echo("config ok")
