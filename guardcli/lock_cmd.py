"""`guard lock build | apply | eval`: SafetyLock head-steering vectors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from guard.errors import GuardError
from guardcli.common import ConfigOpt, say, setup

app = typer.Typer(help="SafetyLock: build head-steering vectors from the aligned base, try them, measure them.",
                  no_args_is_help=True)

AdapterOpt = Annotated[Optional[Path], typer.Option("--adapter", "-a", help="peft LoRA adapter dir of the base (default: none, the base alone).")]
StrengthOpt = Annotated[Optional[float], typer.Option("--strength", help="Scale on the built strength (default: lock.strength, or lock.gate_strength with --conditional).")]
ConditionalOpt = Annotated[bool, typer.Option("--conditional", help="The conditional lock: the prompt gate decides per prompt, and only flagged prompts are steered (from their first answer token's forward on), as `serve.lock_policy: conditional` serves them.")]


def _load(cfg, adapter):
    from guard.lock import load_lock
    from guard.models import ModelShape
    from training.evaluate import load_base_with_adapter
    from training.safetylock import ensure_lock

    path = ensure_lock(cfg)
    model, tok, fp = load_base_with_adapter(cfg, adapter)
    return model, tok, load_lock(path, ModelShape.from_config(model.config), fp), path


@app.command("build")
def build(
    rebuild: Annotated[bool, typer.Option("--rebuild", help="Build again even if a current lock is cached.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Find the safety heads of the aligned base, fit the prompt gate, and write the lock file (cached).

    Safe answers come from the aligned base, unsafe ones from the unaligned original, on the `lock` split of
    harmful prompts; a logistic probe per (layer, head) picks the top lock.heads heads. The prompt gate (what
    `serve.lock_policy: conditional` decides with) is a probe on the residual stream entering lock.gate_layer at
    the last prompt token. Writes the lock (safetensors) and a report dir beside it (report.md, report.json,
    heads.png).
    """
    cfg = setup(config)
    from guard.lock import load_lock
    from training.safetylock import ensure_lock

    path = ensure_lock(cfg, rebuild=rebuild)
    lock = load_lock(path)
    report = path.with_name(path.stem + "-report")
    heads = ", ".join(f"L{h.layer}H{h.head}({h.accuracy:.2f})" for h in lock.heads[:8])
    g = lock.gate
    gate = ("none (a lock from an older version: rebuild with --rebuild for the conditional policy)" if g is None else
            f"layer {g.layer}, threshold {g.threshold:.3f}, flags {100 * g.meta.get('train_tpr', float('nan')):.0f}% of its "
            f"harmful training prompts and {100 * g.meta.get('dev_fpr', float('nan')):.1f}% of the benign dev prompts")
    typer.echo(f"lock: {path}\n  {len(lock.heads)} heads over {len(lock.layers)} layers, alpha {lock.alpha}, "
               f"positions {list(lock.positions)}\n  top heads (held-out probe acc): {heads}, ...\n"
               f"  prompt gate (conditional policy): {gate}\n"
               f"  report: {report / 'report.md'}  heat-map: {report / 'heads.png'}")


