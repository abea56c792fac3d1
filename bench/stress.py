"""The harmful-fine-tuning stress test (lab code): SFT vs SBR vs AsFT (+ SafetyLock), per-epoch HS/FA/over-refusal/drift.

    python bench/stress.py                       # default: sft,sbr,asft, poison 0.1, 4 epochs (~50 min on 2 quiet cores)
    python bench/stress.py --smoke               # the whole pipeline in a few minutes (CI; numbers are not results)
    python bench/stress.py --relock              # re-measure only the +lock rows with the current lock
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from common import run_cli  # also puts the repo root on sys.path
from guard.errors import GuardError
from guardcli.common import ConfigOpt, setup
from lab.stress import StressConfig, relock as relock_run, run_stress

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def stress(
    methods: Annotated[str, typer.Option("--methods", help="Comma-separated: sft, sbr, asft.")] = "sft,sbr,asft",
    poison: Annotated[float, typer.Option("--poison", help="Share of harmful examples in the fine-tuning set.")] = 0.1,
    epochs: Annotated[int, typer.Option("--epochs", help="Fine-tuning epochs (the paper's stress tests: 20, 50).")] = 4,
    lambdas: Annotated[str, typer.Option("--lambdas", help="Extra SBR runs for a lambda sweep, e.g. 0,5,10,50,100.")] = "",
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of every method.")] = 5e-4,
    benign: Annotated[int, typer.Option("--benign", help="Benign task examples in the mix.")] = 144,
    no_lock: Annotated[bool, typer.Option("--no-lock", help="Skip the sft+lock / sbr+lock measurements.")] = False,
    relock: Annotated[bool, typer.Option("--relock", help="Only re-measure the +lock rows of the existing <out>/<name>.json "
                                         "with the current lock, from the adapters that run saved.")] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="Tiny sizes: the whole pipeline in minutes (numbers are not results).")] = False,
    out: Annotated[Path, typer.Option("--out", help="Directory for <name>.json/.md/.png.")] = Path("bench/results"),
    name: Annotated[str, typer.Option("--name", help="Result file stem.")] = "stress_default",
    config: ConfigOpt = None,
) -> None:
    """Harmful-fine-tuning stress test: SFT vs SBR vs AsFT (+ SafetyLock), HS/FA/over-refusal/drift per epoch.

    Every method trains on the same mix of benign topic-classification examples and harmful examples (poison
    ratio) with identical hyper-parameters and seed. Writes <out>/<name>.json, a markdown table and plots.
    The default run takes about 50 minutes on 2 quiet CPU cores; --smoke takes minutes.
    """
    cfg = setup(config)

    if relock:
        relock_run(cfg, out, name)
        typer.echo((out / f"{name}.md").read_text())
        return

    try:
        lams = [float(x) for x in lambdas.split(",") if x.strip()]
    except ValueError:
        raise GuardError(f"--lambdas must be comma-separated numbers, got {lambdas!r}") from None
    mlist = [m.strip() for m in methods.split(",") if m.strip()]
    if smoke:
        sc = StressConfig.smoke()
        sc.methods, sc.lambdas, sc.lock = mlist, lams, not no_lock
        sc.__post_init__()
    else:
        sc = StressConfig(methods=mlist, poison=poison, epochs=epochs, lambdas=lams, lr=lr, benign=benign,
                          lock=not no_lock)
    result = run_stress(cfg, sc, out, name)
    typer.echo((out / f"{name}.md").read_text())
    typer.echo(f"results: {out / (name + '.json')}  plots: {out / (name + '.png')}")


if __name__ == "__main__":
    run_cli(app)
