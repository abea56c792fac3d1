"""Greedy HF generation for judging answers (alignment data, vetting, evaluation).

Greedy and batched with left padding: deterministic, so a judged answer is reproducible, and batches of
~16 are where CPU throughput stops improving.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm


def pad_left(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of token-id rows padded on the left, as generation wants them."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, width - len(row) :] = torch.tensor(list(row))
        mask[k, width - len(row) :] = 1
    return ids, mask


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
        ids, mask = pad_left([batch[i] for i in idx], pad)
        width = ids.shape[1]
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


def action_args(action: str, tokenizer: Any, refusal_text: str) -> dict[str, Any]:
    """`generate_conditional`'s keyword arguments for `lock.gate_action` (refuse / steer / fallback)."""
    if action == "refuse":
        from guard.lock import refusal_ids

        return {"refusal": refusal_ids(tokenizer, refusal_text)}
    return {"fallback": True} if action == "fallback" else {}


def generate_conditional(model: Any, tokenizer: Any, batch: Sequence[Sequence[int]], lock: Any, strength: float,
                         max_new_tokens: int = 48, batch_size: int = 16, force: Sequence[bool] | None = None,
                         desc: str | None = None, refusal: Sequence[int] | None = None,
                         fallback: bool = False, reads_base: bool = False) -> tuple[list[str], list[bool]]:
    """Greedy answers under the conditional lock, the way the vLLM worker serves them; (texts, steered).

    `lock.gate` (guard.lock.PromptGate) scores the residual stream entering its layer at each prompt's last
    token on the unsteered model. A flagged prompt is answered with the lock on at layers >= the gate's layer,
    prefill included (`lock.from_layer`): the layers below, and so the state the gate read, are never steered,
    which is what lets the engine decide inside the same forward. Unflagged prompts are plain greedy.
    `force[i]` steers prompt i at every layer whatever its score (a request that asked for the lock).
    `refusal` (token ids ending in EOS, guard.lock.refusal_ids): the `refuse` action — a flagged prompt is answered
    with exactly those tokens, as the worker forces them. `fallback`: the `fallback` action — a flagged prompt is
    answered by the model with its adapter set aside (`disable_adapter`, a peft model), as the engine restarts it
    on the base; on a model without an adapter that is its own plain answer. `reads_base` (lock.gate_reads
    `base`): the gate scores each prompt with the adapter set aside, as the engine's scoring prefill on the base
    does, and a flagged prompt is answered without the adapter under every action (`lock` should then carry the
    base's threshold). The model is left unsteered.
    """
    import contextlib

    import torch

    from guard.lock import LockHandle

    gate = lock.gate
    force = list(force) if force is not None else [False] * len(batch)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    flags: list[bool] = [False] * len(batch)
    free = [i for i in range(len(batch)) if not force[i]]
    order = sorted(free, key=lambda i: len(batch[i]))
    aside = model.disable_adapter if hasattr(model, "disable_adapter") else contextlib.nullcontext
    with torch.no_grad(), (aside() if reads_base else contextlib.nullcontext()):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = pad_left([batch[i] for i in idx], pad)
            pos = (mask.cumsum(-1) - 1).clamp_min(0)
            hs = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device),
                       use_cache=False, output_hidden_states=True).hidden_states[gate.layer][:, -1]
            for i, f in zip(idx, gate.flags(hs).tolist()):
                flags[i] = bool(f)
    texts: dict[int, str] = {}
    flagged = [i for i in free if flags[i]]
    if refusal is not None:
        answer = tokenizer.decode(list(refusal)[:max_new_tokens], skip_special_tokens=True).strip()
        texts.update({i: answer for i in flagged})
        flagged = []
    if fallback and flagged:
        with aside():
            texts.update(zip(flagged, generate_greedy(model, tokenizer, [batch[i] for i in flagged], max_new_tokens,
                                                      batch_size, desc)))
        flagged = []
    groups = (([i for i in free if not flags[i]], None), (flagged, lock.from_layer(gate.layer)),
              ([i for i in range(len(batch)) if force[i]], lock))
    for rows, steer in groups:
        if not rows:
            continue
        handle = None
        if steer is not None:
            handle = LockHandle(model, steer)
            handle.set_strength(strength)
            handle.on()
        base_only = reads_base and rows is flagged  # flagged on the base's states: answered without the adapter
        try:
            with aside() if base_only else contextlib.nullcontext():
                out = generate_greedy(model, tokenizer, [batch[i] for i in rows], max_new_tokens, batch_size, desc)
        finally:
            if handle is not None:
                handle.remove()
        texts.update(zip(rows, out))
    return [texts[i] for i in range(len(batch))], [flags[i] or force[i] for i in range(len(batch))]
