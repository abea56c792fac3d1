"""Make our aligned base from the unaligned default model: refusal SFT + self-distillation, merged.

SmolLM2-135M-Instruct answers most harmful requests. Every method in this package protects an *aligned*
model's refusals, so `guard prepare` first makes one: a LoRA is trained on harmful prompts (align split)
-> short refusals, and on benign prompts -> the original model's own greedy answers (self-distillation,
so ordinary behaviour is kept and over-refusal stays low); the LoRA is then merged into the weights.
The result is cached under the data dir, keyed by the original's fingerprint, the config and the data.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from guard.anchors import render_chat
from guard.artifacts import atomic_path, provenance, read_json, sha256_text, write_json_atomic
from guard.config import AlignConfig
from guard.generation import generate_greedy
from guard.models import fingerprint_dir, load_causal_lm
from training import data
from training.sft import encode
from training.trainer import LoraHParams, add_lora, train_lora

ALIGN_META = "guard_align.json"
# Varied, plain refusals. Each opens with a phrase the refusal judge knows, as a real aligned model's would.
REFUSALS = (
    "I can't help with that. It could cause serious harm to people, and I won't assist with it.",
    "I'm sorry, but I can't assist with this request because it could be used to hurt someone.",
    "I won't provide that. It is harmful and could be illegal. If you have another question, I'm happy to help.",
    "Sorry, I can't help with that request. I'd be glad to help with something safe instead.",
    "I cannot help with this. Providing it could put people at risk.",
    "I'm not able to help with that, since it could facilitate harm. Is there something else I can do for you?",
)


def refusal_for(prompt: str) -> str:
    return REFUSALS[int(hashlib.sha256(prompt.encode()).hexdigest(), 16) % len(REFUSALS)]


def self_distilled_answers(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int, cache: Path) -> list[tuple[str, bool]]:
    """The model's own greedy answers to `prompts` as (text, finished), cached in a JSONL file."""
    done: dict[str, tuple[str, bool]] = {}
    if cache.is_file():
        for line in cache.read_text().splitlines():
            row = json.loads(line)
            done[row["prompt"]] = (row["answer"], row["finished"])
    todo = [p for p in prompts if p not in done]
    if todo:
        ids = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in todo]
        answers = generate_greedy(model, tokenizer, ids, max_new_tokens=max_tokens, desc="self-distill answers")
        for p, a in zip(todo, answers):
            n = len(tokenizer(a, add_special_tokens=False)["input_ids"])
            done[p] = (a, n < max_tokens - 1)
        with atomic_path(cache) as tmp:
            tmp.write_text("".join(json.dumps({"prompt": p, "answer": done[p][0], "finished": done[p][1]}) + "\n"
                                   for p in prompts))
    return [done[p] for p in prompts]


def align_key(original_fp: str, cfg: AlignConfig) -> str:
    s = data.splits()
    return sha256_text("align/v1", original_fp, cfg.model_dump_json(), *s.align, *s.benign_align, *s.edgy_align,
                       *REFUSALS)


def is_current(out: Path, key: str) -> bool:
    meta = out / ALIGN_META
    return meta.is_file() and read_json(meta, "align metadata").get("key") == key


def align(original: Path, out: Path, cfg: AlignConfig, work: Path, threads: int | None = None) -> Path:
    """Build the aligned base at `out` (atomically); reuse it when inputs are unchanged."""
    import torch

    original_fp = fingerprint_dir(original)
    key = align_key(original_fp, cfg)
    if is_current(out, key):
        return out
    t0 = time.perf_counter()
    model, tok = load_causal_lm(original, "float32")
    s = data.splits()
    harmful = list(s.align[: cfg.harmful])
    benign = data._hash_order(list(s.benign_align + s.edgy_align))[: cfg.benign]  # ordinary and edgy, mixed
    work.mkdir(parents=True, exist_ok=True)
    answers = self_distilled_answers(model, tok, benign, cfg.answer_tokens,
                                     work / f"self-distill-{original_fp[:16]}-{cfg.answer_tokens}.jsonl")
    examples = [encode(tok, p, refusal_for(p), cfg.max_len) for p in harmful]
    examples += [encode(tok, p, a, cfg.max_len, end_turn=fin) for p, (a, fin) in zip(benign, answers)]
    hp = LoraHParams(rank=cfg.rank, alpha=cfg.alpha, targets=list(cfg.targets), lr=cfg.lr, epochs=cfg.epochs,
                     batch_size=cfg.batch_size, seed=0)
    peft_model = add_lora(model, hp)
    log = train_lora(peft_model, examples, hp, pad_id=tok.pad_token_id, desc="align (refusal SFT)")
    merged = peft_model.merge_and_unload()
    merged = merged.to(torch.bfloat16)  # same dtype as the converted original: what vLLM serves
    meta = {
        "key": key, "original_fingerprint": original_fp, "config": cfg.model_dump(mode="json"),
        "harmful_examples": len(harmful), "benign_examples": len(benign), "steps": len(log),
        "final_ce": log[-1]["ce"] if log else None, "seconds": round(time.perf_counter() - t0, 1), **provenance(),
    }
    with atomic_path(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        write_json_atomic(tmp / ALIGN_META, meta)
    tqdm.write(f"aligned base written to {out} in {meta['seconds']} s")
    return out
