"""The LoRA fine-tuning loop: one function you can read top to bottom.

Used by `guard align` (the aligned base) and `guard harden` (SBR / AsFT / plain SFT adapters). The loop is
deterministic for a given seed: the example order comes from a seeded `random.Random` whose state is
checkpointed with the LoRA weights and the optimizer after every epoch, so `resume=True` after a kill
continues from the last finished epoch and ends with the same weights as an uninterrupted run.
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

from guard.artifacts import atomic_path, git_commit
from guard.errors import GuardError
from training.sft import Example, answer_loss, collate

CHECKPOINT = "checkpoint.pt"


@dataclass
class LoraHParams:
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 8  # examples per micro-batch (one forward)
    grad_accum: int = 1  # micro-batches per optimizer step; the regularizer runs once per step
    seed: int = 0
    weight_decay: float = 0.0
    # bf16 autocast pays only on CPUs with native bf16 (avx512_bf16/AMX); on AVX2-only CPUs it is ~30x slower.
    bf16: bool = False
    ce_weighting: str = "token"  # "token" | "example" (see HardenConfig.ce_weighting)
    # Polyak (tail) averaging: the LoRA weights returned are the mean over every optimizer step of the last N epochs,
    # not the last step's. The last iterate of a short run at a small batch sits wherever the noise left it; the
    # mean of its final epoch is a steadier point of the same path, for the price of one running sum.
    average_epochs: int = 0
    # "constant", or "linear": the rate falls linearly from `lr` to ~0 over the run, so the last steps move the
    # weights little and the run ends where its trend points, not where the last batches' noise pushed it.
    lr_schedule: str = "constant"


# A regularizer gets the peft model and returns (loss term, logged scalars); None is plain SFT.
Regularizer = Callable[[Any], tuple[Any, dict[str, float]]]


def add_lora(model: Any, hp: LoraHParams) -> Any:
    """Wrap `model` in a peft LoRA model; only the LoRA matrices train."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(hp.seed)  # LoRA A init
    cfg = LoraConfig(r=hp.rank, lora_alpha=hp.alpha, target_modules=list(hp.targets), lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def train_lora(model: Any, examples: Sequence[Example], hp: LoraHParams, pad_id: int,
               regularizer: Regularizer | None = None, log_path: Path | None = None,
               checkpoint_dir: Path | None = None, resume: bool = False, desc: str = "train",
               on_step: Callable[[int], None] | None = None,
               on_epoch: Callable[[int], dict[str, float] | None] | None = None) -> list[dict[str, float]]:
    """Fine-tune the LoRA parameters of a peft `model` on `examples`; returns the per-step log.

    `on_step(step)` runs after every optimizer step (1-based; progress reporting, or a test simulating a kill).
    `on_epoch(epoch)` runs after every epoch with the model in eval mode (for measurements; it must not change
    the weights); what it returns is merged into that epoch's last log row.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if not examples:
        raise GuardError("no training examples")
    rng = random.Random(hp.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
    micro_per_epoch = math.ceil(len(examples) / hp.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / hp.grad_accum)
    start_epoch, step = 0, 0
    if hp.lr_schedule not in ("constant", "linear"):
        raise GuardError(f"lr_schedule {hp.lr_schedule!r}: expected 'constant' or 'linear'")
    if not 0 <= hp.average_epochs <= hp.epochs:
        raise GuardError(f"average_epochs {hp.average_epochs} must be between 0 and epochs ({hp.epochs})")
    avg: dict[str, Any] = {}  # running sum of the trainable weights over the averaged steps
    avg_steps = 0  # how many steps that sum holds
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir is not None else None
    if resume and ckpt is not None and ckpt.is_file():
        # the checkpoint is one dict: weights, optimizer, data order, and what made it
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if not _same_hparams(state["hparams"], hp):
            raise GuardError(f"{ckpt}: was made with other hyper-parameters; start over without --resume")
        set_peft_model_state_dict(model, state["lora"])
        opt.load_state_dict(state["optimizer"])
        rng.setstate(state["rng"])
        start_epoch, step = state["epoch"], state["step"]
        avg, avg_steps = state.get("average", {}), state.get("average_steps", 0)
        if log_path is not None and log_path.is_file():  # drop rows of the interrupted epoch
            rows = [r for r in log_path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
            log_path.write_text("".join(r + "\n" for r in rows))
    elif log_path is not None and log_path.exists():
        log_path.unlink()

    log: list[dict[str, float]] = []
    model.train()
    bar = tqdm(total=steps_per_epoch * hp.epochs, initial=step, desc=desc, unit="step")
    t0 = time.perf_counter()
    for epoch in range(start_epoch, hp.epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        micro = [order[i : i + hp.batch_size] for i in range(0, len(order), hp.batch_size)]
        for s in range(0, len(micro), hp.grad_accum):
            if hasattr(regularizer, "at_step"):  # step-dependent terms (SBR's anchor rotation) follow the step
                regularizer.at_step(step)
            if hp.lr_schedule == "linear":  # from the step count alone, so a resumed run takes the same rates
                for group in opt.param_groups:
                    group["lr"] = hp.lr * (1 - step / (steps_per_epoch * hp.epochs))
            row = {"step": step + 1, "epoch": epoch + 1,
                   **optimizer_step(model, opt, [[examples[i] for i in idx] for idx in micro[s : s + hp.grad_accum]],
                                    pad_id, regularizer, hp.bf16, hp.ce_weighting)}
            step += 1
            if hp.average_epochs and epoch >= hp.epochs - hp.average_epochs:
                _accumulate(model, avg)
                avg_steps += 1
            row["seconds"] = round(time.perf_counter() - t0, 3)
            log.append(row)
            if log_path is not None:
                with log_path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix({k: f"{v:.4f}" for k, v in row.items() if k in ("ce", "reg", "anchor_drift")},
                            epoch=epoch + 1)
            bar.update(1)
            if on_step is not None:
                try:
                    on_step(step)
                except BaseException:
                    bar.close()
                    raise
        if on_epoch is not None:  # per-epoch measurements (the stress test); the model is put back in train mode
            model.eval()
            extra = on_epoch(epoch + 1)
            model.train()
            if extra and log:
                log[-1].update(extra)
        if ckpt is not None:
            state = {"epoch": epoch + 1, "step": step, "lora": get_peft_model_state_dict(model),
                     "optimizer": opt.state_dict(), "rng": rng.getstate(), "hparams": asdict(hp),
                     "average": avg, "average_steps": avg_steps, "commit": git_commit()}
            with atomic_path(ckpt) as tmp:
                torch.save(state, tmp)
    bar.close()
    if avg_steps:
        _load_average(model, avg, avg_steps)
    model.eval()
    return log


def _same_hparams(saved: dict[str, Any], hp: LoraHParams) -> bool:
    """Whether a checkpoint's hyper-parameters are `hp`'s. A field added after the checkpoint was written is absent
    from it and matches when `hp` holds that field's default (what the run that wrote it used), so a long run
    checkpointed before an upgrade still resumes."""
    from dataclasses import MISSING, fields

    defaults = {f.name: f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
                for f in fields(LoraHParams)}
    now = asdict(hp)
    return all(saved.get(k, defaults[k]) == v for k, v in now.items()) and set(saved) <= set(now)


def _accumulate(model: Any, total: dict[str, Any]) -> None:
    """Add the current trainable weights to the running sum `total` (float64, so a long sum loses nothing)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                if name in total:
                    total[name] += p.detach().to(torch.float64)
                else:
                    total[name] = p.detach().to(torch.float64).clone()


def _load_average(model: Any, total: dict[str, Any], n: int) -> None:
    """Set the trainable weights to the mean of the `n` summed iterates."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in total:
                p.copy_((total[name] / n).to(p.dtype))


def optimizer_step(model: Any, opt: Any, micro_batches: list[list[Example]], pad_id: int,
                   regularizer: Regularizer | None = None, bf16: bool = False,
                   ce_weighting: str = "token") -> dict[str, float]:
    """One optimizer step: CE over the micro-batches (token- or example-weighted), the regularizer once, AdamW."""
    import torch

    per_example = ce_weighting == "example"
    n_tokens = [len(mb) if per_example else sum(e.answer_tokens for e in mb) for mb in micro_batches]
    total = sum(n_tokens)
    ce_total = 0.0
    for mb, n in zip(micro_batches, n_tokens):
        ids, mask, labels = collate(mb, pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            ce = answer_loss(model, ids, mask, labels, per_example=per_example)
        (ce * (n / total)).backward()  # weighted by share, so accumulation equals one big batch
        ce_total += float(ce.detach()) * n / total
    row: dict[str, float] = {"ce": ce_total}
    if regularizer is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            reg, extra = regularizer(model)
        if reg.requires_grad:  # a term may sit a step out (SBR's sbr_every): nothing to differentiate
            reg.backward()
        row.update(reg=float(reg.detach()), **extra)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return row
