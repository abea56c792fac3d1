"""Can the 135M model learn the benign FA task? Plain LoRA SFT on the topic task from the aligned base.

Writes bench/results/fa_task.json with accuracy on the held-out split before and after one short SFT run.
The stress test (issue #7) uses this task for FA, so it must be learnable: the goal is >= +20 points.
"""

from __future__ import annotations

import argparse
import time

from common import write_result

from guard.config import load_config
from guard.models import load_causal_lm, resolve_threads
from guard.workspace import Workspace
from training.data import topic_task
from training.evaluate import task_accuracy
from training.sft import encode
from training.trainer import LoraHParams, add_lora, train_lora


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default=None)
    ap.add_argument("--train", type=int, default=400)
    ap.add_argument("--eval", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    args = ap.parse_args()
    cfg = load_config(args.config)
    resolve_threads(cfg.runtime.threads)
    base = Workspace(cfg).base()
    model, tok = load_causal_lm(base, "float32")
    train, ev = topic_task(args.train, args.eval)
    before = task_accuracy(model, tok, ev, desc="FA before")
    hp = LoraHParams(rank=16, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj"], lr=args.lr,
                     epochs=args.epochs, batch_size=8)
    peft_model = add_lora(model, hp)
    t0 = time.perf_counter()
    train_lora(peft_model, [encode(tok, e.prompt, e.answer, 128) for e in train], hp, pad_id=tok.pad_token_id,
               desc="SFT on the topic task")
    seconds = time.perf_counter() - t0
    after = task_accuracy(peft_model, tok, ev, desc="FA after")
    write_result("fa_task", {"task": "topic-classification (AG-News-like, 4 classes, generated)",
                             "train": len(train), "eval": len(ev), "hparams": hp.__dict__, "train_seconds": round(seconds, 1),
                             "accuracy_before": round(before, 2), "accuracy_after": round(after, 2),
                             "gain_points": round(after - before, 2)})


if __name__ == "__main__":
    main()
