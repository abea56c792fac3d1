"""Options shared by every command, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from guard.config import GuardConfig, load_config
from guard.models import resolve_threads

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Guard YAML config (default: $SAFETY_GUARD_CONFIG, else built-in defaults).",
                 show_default=False),
]


def setup(config: Path | None) -> GuardConfig:
    """Load the config and apply its runtime settings (threads) for this process."""
    cfg = load_config(config)
    resolve_threads(cfg.runtime.threads)
    return cfg


def say(msg: str) -> None:
    typer.echo(msg, err=True)
