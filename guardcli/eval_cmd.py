"""`guard eval`: measurements with the named judge."""

from __future__ import annotations

import json

import typer

from guardcli.common import ConfigOpt, setup

app = typer.Typer(help="Measurements with the named judge (the stress test and red-team bench are in bench/).",
                  no_args_is_help=True)


@app.command("judge")
def judge(config: ConfigOpt = None) -> None:
    """Accuracy of the refusal judge on pyrit's human-labelled refusal data."""
    setup(config)
    from training.judge_eval import judge_accuracy

    typer.echo(json.dumps(judge_accuracy(), indent=2))
