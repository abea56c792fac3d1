"""The LoRA fine-tuning loop: one function you can read top to bottom.

Used by `guard align` (refusal SFT that makes the aligned base). The adapter-hardening issue adds the
regularizer hook's users (SBR, AsFT), per-epoch checkpoints and resume on top of this same loop.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from training.sft import Example, answer_loss, collate


@dataclass
class LoraHParams:
    rank: int = 16
    alpha: float = 32.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8
    grad_accum: int = 1
    seed: int = 0
    weight_decay: float = 0.0
    # bf16 autocast pays only on CPUs with native bf16 (avx512_bf16/AMX); on AVX2-only CPUs it is ~30x slower.
    bf16: bool = False


# A regularizer gets the peft model and returns (loss_term, logged scalars).
Regularizer = Callable[[Any], tuple[Any, dict[str, float]]]


def add_lora(model: Any, hp: LoraHParams) -> Any:
    """Wrap `model` in a peft LoRA model; only the LoRA matrices train."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(hp.seed)
    cfg = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, target_modules=list(hp.targets), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_lora(model: Any, examples: Sequence[Example], hp: LoraHParams, pad_id: int,
               regularizer: Regularizer | None = None, log_path: Path | None = None,
               desc: str = "train") -> list[dict[str, float]]:
    """Fine-tune the LoRA parameters of a peft `model` on `examples`; returns the per-step log."""
    import torch

    rng = random.Random(hp.seed)
    torch.manual_seed(hp.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / (hp.batch_size * hp.grad_accum))
    total = steps_per_epoch * hp.epochs
    log: list[dict[str, float]] = []
    model.train()
    bar = tqdm(total=total, desc=desc, unit="step")
    step = 0
    t0 = time.perf_counter()
    for epoch in range(hp.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        micro = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
        for s in range(0, len(micro), hp.grad_accum):
            group = micro[s : s + hp.grad_accum]
            ce_sum, reg_sum, extra = 0.0, 0.0, {}
            for idx in group:
                ids, mask, labels = collate([examples[i] for i in idx], pad_id)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=hp.bf16):
                    ce = answer_loss(model, ids, mask, labels)
                    loss = ce
                    if regularizer is not None:
                        reg, extra = regularizer(model)
                        loss = loss + reg
                        reg_sum += float(reg.detach()) / len(group)
                (loss / len(group)).backward()
                ce_sum += float(ce.detach()) / len(group)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            row = {"step": step, "epoch": epoch + 1, "ce": ce_sum, "reg": reg_sum, **extra,
                   "seconds": time.perf_counter() - t0}
            log.append(row)
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(ce=f"{ce_sum:.3f}", reg=f"{reg_sum:.4f}", epoch=epoch + 1)
            bar.update(1)
    bar.close()
    model.eval()
    return log


def hparams_dict(hp: LoraHParams) -> dict[str, Any]:
    return asdict(hp)
