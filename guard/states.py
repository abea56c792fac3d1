"""The hidden state that SBR regularises and the health check measures, and its reference cache.

h(x) is the final-norm output at the last prompt token: the exact row fed to lm_head, so
`lm_head(h(x))` are the next-token logits. It is computed by the decoder stack alone (no lm_head, no
vocab-sized matmul), with right padding so every row's positions match an unpadded forward.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.artifacts import atomic_path, check_finite, provenance, sha256_text
from guard.errors import GuardError

if TYPE_CHECKING:
    import torch

REF_FORMAT = "safety-guard/reference-states"


def decoder_of(model: Any) -> Any:
    """The module whose output is the lm_head input (works for HF causal LMs and peft wrappers)."""
    get = getattr(model, "get_decoder", None)
    dec = get() if callable(get) else None
    if dec is None and hasattr(model, "get_base_model"):
        dec = model.get_base_model().get_decoder()
    if dec is None:
        raise GuardError(f"cannot find the decoder stack of {type(model).__name__}")
    return dec


def pad_right(batch: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, last_index) for a right-padded batch."""
    import torch

    if not batch or any(len(ids) == 0 for ids in batch):
        raise GuardError("cannot compute hidden states of an empty prompt")
    width = max(len(ids) for ids in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    last = torch.tensor([len(row) - 1 for row in batch], dtype=torch.long)
    return ids, mask, last


MIN_SHARED_PREFIX = 4  # below this, one forward of the whole batch is as cheap


@dataclass(frozen=True)
class PromptBatch:
    """A batch of prompts laid out once for repeated forwards (SBR runs the same anchors every step).

    Chat-templated prompts share a prefix (system prompt, role tags): ~24 of SmolLM2's ~41 anchor tokens.
    The shared prefix runs once, its KV cache is repeated across the batch, and only the right-padded
    suffixes run per prompt, so the anchors cost ~half the tokens.
    """

    prefix: torch.Tensor | None  # [1, p] ids shared by every prompt, or None
    ids: torch.Tensor  # [B, S] right-padded suffix ids (whole prompts when prefix is None)
    mask: torch.Tensor  # [B, p + S] attention mask over prefix + suffix
    last: torch.Tensor  # [B] index of each prompt's last token in `ids`
    tail: int = 0  # also gather the `tail` positions before `last` (states [B, tail + 1, hidden])

    def __len__(self) -> int:
        return self.ids.shape[0]


def shared_prefix_len(batch: list[list[int]]) -> int:
    """Length of the common prefix, leaving every prompt at least one token of its own."""
    limit = min(len(ids) for ids in batch) - 1
    n = 0
    while n < limit and all(ids[n] == batch[0][n] for ids in batch):
        n += 1
    return n


def prepare_batch(batch: list[list[int]], pad_id: int = 0, share_prefix: bool = True, tail: int = 0) -> PromptBatch:
    """Lay out `batch` for `batch_states`; the prefix is shared only for 2+ prompts with a long enough common start.

    `tail` > 0 gathers the last tail + 1 positions of each row instead of the last one: a prompt followed by the
    first answer tokens, whose states carry the decision to refuse as it unfolds.
    """
    import torch

    if not batch or any(len(ids) == 0 for ids in batch):
        raise GuardError("cannot compute hidden states of an empty prompt")
    if tail < 0 or any(len(ids) <= tail for ids in batch):
        raise GuardError(f"every sequence needs more than tail={tail} tokens")
    p = shared_prefix_len(batch) if share_prefix and len(batch) > 1 else 0
    p = min(p, min(len(ids) for ids in batch) - 1 - tail)  # gathered positions stay in the per-row suffix
    if p < MIN_SHARED_PREFIX:
        ids, mask, last = pad_right(batch, pad_id)
        return PromptBatch(None, ids, mask, last, tail)
    ids, mask, last = pad_right([row[p:] for row in batch], pad_id)
    prefix = torch.tensor([batch[0][:p]], dtype=torch.long)
    return PromptBatch(prefix, ids, torch.cat([torch.ones(len(batch), p, dtype=torch.long), mask], 1), last, tail)


def batch_states(model: Any, pb: PromptBatch) -> torch.Tensor:
    """h(x) for every prompt of a prepared batch: [B, hidden] ([B, tail + 1, hidden] with a tail) in the model's
    dtype, differentiable."""
    import torch

    device = next(model.parameters()).device
    decoder = decoder_of(model)
    if pb.prefix is None:
        out = decoder(input_ids=pb.ids.to(device), attention_mask=pb.mask.to(device), use_cache=False)
    else:
        pre = decoder(input_ids=pb.prefix.to(device), use_cache=True)
        cache = pre.past_key_values
        cache.batch_repeat_interleave(len(pb))
        out = decoder(input_ids=pb.ids.to(device), attention_mask=pb.mask.to(device), past_key_values=cache,
                      use_cache=True)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    rows = torch.arange(len(pb), device=device)
    if pb.tail == 0:
        return hidden[rows, pb.last.to(device)]
    cols = pb.last.to(device)[:, None] - torch.arange(pb.tail, -1, -1, device=device)[None, :]
    return hidden[rows[:, None], cols]


def last_token_states(model: Any, batch: list[list[int]], pad_id: int = 0) -> torch.Tensor:
    """h(x) for each token-id list in `batch`: shape [len(batch), hidden], in the model's dtype.

    Differentiable (SBR calls it under autograd); wrap in `torch.no_grad()` to cache references. Batches of
    chat prompts run their shared prefix once (see `PromptBatch`); a single prompt is one plain forward.
    """
    return batch_states(model, prepare_batch(batch, pad_id))


@dataclass
class ReferenceStates:
    """Anchor states of the aligned base: the fixed point SBR pulls towards and drift is measured from."""

    states: torch.Tensor  # [K, hidden] float32
    model_fingerprint: str
    anchors_hash: str
    prompt_ids_hash: str
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        check_finite("reference states", {"states": self.states})
        header = {
            "format": REF_FORMAT,
            "model_fingerprint": self.model_fingerprint,
            "anchors_hash": self.anchors_hash,
            "prompt_ids_hash": self.prompt_ids_hash,
            **{k: v for k, v in self.meta.items()},
        }
        with atomic_path(path) as tmp:
            save_file({"states": self.states.detach().float().contiguous().cpu()}, str(tmp),
                      metadata={"guard": json.dumps(header, sort_keys=True)})
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], model_fingerprint: str | None = None,
             anchors_hash: str | None = None, hidden_size: int | None = None) -> ReferenceStates:
        """Load and check against what the caller is about to compare with; every mismatch is one line."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        p = Path(path)
        if not p.is_file():
            raise GuardError(f"reference states not found: {p}")
        try:
            with safe_open(str(p), "pt") as f:
                header = json.loads((f.metadata() or {}).get("guard", "{}"))
                if "states" not in f.keys():
                    raise GuardError(f"{p}: no 'states' tensor (not a safety-guard reference file)")
                states = f.get_tensor("states")
        except (SafetensorError, OSError, json.JSONDecodeError) as e:
            raise GuardError(f"{p}: unreadable reference states ({e})") from None
        if header.get("format") != REF_FORMAT:
            raise GuardError(f"{p}: not a safety-guard reference-state file")
        ref = cls(states=states, model_fingerprint=header.pop("model_fingerprint", ""),
                  anchors_hash=header.pop("anchors_hash", ""), prompt_ids_hash=header.pop("prompt_ids_hash", ""),
                  meta=header)
        if states.ndim != 2:
            raise GuardError(f"{p}: states must be [anchors, hidden], found shape {tuple(states.shape)}")
        if hidden_size is not None and states.shape[1] != hidden_size:
            raise GuardError(f"{p}: states have hidden size {states.shape[1]}, the model has {hidden_size}")
        check_finite(str(p), {"states": states})
        if model_fingerprint is not None and ref.model_fingerprint != model_fingerprint:
            raise GuardError(f"{p}: computed on model {ref.model_fingerprint[:12]}, not on {model_fingerprint[:12]}")
        if anchors_hash is not None and ref.anchors_hash != anchors_hash:
            raise GuardError(f"{p}: computed for another anchor set ({ref.anchors_hash[:12]} != {anchors_hash[:12]})")
        return ref


def prompt_ids_hash(batch: list[list[int]]) -> str:
    return sha256_text("ids/v1", *(",".join(map(str, ids)) for ids in batch))


def batched_states(model: Any, batch: list[list[int]], pad_id: int, tail: int = 0,
                   batch_size: int = 16) -> torch.Tensor:
    """States of many sequences in chunks, float32 on the CPU, no grad: [N, hidden], or [N, tail + 1, hidden]
    with a tail (see `prepare_batch`). What reference states are made of."""
    import torch

    with torch.no_grad():
        rows = [batch_states(model, prepare_batch(batch[i : i + batch_size], pad_id, tail=tail)).float().cpu()
                for i in range(0, len(batch), batch_size)]
    return torch.cat(rows)


def compute_reference(model: Any, tokenizer: Any, anchors: Any, model_fingerprint: str,
                      batch_size: int = 16) -> ReferenceStates:
    """Anchor states of `model` (adapters must already be disabled/merged by the caller)."""
    batch = anchors.render(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    meta = {"anchor_set": anchors.name, "num_anchors": len(batch), "dtype": str(next(model.parameters()).dtype),
            **provenance()}
    return ReferenceStates(batched_states(model, batch, pad, batch_size=batch_size), model_fingerprint, anchors.hash,
                           prompt_ids_hash(batch), meta)


def reference_path(home: Path, model_fingerprint: str, anchors_hash: str) -> Path:
    return home / "references" / f"{model_fingerprint[:16]}-{anchors_hash[:16]}.safetensors"


def cached_reference(model: Any, tokenizer: Any, anchors: Any, model_fingerprint: str, home: Path) -> ReferenceStates:
    """Load the cached reference for (model, anchors), computing and caching it on a miss."""
    path = reference_path(home, model_fingerprint, anchors.hash)
    if path.is_file():
        ref = ReferenceStates.load(path, model_fingerprint, anchors.hash)
        if ref.prompt_ids_hash == prompt_ids_hash(anchors.render(tokenizer)):
            return ref
    ref = compute_reference(model, tokenizer, anchors, model_fingerprint)
    ref.save(path)
    return ref
