"""**AsFT**: for each adapted weight, V = W_aligned − W_original spans the alignment direction; the LoRA update
ΔW = s·B·A is penalised for the part outside it: λ · Σ ‖(I − C) ΔW‖²_F with C = V Vᵀ / ‖V‖_F (the paper's
normalisation, inherited from SafeLoRA). Computed in low-rank form: with M = B − C B,
‖M A‖²_F = trace((MᵀM)(A Aᵀ)), r×r matrices only — never an out×in product per step. The projectors are built
once before training.

Config: `harden.asft_lambda` (λ), `harden.asft_targets` (default: every LoRA target, since an adapted module AsFT
leaves free is a bypass). Needs the unaligned original (`model.original` or the converted default model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from guard.errors import GuardError
from training.methods import Method, MethodInputs, register


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


def load_weights(model_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors.torch import safe_open

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for n in names:
                if n in st.keys():
                    out[n] = st.get_tensor(n)
    return out


_BLOCK = {"gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}  # Llama layout: everything else is attention


def _build(inp: MethodInputs) -> AsFT:
    if inp.original is None or inp.base is None:
        raise GuardError("AsFT needs the original (unaligned) model: set model.original")
    h = inp.h
    names = [f"model.layers.{i}.{_BLOCK.get(m, 'self_attn')}.{m}.weight"
             for i in range(inp.model.config.num_hidden_layers) for m in (h.asft_targets or h.targets)]
    return AsFT(alignment_projectors(load_weights(inp.base, names), load_weights(inp.original, names), names),
                h.asft_lambda)


register(Method("asft", build=_build, lam_field="asft_lambda", needs_original=True,
                summary="penalise the LoRA update outside the alignment direction"))
