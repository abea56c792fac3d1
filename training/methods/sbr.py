"""**SBR** (Safety Bottleneck Regularization): keep the lm_head-input state of K harmful anchor prompts at the
aligned model's cached value.

Normalisation (our choice): the per-anchor squared error is divided by the reference's squared norm, so the term
is λ · mean_k (relative L2 drift_k)² — exactly the square of the drift gauge the health check and `guard vet`
report, and independent of the model's hidden-state scale. (The paper writes λ·mean‖Δh‖²; the authors' code uses
mse_loss, i.e. /d. Ours is /‖h_ref‖², a per-anchor constant, so λ sweeps keep the paper's shape: λ=0 is SFT bit
for bit; large λ starts to cost task accuracy.) Built once before training (padded anchor batches, references),
called once per optimizer step, so its cost is per step, not per micro-batch.

Which anchors and which positions (config `harden`):
- `sbr_anchors` / `sbr_k`: the *training* anchors, a bundled set or JSONL path: `sbr_pool` (the package default:
  128 AdvBench requests, disjoint from every red-team family's and the eval's prompts) or the bundled set named
  `default` (16 AdvBench requests; the first 8 were the package's anchors before the development family showed
  they protect little beyond themselves), or `sbr_pool_framed` (the pool with each request also inside one of
  the gate's training framings: where dressed-up requests land). They never share a prompt with the probe anchors the gauge reads
  (checked when the config loads). `sbr_anchors_per_step` of them (default 8) are pulled per step (rotating), so
  the cost stays 8 per step while the protection covers the pool.
- `sbr_answer_tokens` m: besides the last prompt token, anchor the aligned model's own first m answer tokens
  (teacher-forced): the states that carry the refusal as it unfolds, not only its first token.
- `sbr_lambda` (λ); `sbr_every` n: the term on every n-th step only, at n·λ (the step-cost knob: the anchor pass
  is a second forward/backward whose fixed cost does not shrink with fewer anchors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from guard.errors import GuardError
from guard.states import batch_states, batched_states, last_token_states, prepare_batch
from training.methods import Method, MethodInputs, register


@dataclass
class SBR:
    """λ · mean over anchors of ‖h_θ(x_k) − h_ref(x_k)‖² / ‖h_ref(x_k)‖².

    `per_step` < K turns the mean over all K anchors into a rotation: the anchors are cut into fixed groups of
    `per_step` and step t uses group t mod (K / per_step), so every anchor is pulled back once per cycle and
    the term's average over a cycle is the full term, at per_step/K of the cost. None (default) = all K.
    The group follows the optimizer step, not a call counter, so a resumed run rotates exactly as before.
    `states(model)` always measures all K anchors.
    """

    anchor_ids: list[list[int]]
    reference: torch.Tensor  # [K, hidden] or [K, tail + 1, hidden], float32, from the frozen aligned model
    lam: float
    pad_id: int = 0
    per_step: int | None = None
    tail: int = 0  # answer tokens anchored after the last prompt token (anchor_ids end with them)
    every: int = 1  # the term acts on every `every`-th step only, at every·λ (harden.sbr_every)

    name = "sbr"

    def __post_init__(self) -> None:
        k = len(self.anchor_ids)
        want = 2 if self.tail == 0 else 3
        if self.reference.ndim != want or self.reference.shape[0] != k or (want == 3 and self.reference.shape[1] != self.tail + 1):
            raise GuardError(f"SBR: {k} anchors (tail {self.tail}) but reference of shape {tuple(self.reference.shape)}")
        if self.lam < 0:
            raise GuardError(f"SBR: lambda must be >= 0, got {self.lam}")
        if self.every < 1:
            raise GuardError(f"SBR: every must be >= 1, got {self.every}")
        m = k if self.per_step is None else self.per_step
        if not 1 <= m <= k:
            raise GuardError(f"SBR: anchors per step must be in [1, {k}], got {self.per_step}")
        # laid out once (shared chat-template prefix, padded suffixes): the anchors never change during training
        self._batch = prepare_batch(self.anchor_ids, self.pad_id, tail=self.tail)
        self._groups = [list(range(i, min(i + m, k))) for i in range(0, k, m)]
        self._group_batches = [prepare_batch([self.anchor_ids[j] for j in g], self.pad_id, tail=self.tail)
                               for g in self._groups]
        self._ref = self.reference.detach().float()
        self._ref_sq = self._ref.pow(2).sum(-1).clamp_min(1e-12)
        self._step = 0

    def at_step(self, step: int) -> None:
        """Called by the trainer before optimizer step `step` (0-based): picks the anchor group."""
        self._step = step

    def states(self, model: Any) -> torch.Tensor:
        """All K anchor states (for reports and drift)."""
        return batch_states(model, self._batch)

    def __call__(self, model: Any) -> tuple[torch.Tensor, dict[str, float]]:
        """The term for the current step; on the steps `every` skips, a constant 0 (no forward, no backward)."""
        if self._step % self.every:
            return torch.zeros(()), {}
        g = (self._step // self.every) % len(self._groups)
        idx = self._groups[g]
        h = batch_states(model, self._group_batches[g] if len(self._groups) > 1 else self._batch).float()
        rel_sq = (h - self._ref[idx]).pow(2).sum(-1) / self._ref_sq[idx]
        drift = float(rel_sq.detach().sqrt().mean())
        return self.every * self.lam * rel_sq.mean(), {"anchor_drift": drift}


def answer_anchor_ids(model: Any, tokenizer: Any, prompts_ids: list[list[int]], answer_tokens: int,
                      batch_size: int = 32) -> list[list[int]]:
    """Each prompt followed by `model`'s own first `answer_tokens` greedy tokens (fp32 argmax of lm_head)."""
    head = model.get_output_embeddings()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = [list(ids) for ids in prompts_ids]
    with torch.no_grad():
        for _ in range(answer_tokens):
            for i in range(0, len(out), batch_size):
                chunk = out[i : i + batch_size]
                nxt = head(last_token_states(model, chunk, pad)).argmax(-1).tolist()
                for row, t in zip(chunk, nxt):
                    row.append(int(t))
    return out


def _build(inp: MethodInputs) -> SBR:
    """SBR on the training anchors, their reference taken from `inp.model` (the frozen aligned base) now: one
    prefill of K prompts (plus m greedy steps with answer tokens), seconds."""
    from guard.anchors import load_anchor_set

    h, tok = inp.h, inp.tokenizer
    anchors = load_anchor_set(h.sbr_anchors, h.sbr_k, inp.anchors.system_prompt if inp.anchors else None)
    ids = anchors.render(tok)
    if h.sbr_answer_tokens:
        ids = answer_anchor_ids(inp.model, tok, ids, h.sbr_answer_tokens)
    ref = batched_states(inp.model, ids, tok.pad_token_id, tail=h.sbr_answer_tokens, batch_size=32)
    per_step = min(h.sbr_anchors_per_step, len(anchors)) if h.sbr_anchors_per_step else None
    return SBR(ids, ref, h.sbr_lambda, tok.pad_token_id, per_step, tail=h.sbr_answer_tokens, every=h.sbr_every)


register(Method("sbr", build=_build, lam_field="sbr_lambda",
                summary="anchor the lm_head-input state of harmful prompts to the aligned base"))
