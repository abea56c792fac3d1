"""`guard harden` and `guard vet`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from guard.errors import GuardError
from guard.config import parse_config
from guardcli.common import ConfigOpt, setup

VET_FAILED = 3  # distinct from 1 (usage/input error) so CI can tell "unsafe adapter" from "broken call"


def harden(
    data: Annotated[Optional[Path], typer.Option("--data", help="JSONL of {'messages': [...]} or {'prompt','response'}.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output adapter dir (written atomically).")] = None,
    method: Annotated[Optional[str], typer.Option("--method", help="sbr | asft | sft (default: harden.method).")] = None,
    lam: Annotated[Optional[float], typer.Option("--lambda", help="Regularizer weight for the chosen method.")] = None,
    k: Annotated[Optional[int], typer.Option("--anchors", "-k", help="Number of SBR training anchors K (harden.sbr_k; "
                                                                     "the probe anchors the gauge reads are not affected).")] = None,
    screen: Annotated[Optional[bool], typer.Option("--screen/--no-screen", help="Drop the examples whose prompt the "
                                                   "lock's prompt gate flags, before training (harden.screen_data, on "
                                                   "by default; needs the prepared lock).")] = None,
    screen_fpr: Annotated[Optional[float], typer.Option("--screen-fpr", help="Screening's threshold as the share of "
                                                       "the gate's benign dev prompts it may drop (harden.screen_max_fpr, "
                                                       "default 0.20; lower keeps more borderline examples).")] = None,
    keep_steps: Annotated[Optional[bool], typer.Option("--keep-steps/--no-keep-steps", help="After screening, cycle the "
                                                       "kept examples back up to the data's count so the run takes the "
                                                       "steps it would have (harden.screen_keep_steps).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs")] = None,
    lr: Annotated[Optional[float], typer.Option("--lr")] = None,
    rank: Annotated[Optional[int], typer.Option("--rank")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Examples per forward (micro-batch).")] = None,
    grad_accum: Annotated[Optional[int], typer.Option("--grad-accum", help="Micro-batches per optimizer step.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from its last epoch.")] = False,
    repair_adapter: Annotated[Optional[Path], typer.Option("--repair", help="Existing adapter to repair with SBR.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Train a LoRA adapter that keeps the base model's refusals (SBR or AsFT), or repair one (--repair).

    By default the data is screened first (the lock's prompt gate drops the requests it flags, at a threshold that
    would drop 20% of its benign dev prompts; the examples left are cycled back up to the data's count, so the run
    takes the optimizer steps the data asked for) and SBR pulls 4 of its 128 training anchors back per step at
    lambda 30 (docs/hardening.md says how that was chosen).

    Writes a standard peft adapter dir plus guard.json and report.md. Examples:

      guard harden --data user.jsonl --method sbr --out adapters/acme

      guard harden --repair adapters/acme-unsafe --data user.jsonl --out adapters/acme-repaired
    """
    cfg = setup(config)
    if out is None:
        raise GuardError("--out is required")
    from training import methods

    m = method or cfg.harden.method
    chosen = methods.get(m)  # one line naming the known methods when unknown
    upd: dict = {"method": m}
    if lam is not None:
        if chosen.lam_field is None:
            raise GuardError(f"--lambda: method '{m}' has no regularizer weight")
        upd[chosen.lam_field] = lam
    for key, val in (("epochs", epochs), ("lr", lr), ("rank", rank), ("batch_size", batch_size),
                     ("grad_accum", grad_accum), ("sbr_k", k), ("screen_data", screen),
                     ("screen_max_fpr", screen_fpr), ("screen_keep_steps", keep_steps)):
        if val is not None:
            upd[key] = val
    merged = cfg.model_dump(mode="json")
    merged["harden"].update(upd)
    cfg = parse_config(merged, "command line")  # flags are validated like config keys
    from training.harden import harden as run_harden, repair

    if repair_adapter is not None:
        meta = repair(cfg, repair_adapter, out, data)
        typer.echo(f"repaired {repair_adapter} -> {out}: anchor drift {meta['drift_before']['mean_rel_l2']:.4f} -> "
                   f"{meta['final_drift']['mean_rel_l2']:.4f} ({meta['drift_status']})")
        return
    if data is None:
        raise GuardError("--data is required (or --repair ADAPTER)")
    meta = run_harden(cfg, data, out, resume=resume)
    typer.echo((out / "report.md").read_text())
    typer.echo(f"adapter written to {out} ({meta['seconds']:.0f} s)")


def vet(
    adapter: Annotated[Path, typer.Argument(help="peft LoRA adapter dir to check.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Check an adapter before it serves: anchor drift vs the aligned reference and anchor refusal ratio.

    Reads the probe anchors (anchors.set), never SBR's training anchors. Exit code 0 when it passes (ok or warn),
    3 when it fails the configured thresholds (drift.fail; drift.refusal_drop_fail: the drop in the share of
    probe anchors refused, relative to the aligned base's own share), 1 on bad input. Usable as a CI gate.
    """
    cfg = setup(config)
    from guard.adapters import check_adapter_fits, read_adapter
    from guard.anchors import from_config
    from guard.artifacts import read_json
    from guard.vetting import vet_adapter
    from guard.workspace import Workspace

    ws = Workspace(cfg)
    base, fp = ws.base(), ws.base_fingerprint
    # refuse a foreign or broken adapter before loading any weights
    check_adapter_fits(read_adapter(adapter, cfg.harden.max_rank), read_json(base / "config.json", "model config"), fp)
    model, tok, _ = ws.load_aligned()
    anchors = from_config(cfg)
    ref = ws.references(model, tok, anchors)
    base_ratio = ws.base_refusal_ratio(model, tok, anchors)
    report = vet_adapter(model, tok, adapter, anchors, ref, cfg.drift, fp, cfg.harden.max_rank, base_ratio=base_ratio)
    typer.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.table(anchors.prompts))
    if not report.verdict.passed:
        raise typer.Exit(VET_FAILED)
