"""`guard eval`: measurements with the named judge."""

from __future__ import annotations

import json

import typer

from guardcli.common import ConfigOpt, setup

app = typer.Typer(help="Evaluate the judge, the aligned base and (issue #7) the harmful-fine-tuning stress test.",
                  no_args_is_help=True)


@app.command("judge")
def judge(config: ConfigOpt = None) -> None:
    """Accuracy of the refusal judge on pyrit's human-labelled refusal data."""
    setup(config)
    from training.judge_eval import judge_accuracy

    typer.echo(json.dumps(judge_accuracy(), indent=2))


@app.command("stress")
def stress() -> None:
    """Not built yet (issue #7): SFT vs SBR vs AsFT vs SafetyLock under harmful fine-tuning."""
    raise typer.Exit(_pending("guard eval stress", 7))


def _pending(cmd: str, issue: int) -> int:
    typer.echo(f"{cmd} is not built yet: it arrives with issue #{issue}", err=True)
    return 2
