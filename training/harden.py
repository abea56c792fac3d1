"""`guard harden`: train a user's LoRA adapter with a safety regularizer; `--repair` fixes an existing one.

Output is a standard peft adapter dir (vLLM and peft load it as is) plus `guard.json` (method,
hyper-parameters, base fingerprint, anchors hash, per-anchor final drift, wall time) and `report.md`.
The dir appears atomically when training is done; checkpoints live in a hidden sibling work dir until then,
so `--resume` after a kill continues from the last finished epoch.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from guard.adapters import read_adapter, check_adapter_fits, write_guard_meta
from guard.anchors import load_anchor_set
from guard.artifacts import atomic_path, provenance
from guard.config import GuardConfig, HardenConfig
from guard.drift import DriftReport, anchor_drift, verdict
from guard.errors import GuardError
from guard.models import fingerprint_dir, load_causal_lm
from guard.workspace import Workspace
from guard.states import cached_reference
from training import methods
from training.methods import MethodInputs
from training.methods.sbr import SBR
from training.screen import gate_for_screening, screen
from training.sft import encode
from training.trainer import LoraHParams, add_lora, train_lora
from training.userdata import read_chat_jsonl


def hparams(h: HardenConfig) -> LoraHParams:
    return LoraHParams(rank=h.rank, alpha=h.alpha, targets=list(h.targets), lr=h.lr, epochs=h.epochs,
                       batch_size=h.batch_size, grad_accum=h.grad_accum, seed=h.seed, ce_weighting=h.ce_weighting)


def drift_probe(tokenizer: Any, anchors: Any, reference: Any) -> SBR:
    """What drift is read with: a λ=0 SBR term on the probe anchors (their batch laid out once), never the
    anchors SBR trains on. Pass it to `anchor_report`."""
    return SBR(anchors.render(tokenizer), reference.states, 0.0, tokenizer.pad_token_id)


def anchor_report(model: Any, sbr_like: SBR) -> DriftReport:
    with torch.no_grad():
        return anchor_drift(sbr_like.states(model).float(), sbr_like.reference)


def _report_md(meta: dict[str, Any]) -> str:
    d = meta["final_drift"]
    rows = "\n".join(f"| {i} | {r:.4f} | {c:.4f} |" for i, (r, c) in enumerate(zip(d["rel_l2"], d["cosine"])))
    sc = meta.get("screened")
    screened = ""
    if sc:
        at = "the live gate's" if sc.get("max_fpr") is None else f"{sc['max_fpr']:.0%} of its benign dev prompts"
        screened = (f"screened out **{sc['dropped']}** of {sc['of']} examples (lock prompt gate, layer {sc['layer']}, "
                    f"threshold {sc['threshold']}: {at})\n\n")
    return (f"# guard harden report\n\n{screened}method **{meta['method']}**, {meta['examples']} examples, "
            f"{meta['hparams']['epochs']} epochs, {meta['steps']} steps, {meta['seconds']:.0f} s\n\n"
            f"mean anchor drift (relative L2) **{d['mean_rel_l2']:.4f}** (max {d['max_rel_l2']:.4f}); "
            f"verdict vs thresholds: **{meta['drift_status']}**\n\n| anchor | rel L2 | cosine |\n|---|---|---|\n{rows}\n")


def harden(cfg: GuardConfig, data: Path, out: Path, resume: bool = False) -> dict[str, Any]:
    """Train an adapter on `data` with cfg.harden's method; write it to `out` atomically."""
    h = cfg.harden
    if h.rank > h.max_rank:
        raise GuardError(f"LoRA rank {h.rank} exceeds the configured maximum {h.max_rank} (harden.max_rank)")
    rows = read_chat_jsonl(data)  # validate everything before any heavy work
    method = methods.get(h.method)
    ws = Workspace(cfg)
    base = ws.base()
    gate = gate_for_screening(cfg) if h.screen_data else None
    original = ws.original() if method.needs_original else None
    t0 = time.perf_counter()
    fp = fingerprint_dir(base)
    model, tok = load_causal_lm(base, "float32")
    anchors = load_anchor_set(cfg.anchors.set, cfg.anchors.k, cfg.anchors.system_prompt)
    ref = cached_reference(model, tok, anchors, fp, cfg.runtime.resolved_home())
    screened = None
    if gate is not None:
        res = screen(model, tok, rows, gate, h.screen_max_fpr)
        screened = res.summary()
        print(f"screened out {len(res.dropped)} of {len(rows)} examples (their prompt passes the lock's prompt gate "
              f"on the aligned base)", flush=True)
        if not res.kept:
            raise GuardError("every training example was screened out: nothing left to train on")
        rows = res.train_rows(h.screen_keep_steps)
    examples = [encode(tok, list(r.messages), r.answer, h.max_len) for r in rows]
    hp = hparams(h)
    reg = method.build(MethodInputs(h, model, tok, anchors, ref, base, original))
    peft_model = add_lora(model, hp)
    work = out.parent / f".{out.name}.work"
    work.mkdir(parents=True, exist_ok=True)
    log = train_lora(peft_model, examples, hp, tok.pad_token_id, reg, log_path=work / "train_log.jsonl",
                     checkpoint_dir=work, resume=resume, desc=f"harden ({h.method})")
    drift = anchor_report(peft_model, drift_probe(tok, anchors, ref))
    meta = {
        "method": h.method, "lambda": method.lam(h),
        "hparams": asdict(hp), "examples": len(examples), "steps": len(log), "data": str(data), "screened": screened,
        "base_fingerprint": fp, "base_model": str(base), "anchors_hash": anchors.hash, "anchor_set": anchors.name,
        "training_anchors": {"set": h.sbr_anchors, "k": h.sbr_k, "answer_tokens": h.sbr_answer_tokens,
                             "per_step": h.sbr_anchors_per_step} if h.method == "sbr" else None,
        "final_drift": drift.to_dict(), "drift_status": verdict(drift.mean_rel_l2, None, cfg.drift).status,
        "final_ce": log[-1]["ce"] if log else None, "seconds": round(time.perf_counter() - t0, 1), **provenance(),
    }
    with atomic_path(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_guard_meta(tmp, meta)
        (tmp / "report.md").write_text(_report_md(meta))
        shutil.copy(work / "train_log.jsonl", tmp / "train_log.jsonl")
    shutil.rmtree(work, ignore_errors=True)
    return meta


def repair(cfg: GuardConfig, adapter: Path, out: Path, data: Path | None = None) -> dict[str, Any]:
    """Continue `adapter` with the SBR term (plus the user's data if given) until drift < drift.warn."""
    from peft import PeftModel

    h = cfg.harden
    rows = read_chat_jsonl(data) if data is not None else []
    base = Workspace(cfg).base()
    info = read_adapter(adapter, h.max_rank)
    t0 = time.perf_counter()
    fp = fingerprint_dir(base)
    model, tok = load_causal_lm(base, "float32")
    check_adapter_fits(info, model.config, fp)
    anchors = load_anchor_set(cfg.anchors.set, cfg.anchors.k, cfg.anchors.system_prompt)
    ref = cached_reference(model, tok, anchors, fp, cfg.runtime.resolved_home())
    lam = h.sbr_lambda if h.sbr_lambda > 0 else 1.0
    # pulled back on the *training* anchors; measured (and the stop decided) on the probe anchors
    # every training anchor every step: repair runs a few short epochs (restarting the trainer's step count each
    # time), so a rotation would keep pulling the same first group
    sbr = methods.get("sbr").build(MethodInputs(h.model_copy(update={"sbr_lambda": lam, "sbr_anchors_per_step": None}),
                                                model, tok, anchors, ref))
    probe = drift_probe(tok, anchors, ref)
    peft_model = PeftModel.from_pretrained(model, str(info.path), is_trainable=True)
    before = anchor_report(peft_model, probe)
    history = [before.mean_rel_l2]
    hp = LoraHParams(rank=info.rank, alpha=info.alpha, targets=info.targets, lr=h.lr, epochs=1,
                     batch_size=h.batch_size, grad_accum=h.grad_accum, seed=h.seed)
    examples = [encode(tok, list(r.messages), r.answer, h.max_len) for r in rows]
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=h.lr)
    for epoch in range(h.repair_max_epochs):
        if history[-1] <= cfg.drift.warn:
            break
        if examples:
            hp.seed = h.seed + epoch
            train_lora(peft_model, examples, hp, tok.pad_token_id, sbr, desc=f"repair epoch {epoch + 1}")
        else:  # no user data: the SBR term alone pulls the anchors back
            peft_model.train()
            for _ in range(10):
                loss, _ = sbr(peft_model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            peft_model.eval()
        history.append(anchor_report(peft_model, probe).mean_rel_l2)
    after = anchor_report(peft_model, probe)
    meta = {
        "method": "sbr-repair", "repaired_from": str(info.path), "lambda": lam, "examples": len(examples),
        "drift_before": before.to_dict(), "final_drift": after.to_dict(), "drift_history": history,
        "drift_status": verdict(after.mean_rel_l2, None, cfg.drift).status, "base_fingerprint": fp,
        "anchors_hash": anchors.hash, "seconds": round(time.perf_counter() - t0, 1), **provenance(),
    }
    with atomic_path(out) as tmp:
        peft_model.save_pretrained(str(tmp))
        write_guard_meta(tmp, meta)
    return meta
