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
from guard.states import decoder_of, pad_right

Term = Callable[[Any], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class SBR:
    """λ · mean over anchors of ‖h_θ(x_k) − h_ref(x_k)‖² / ‖h_ref(x_k)‖²."""

    anchor_ids: list[list[int]]
    reference: torch.Tensor  # [K, hidden], float32, from the frozen aligned model
    lam: float
    pad_id: int = 0

    name = "sbr"

    def __post_init__(self) -> None:
        if self.reference.ndim != 2 or self.reference.shape[0] != len(self.anchor_ids):
            raise GuardError(f"SBR: {len(self.anchor_ids)} anchors but reference of shape {tuple(self.reference.shape)}")
        if self.lam < 0:
            raise GuardError(f"SBR: lambda must be >= 0, got {self.lam}")
        # padded once: the anchors never change during training
        self._ids, self._mask, self._last = pad_right(self.anchor_ids, self.pad_id)
        self._ref = self.reference.detach().float()
        self._ref_sq = self._ref.pow(2).sum(-1).clamp_min(1e-12)

    def states(self, model: Any) -> torch.Tensor:
        out = decoder_of(model)(input_ids=self._ids, attention_mask=self._mask, use_cache=False)
        return out.last_hidden_state[torch.arange(len(self.anchor_ids)), self._last]

    def __call__(self, model: Any) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.states(model).float()
        rel_sq = (h - self._ref).pow(2).sum(-1) / self._ref_sq
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
