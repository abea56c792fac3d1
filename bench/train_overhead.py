"""Step-time cost of the safety regularizers on the 135M default model: bench/results/train_overhead.json.

Same batches for every method, interleaved round by round (this machine is noisy, so methods are compared
within one run and one round at a time): SFT; SBR as the package ships it (`harden` defaults: the 128-prompt
training pool, 4 anchors per step, rotating); the same every other step at 2λ (`sbr_every` 2); SBR with the earlier fixed anchors (K=1, and K=8 every step); AsFT.
A step is the paper's effective batch of 32 (4 micro-batches of 8) plus the regularizer once. Reports the median
over round pairs of seconds per step (a pair is the unit, since `sbr_every` 2 alternates a full and a cheap step)
and the ratio to SFT, and the one-off cost of screening the data with the lock's prompt gate
(`harden.screen_data`, on by default) as a share of one SFT epoch over the same examples.
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import write_result

from guard.anchors import load_anchor_set
from guard.config import load_config
from guard.models import fingerprint_dir, load_causal_lm, resolve_threads
from guard.states import cached_reference
from lab.attack import attack_mix
from guard.workspace import Workspace
from training import methods
from training.methods import MethodInputs
from training.sft import encode
from training.trainer import LoraHParams, add_lora, optimizer_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--rounds", type=int, default=10, help="Rounds (even: a round pair is the unit).")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--accum", type=int, default=4)
    args = ap.parse_args()
    if args.rounds < 2 or args.rounds % 2:
        ap.error("--rounds must be even and >= 2")
    cfg = load_config(args.config)
    threads = resolve_threads(cfg.runtime.threads)
    home = cfg.runtime.resolved_home()
    ws = Workspace(cfg)
    base, original = ws.base(), ws.original()
    model, tok = load_causal_lm(base, "float32")
    fp = fingerprint_dir(base)
    from training.screen import gate_for_screening, screen

    gate = gate_for_screening(cfg)  # before any timing: a missing lock fails now
    mix, n_harm = attack_mix(original, home / "work", n_benign=180, poison=0.1)
    examples = [encode(tok, list(e.messages), e.answer, 256) for e in mix]
    per_step = args.batch * args.accum
    steps = [[examples[i : i + args.batch] for i in range(s, s + per_step, args.batch)]
             for s in range(0, len(examples) - per_step + 1, per_step)]
    regs = {}
    anchors = load_anchor_set(cfg.anchors.set, cfg.anchors.k, cfg.anchors.system_prompt)  # the probe set
    ref = cached_reference(model, tok, anchors, fp, home)
    build = lambda h: methods.get(h.method).build(MethodInputs(h, model, tok, anchors, ref, base, original))  # noqa: E731
    regs["sbr_default"] = build(cfg.harden.model_copy(update={"method": "sbr"}))
    # the step-cost candidate: the same anchors pulled every other step at twice λ (harden.sbr_every)
    regs["sbr_every2"] = build(cfg.harden.model_copy(update={"method": "sbr", "sbr_every": 2}))
    fixed = {"method": "sbr", "sbr_anchors": "default", "sbr_anchors_per_step": None}
    for name, k in (("sbr_k1", 1), ("sbr_k8", 8)):
        regs[name] = build(cfg.harden.model_copy(update={**fixed, "sbr_k": k}))
    regs["asft"] = build(cfg.harden.model_copy(update={"method": "asft"}))
    regs = {"sft": None, **regs}
    hp = LoraHParams(rank=16, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], lr=1e-4)
    peft_model = add_lora(model, hp)
    import torch

    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=hp.lr)
    peft_model.train()
    times: dict[str, list[float]] = {m: [] for m in regs}
    optimizer_step(peft_model, opt, steps[0], tok.pad_token_id, None)  # warm-up
    for r in range(args.rounds):
        batch = steps[r % len(steps)]
        for method, reg in regs.items():
            if hasattr(reg, "at_step"):
                reg.at_step(r)
            t0 = time.perf_counter()
            optimizer_step(peft_model, opt, batch, tok.pad_token_id, reg)
            times[method].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {t[-1]:.2f}s" for m, t in times.items()), flush=True)
    # A method may alternate cheap and full steps (sbr_every 2), so each round pair is one unit: the median over
    # pairs of their mean step time.
    med = {m: statistics.median((t[i] + t[i + 1]) / 2 for i in range(0, len(t) - 1, 2)) for m, t in times.items()}
    peft_model.eval()
    with peft_model.disable_adapter():  # screening reads the aligned base, as `guard harden` does before training
        t0 = time.perf_counter()
        screened = screen(peft_model, tok, mix, gate, cfg.harden.screen_max_fpr, desc="screen")
        screen_s = time.perf_counter() - t0
    epoch_s = med["sft"] * len(examples) / per_step
    tokens = sum(len(e.input_ids) for mb in steps[0] for e in mb)
    write_result("train_overhead", {
        "base_fingerprint": fp, "step_seconds": {m: round(v, 3) for m, v in med.items()},
        "ratio": {m: round(v / med["sft"], 3) for m, v in med.items() if m != "sft"},
        "all_step_seconds": {m: [round(x, 3) for x in t] for m, t in times.items()},
        "screen_seconds": round(screen_s, 2), "screen_share_of_sft_epoch": round(screen_s / epoch_s, 4),
        "screened": screened.summary()["dropped"],
        "config": {"micro_batch": args.batch, "grad_accum": args.accum, "rounds": args.rounds, "threads": threads,
                   "task_tokens_per_step": tokens, "anchor_tokens_k8": sum(len(x) for x in regs["sbr_k8"].anchor_ids),
                   "sbr_default": {"anchors": cfg.harden.sbr_anchors, "pool": len(regs["sbr_default"].anchor_ids),
                                   "per_step": cfg.harden.sbr_anchors_per_step},
                   "anchor_tokens_k8_shared_prefix": int(regs["sbr_k8"]._batch.ids.numel() + (0 if regs["sbr_k8"]._batch.prefix is None else regs["sbr_k8"]._batch.prefix.numel())),
                   "lora": "r16 q,k,v,o", "examples": f"topic task + {n_harm} harmful (attack mix)"},
    })


if __name__ == "__main__":
    main()
