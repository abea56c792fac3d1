"""`guard`: the command line. Only wiring here; each command lives in its own module."""

from __future__ import annotations

import sys

import typer

from guard.errors import GuardError
from guardcli import config_cmd, eval_cmd, harden_cmd, lock_cmd, prepare, serve_cmd

app = typer.Typer(
    name="guard",
    help="safety-guard: keep LoRA adapters of an aligned chat model safe, offline (harden, vet, lock) "
         "and while serving (guarded vLLM with live anchor-drift health checks).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.command("prepare")(prepare.prepare)
app.command("align")(prepare.align_cmd)
app.add_typer(config_cmd.app, name="config")
app.add_typer(eval_cmd.app, name="eval")
app.command("harden")(harden_cmd.harden)
app.command("vet")(harden_cmd.vet)
app.add_typer(lock_cmd.app, name="lock")


app.command("serve", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(serve_cmd.serve)


def main() -> None:
    """Entry point: known errors print as one line on stderr and exit 1."""
    try:
        app()
    except GuardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