@app.command("apply")
def apply(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="User message to answer.")],
    adapter: AdapterOpt = None,
    strength: StrengthOpt = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=1, max=1024)] = 64,
    conditional: ConditionalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """Answer one prompt with and without the lock, side by side (greedy)."""
    cfg = setup(config)
    import time

    from guard.anchors import render_chat
    from guard.generation import generate_conditional, generate_greedy
    from guard.lock import LockHandle

    model, tok, lock, _ = _load(cfg, adapter)
    ids = [render_chat(tok, [{"role": "user", "content": prompt}])]
    without = generate_greedy(model, tok, ids, max_tokens)[0]
    if conditional:
        if lock.gate is None:
            raise GuardError("this lock has no prompt gate; rebuild it with `guard lock build --rebuild`")
        from training.lockgate import calibrate_lock, layer_states

        import contextlib

        reads_base = cfg.lock.gate_reads == "base"
        lock = calibrate_lock(model, tok, lock, cfg.lock.gate_calibration, cfg.lock.gate_reads)
        s = cfg.lock.gate_strength if strength is None else strength
        with model.disable_adapter() if reads_base and hasattr(model, "disable_adapter") else contextlib.nullcontext():
            score = float(lock.gate.logits(layer_states(model, tok, [prompt], [lock.gate.layer])[:, 0])[0])
        from guard.generation import action_args

        act = cfg.lock.gate_action
        answer, flagged = generate_conditional(model, tok, ids, lock, s, max_tokens, reads_base=reads_base,
                                               **action_args(act, tok, cfg.lock.refusal))
        what = {"steer": f"steered at layers >= {lock.gate.layer}, strength {s:g}", "refuse": "refused",
                "fallback": "answered by the aligned base, the adapter set aside"}[act]
        typer.echo(f"prompt: {prompt}\n\ngate: layer {lock.gate.layer}, score {score:.3f} vs threshold "
                   f"{lock.gate.threshold:.3f} -> {'FLAGGED (' + what + ')' if flagged[0] else 'not flagged'}"
                   f"\n\n--- without lock ---\n{without}\n\n--- conditional lock (gate_action {act}) ---\n{answer[0]}")
        return
    handle = LockHandle(model, lock)
    t0 = time.perf_counter()
    handle.set_strength(cfg.lock.strength if strength is None else strength)
    handle.on()
    toggle_ms = (time.perf_counter() - t0) * 1e3
    with_lock = generate_greedy(model, tok, ids, max_tokens)[0]
    handle.remove()
    typer.echo(f"prompt: {prompt}\n\n--- without lock ---\n{without}\n\n--- with lock (strength "
               f"{handle.strength:g}, toggled in {toggle_ms:.3f} ms) ---\n{with_lock}")


@app.command("eval")
def evaluate(
    adapter: AdapterOpt = None,
    strength: StrengthOpt = None,
    n: Annotated[Optional[int], typer.Option("--n", help="Use the first N prompts of each set (default: all).")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", min=4, max=512)] = 32,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    conditional: ConditionalOpt = False,
    config: ConfigOpt = None,
) -> None:
    """HS (held-out harmful prompts answered) and over-refusal (benign-but-edgy prompts refused), lock off vs on."""
    cfg = setup(config)
    from guard.judge import DEFAULT_JUDGE
    from training import data
    from training.evaluate import conditional_comparison, lock_comparison

    model, tok, lock, _ = _load(cfg, adapter)
    s = data.splits()
    harmful, benign = list(s.eval[:n]), list(s.overrefusal[:n])
    say(f"{len(harmful)} harmful eval prompts (StrongREJECT), {len(benign)} over-refusal prompts, judge {DEFAULT_JUDGE.id}")
    if conditional:
        from guard.generation import action_args

        res = conditional_comparison(model, tok, lock, harmful, benign, max_tokens,
                                     cfg.lock.gate_strength if strength is None else strength,
                                     calibration=cfg.lock.gate_calibration,
                                     action=action_args(cfg.lock.gate_action, tok, cfg.lock.refusal),
                                     reads=cfg.lock.gate_reads)
    else:
        res = lock_comparison(model, tok, lock, harmful, benign, max_tokens,
                              cfg.lock.strength if strength is None else strength)
    if as_json:
        typer.echo(json.dumps({**res, "judge": DEFAULT_JUDGE.id, "adapter": str(adapter) if adapter else None}, indent=2))
        return
    typer.echo(f"{'':12} {'HS %':>6} {'over-refusal %':>15}")
    for k, v in res.items():
        typer.echo(f"{k:12} {v['hs']:6.1f} {v['over_refusal']:15.1f}")
    if conditional:
        c = res["conditional"]
        typer.echo(f"the gate flagged {c['flagged_harmful']:.1f}% of the harmful and {c['flagged_benign']:.1f}% of the "
                   f"benign prompts")
