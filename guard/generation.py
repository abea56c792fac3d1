"""Greedy HF generation for judging answers (alignment data, vetting, evaluation).

Greedy and batched with left padding: deterministic, so a judged answer is reproducible, and batches of
~16 are where CPU throughput stops improving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm


def generate_greedy(model: Any, tokenizer: Any, batch: Sequence[Sequence[int]], max_new_tokens: int = 48,
                    batch_size: int = 16, desc: str | None = None) -> list[str]:
    """Decode the greedy continuation of each token-id prompt; returns the new text only."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    device = next(model.parameters()).device
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # similar lengths pad less
    texts: dict[int, str] = {}
    bar = tqdm(total=len(batch), desc=desc, disable=desc is None, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(batch[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(batch[i]) :] = torch.tensor(list(batch[i]))
            mask[r, width - len(batch[i]) :] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, temperature=None, top_p=None,
                                 top_k=None)
        for r, i in enumerate(idx):
            texts[i] = tokenizer.decode(gen[r, width:], skip_special_tokens=True).strip()
        bar.update(len(idx))
    bar.close()
    out = [texts[i] for i in range(len(batch))]
    return out


def _eos_cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def generate_conditional(model: Any, tokenizer: Any, batch: Sequence[Sequence[int]], handle: Any, gate: Any,
                         max_new_tokens: int = 48, batch_size: int = 16, force: Sequence[bool] | None = None,
                         desc: str | None = None) -> tuple[list[str], list[bool]]:
    """Greedy answers under the conditional lock, the way the vLLM worker serves them; (texts, steered).

    Each prompt is prefilled unsteered and `gate` (guard.lock.PromptGate) scores the residual stream entering its
    layer at the last prompt token. The first answer token comes from that unsteered prefill (in the engine it is
    sampled in the same step that computes the score); every later forward of a flagged request runs with
    `handle`'s lock on. Unflagged requests are plain greedy. `force[i]` steers request i from its prefill on,
    whatever its score (a request or an adapter that asks for the lock). `handle` (guard.lock.LockHandle) is
    left off.
    """
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_cfg = getattr(model.generation_config, "eos_token_id", None)
    eos = {int(tokenizer.eos_token_id)} | set([eos_cfg] if isinstance(eos_cfg, int) else (eos_cfg or []))
    device = next(model.parameters()).device
    force = list(force) if force is not None else [False] * len(batch)
    greedy = {"do_sample": False, "pad_token_id": pad, "temperature": None, "top_p": None, "top_k": None}
    handle.off()
    texts: dict[int, str] = {}
    steered: dict[int, bool] = {}
    order = sorted(range(len(batch)), key=lambda i: len(batch[i]))
    bar = tqdm(total=len(batch), desc=desc, disable=desc is None, leave=False)

    def finish(rows: list[int], gen: Any, width: int, idx: list[int]) -> None:
        for g, r in zip(gen, rows):
            new = _eos_cut(g[width:].tolist()[:max_new_tokens], eos)
            texts[idx[r]] = tokenizer.decode(new, skip_special_tokens=True).strip()

    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(batch[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, width - len(batch[i]) :] = torch.tensor(list(batch[i]))
            mask[r, width - len(batch[i]) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        free = [r for r in range(len(idx)) if not force[idx[r]]]
        flags: dict[int, bool] = {}
        with torch.no_grad():
            if free:
                hs = model(input_ids=ids[free], attention_mask=mask[free], position_ids=pos[free], use_cache=False,
                           output_hidden_states=True).hidden_states[gate.layer][:, -1]
                flags = dict(zip(free, gate.flags(hs).tolist()))
            plain = [r for r in free if not flags[r]]
            gated = [r for r in free if flags[r]]
            forced = [r for r in range(len(idx)) if force[idx[r]]]
            if plain:
                finish(plain, model.generate(input_ids=ids[plain], attention_mask=mask[plain],
                                             max_new_tokens=max_new_tokens, **greedy), width, idx)
            if forced:
                handle.on()
                try:
                    finish(forced, model.generate(input_ids=ids[forced], attention_mask=mask[forced],
                                                  max_new_tokens=max_new_tokens, **greedy), width, idx)
                finally:
                    handle.off()
            if gated:
                out = model(input_ids=ids[gated], attention_mask=mask[gated], position_ids=pos[gated], use_cache=True)
                first = out.logits[:, -1].argmax(-1, keepdim=True)
                handle.on()
                try:
                    gen = model.generate(input_ids=torch.cat([ids[gated], first], 1),
                                         attention_mask=torch.cat([mask[gated], torch.ones_like(first)], 1),
                                         past_key_values=out.past_key_values,
                                         max_new_tokens=max(1, max_new_tokens - 1), **greedy)
                finally:
                    handle.off()
                finish(gated, gen, width, idx)
        for r, i in enumerate(idx):
            steered[i] = bool(force[i] or flags.get(r, False))
        bar.update(len(idx))
    bar.close()
    return [texts[i] for i in range(len(batch))], [steered[i] for i in range(len(batch))]
