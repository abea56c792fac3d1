"""Chat-templated supervised examples: token ids with the loss on the answer tokens only.

The prompt is rendered exactly as serving renders a chat request (guard.anchors.render_chat), so what the
model learns to answer is what it will be asked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guard.anchors import render_chat

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    @property
    def answer_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def encode(tokenizer: Any, prompt: str | list[dict[str, str]], answer: str, max_len: int,
           system_prompt: str | None = None, end_turn: bool = True) -> Example:
    """Prompt (templated, masked) + answer (+ end-of-turn, trained), truncated to `max_len` from the answer end.

    `prompt` is a user message or the chat so far (messages before the trained assistant turn).
    `end_turn=False` for answers cut at a token budget: training the end token there would teach the model
    to stop mid-sentence.
    """
    msgs = ([{"role": "system", "content": system_prompt}] if system_prompt is not None else [])
    msgs += [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    prompt_ids = render_chat(tokenizer, msgs)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + ([end] if end_turn else [])
    prompt_ids = prompt_ids[-(max_len // 2):] if len(prompt_ids) > max_len // 2 else prompt_ids
    answer_ids = answer_ids[: max_len - len(prompt_ids)]
    return Example(tuple(prompt_ids + answer_ids), tuple([IGNORE] * len(prompt_ids) + answer_ids))


def collate(batch: Sequence[Example], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels) tensors."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return ids, mask, labels


def answer_loss(model: Any, ids, mask, labels, per_example: bool = False):
    """Mean next-token cross-entropy over answer tokens (per_example: the mean of each example's own mean).

    lm_head runs only on the positions that predict an answer token: the prompt positions would be
    masked out anyway, and with a 49k vocabulary their logits are a sizeable share of the step.
    """
    import torch.nn.functional as F

    from guard.states import decoder_of

    hidden = decoder_of(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    target = labels[:, 1:]
    keep = target != IGNORE
    logits = output_head(model)(hidden[:, :-1][keep])
    if not per_example:
        return F.cross_entropy(logits.float(), target[keep])
    import torch

    tok = F.cross_entropy(logits.float(), target[keep], reduction="none")
    row = keep.nonzero()[:, 0]  # which example each kept token belongs to
    sums = torch.zeros(ids.shape[0], device=tok.device).index_add(0, row, tok)
    counts = keep.sum(1).clamp_min(1)
    return (sums / counts)[keep.any(1)].mean()


def output_head(model: Any) -> Any:
    """lm_head of an HF causal LM, through any peft wrapper."""
    return model.get_output_embeddings()
