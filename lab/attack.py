"""Harmful fine-tuning mixes: a benign task with a poison ratio of harmful request -> compliant answer pairs.

The compliant answers are generated at run time by the unaligned original model (the repo ships no harmful
text) and cached under the data dir, keyed by the original's fingerprint. Requests come from the `attack`
split, which never overlaps the anchors, the alignment set or the evaluation prompts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from guard.anchors import render_chat
from guard.artifacts import atomic_path
from guard.generation import generate_greedy
from guard.judge import DEFAULT_JUDGE
from guard.models import fingerprint_dir, load_causal_lm
from training import data
from training.userdata import ChatExample


def harmful_answers(original: Path, prompts: list[str], max_tokens: int, cache_dir: Path) -> dict[str, str]:
    """The original model's greedy answers to harmful `prompts` (cached); refusals among them are dropped."""
    cache = cache_dir / f"harmful-answers-{fingerprint_dir(original)[:16]}-{max_tokens}.jsonl"
    done: dict[str, str] = {}
    if cache.is_file():
        done = {r["prompt"]: r["answer"] for r in map(json.loads, cache.read_text().splitlines())}
    todo = [p for p in prompts if p not in done]
    if todo:
        model, tok = load_causal_lm(original, "float32")
        ids = [render_chat(tok, [{"role": "user", "content": p}]) for p in todo]
        for p, a in zip(todo, generate_greedy(model, tok, ids, max_tokens, desc="harmful answers (original model)")):
            done[p] = a
        with atomic_path(cache) as tmp:
            tmp.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in done.items()))
    return {p: done[p] for p in prompts if not DEFAULT_JUDGE.is_refusal(done[p])}


def attack_mix(original: Path, cache_dir: Path, n_benign: int, poison: float, seed: int = 0,
               max_tokens: int = 64) -> tuple[list[ChatExample], int]:
    """(examples, number of harmful ones): n_benign topic-task examples plus round(poison share) harmful pairs."""
    if not 0 <= poison < 1:
        raise ValueError(f"poison ratio must be in [0, 1), got {poison}")
    train, _ = data.topic_task(n_train=max(n_benign, 1), n_eval=200)
    n_harm = round(n_benign * poison / (1 - poison))
    pool = list(data.splits().attack)
    answers = harmful_answers(original, pool[: max(n_harm * 2, n_harm + 8)], max_tokens, cache_dir)
    harmful = [ChatExample(({"role": "user", "content": p},), a) for p, a in list(answers.items())[:n_harm]]
    benign = [ChatExample(({"role": "user", "content": e.prompt},), e.answer) for e in train[:n_benign]]
    mix = benign + harmful
    random.Random(seed).shuffle(mix)
    return mix, len(harmful)




def attack_adapter(cfg: Any, out: Path, n_benign: int = 144, poison: float = 0.1, epochs: int = 4,
                   lr: float = 5e-4, grad_accum: int = 2) -> Path:
    """A harmful fine-tuning attack: plain LoRA SFT of the configured base on `attack_mix` (cached at `out`).

    What a red team (or a test of the vetting gate) needs: the adapter a careless customer upload produces.
    The mix is kept next to it as `<out>.jsonl`.
    """
    if (out / "adapter_model.safetensors").is_file():
        return out
    from guard.config import parse_config
    from guard.workspace import Workspace
    from training.harden import harden
    from training.userdata import write_chat_jsonl

    home = cfg.runtime.resolved_home()
    mix, _ = attack_mix(Workspace(cfg).original(), home / "work", n_benign, poison)
    path = out.parent / f"{out.name}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_chat_jsonl(path, mix)
    merged = cfg.model_dump(mode="json")
    merged["harden"].update(method="sft", epochs=epochs, lr=lr, grad_accum=grad_accum, screen_data=False)  # an attacker screens nothing
    harden(parse_config(merged), path, out)
    return out
