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
