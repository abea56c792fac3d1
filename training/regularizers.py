"""Safety regularizers for LoRA fine-tuning, behind one interface: `term(model) -> (loss, logs)`.

Plain SFT is "no regularizer". Each regularizer is built once before training (everything that never
changes — padded anchor batches, references, alignment projectors — is precomputed) and then called once
per optimizer step, so its cost is per step, not per micro-batch.

**SBR** (Safety Bottleneck Regularization): keep the lm_head-input state of K harmful anchor prompts at the
aligned model's cached value. Normalisation (our choice, documented): the per-anchor squared error is divided
by the reference's squared norm, so the term is λ · mean_k (relative L2 drift_k)² — exactly the square of
the drift gauge the health check and `guard vet` report, and independent of the model's hidden-state scale.
(The paper writes λ·mean‖Δh‖²; the authors' code uses mse_loss, i.e. /d. Ours is /‖h_ref‖², a per-anchor
constant, so λ sweeps keep the paper's shape: λ=0 is SFT bit for bit; large λ starts to cost task accuracy.)

**AsFT**: for each adapted weight, V = W_aligned − W_original spans the alignment direction; the LoRA update
ΔW = s·B·A is penalised for the part outside it: λ · Σ ‖(I − C) ΔW‖²_F with C = V Vᵀ / ‖V‖_F (the paper's
normalisation, inherited from SafeLoRA). Computed in low-rank form: with M = B − C B,
‖M A‖²_F = trace((MᵀM)(A Aᵀ)), r×r matrices only — never an out×in product per step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from guard.errors import GuardError
from guard.states import batch_states, prepare_batch

Term = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


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
    reference: torch.Tensor  # [K, hidden], float32, from the frozen aligned model
    lam: float
    pad_id: int = 0
    per_step: int | None = None

    name = "sbr"

    def __post_init__(self) -> None:
        k = len(self.anchor_ids)
        if self.reference.ndim != 2 or self.reference.shape[0] != k:
            raise GuardError(f"SBR: {k} anchors but reference of shape {tuple(self.reference.shape)}")
        if self.lam < 0:
            raise GuardError(f"SBR: lambda must be >= 0, got {self.lam}")
        m = k if self.per_step is None else self.per_step
        if not 1 <= m <= k:
            raise GuardError(f"SBR: anchors per step must be in [1, {k}], got {self.per_step}")
        # laid out once (shared chat-template prefix, padded suffixes): the anchors never change during training
        self._batch = prepare_batch(self.anchor_ids, self.pad_id)
        self._groups = [list(range(i, min(i + m, k))) for i in range(0, k, m)]
        self._group_batches = [prepare_batch([self.anchor_ids[j] for j in g], self.pad_id) for g in self._groups]
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
        g = self._step % len(self._groups)
        idx = self._groups[g]
        h = batch_states(model, self._group_batches[g] if len(self._groups) > 1 else self._batch).float()
        rel_sq = (h - self._ref[idx]).pow(2).sum(-1) / self._ref_sq[idx]
        drift = float(rel_sq.detach().sqrt().mean())
        return self.lam * rel_sq.mean(), {"anchor_drift": drift}


def alignment_projectors(aligned: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                         names: list[str]) -> dict[str, torch.Tensor]:
    """C = V Vᵀ / ‖V‖_F per weight name, V = W_aligned − W_original (float32, [out, out])."""
    out = {}
    for n in names:
        if n not in aligned or n not in original:
            raise GuardError(f"AsFT: weight '{n}' is missing from the aligned or the original model")
        v = aligned[n].float() - original[n].float()
        if v.shape != original[n].shape:
            raise GuardError(f"AsFT: '{n}' has shape {tuple(aligned[n].shape)} vs {tuple(original[n].shape)}")
        norm = v.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise GuardError(f"AsFT: the alignment direction of '{n}' is zero or not finite (same weights?)")
        out[n] = (v @ v.T) / norm
    return out


def asft_lowrank(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:
    """‖(I − C)·(scale·B·A)‖²_F via trace((MᵀM)(AAᵀ)), M = B − C B."""
    m = b - c @ b
    return scale**2 * torch.trace((m.T @ m) @ (a @ a.T))


def asft_dense(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, scale: float) -> torch.Tensor:
    """The same quantity, built densely (reference for tests only)."""
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return ((eye - c) @ (scale * b @ a)).pow(2).sum()


@dataclass
class AsFT:
    """λ · Σ over adapted weights of ‖(I − C) ΔW‖²_F, low-rank form."""

    projectors: dict[str, torch.Tensor]  # base-model weight name (e.g. model.layers.0.self_attn.q_proj.weight) -> C
    lam: float

    name = "asft"

    def __call__(self, model: Any) -> tuple[torch.Tensor, dict[str, float]]:
        total = torch.zeros(())
        for module_name, module in lora_modules(model):
            key = weight_key(module_name)
            c = self.projectors.get(key)
            if c is None:
                continue
            adapter = module.active_adapters[0]
            a = module.lora_A[adapter].weight
            b = module.lora_B[adapter].weight
            total = total + asft_lowrank(b, a, c, module.scaling[adapter])
        return self.lam * total, {"asft_orth": float(total.detach())}


def lora_modules(model: Any):
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "lora_B") and len(getattr(module, "lora_A", {})) > 0:
            yield name, module


def weight_key(peft_module_name: str) -> str:
    """peft's `base_model.model.model.layers.0.self_attn.q_proj` -> `model.layers.0.self_attn.q_proj.weight`."""
    name = peft_module_name
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name + ".weight"
