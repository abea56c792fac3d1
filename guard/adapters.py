"""peft LoRA adapter directories: reading, provenance (`guard.json`) and compatibility with a base model.

Checked before an adapter is trusted anywhere (vetting, repair, serving): the files exist and parse, the
rank is within the configured maximum, every LoRA tensor fits the base model's shapes, tensors are finite,
and — when the adapter was made by safety-guard — the base-model fingerprint matches.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from guard.artifacts import check_fingerprint, read_json
from guard.errors import GuardError

GUARD_META = "guard.json"
_LAYER = re.compile(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")


@dataclass
class AdapterInfo:
    path: Path
    rank: int
    alpha: float
    targets: list[str]
    base_name: str | None
    guard_meta: dict[str, Any] | None = field(default=None)


def read_adapter(path: str | os.PathLike[str], max_rank: int | None = None) -> AdapterInfo:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise GuardError(f"adapter dir not found: {p}")
    cfg = read_json(p / "adapter_config.json", "adapter config")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise GuardError(f"{p}: only LoRA adapters are supported (peft_type={cfg.get('peft_type')!r})")
    if not (p / "adapter_model.safetensors").is_file():
        raise GuardError(f"{p}: adapter_model.safetensors is missing")
    rank = int(cfg.get("r", 0))
    if rank <= 0:
        raise GuardError(f"{p}: LoRA rank r={cfg.get('r')!r} is not a positive integer")
    if max_rank is not None and rank > max_rank:
        raise GuardError(f"{p}: LoRA rank {rank} exceeds the configured maximum {max_rank}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    meta = read_json(p / GUARD_META, "guard.json") if (p / GUARD_META).is_file() else None
    return AdapterInfo(p, rank, float(cfg.get("lora_alpha", rank)), list(targets),
                       cfg.get("base_model_name_or_path"), meta)


def check_adapter_fits(info: AdapterInfo, model_config: Any, base_fingerprint: str | None = None) -> None:
    """Raise a one-line GuardError if the adapter's tensors cannot belong to this base model."""
    from safetensors import SafetensorError
    from safetensors.torch import safe_open
    import torch

    if base_fingerprint is not None and info.guard_meta is not None:
        check_fingerprint(f"adapter {info.path}", info.guard_meta.get("base_fingerprint"), base_fingerprint)
    get = model_config.get if isinstance(model_config, dict) else lambda k, d=None: getattr(model_config, k, d)
    hidden, inter = int(get("hidden_size")), int(get("intermediate_size"))
    heads, kv = int(get("num_attention_heads")), int(get("num_key_value_heads") or get("num_attention_heads"))
    head_dim = int(get("head_dim") or hidden // heads)
    layers = int(get("num_hidden_layers"))
    dims = {  # module -> (in, out)
        "q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv * head_dim), "v_proj": (hidden, kv * head_dim),
        "o_proj": (heads * head_dim, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }
    path = info.path / "adapter_model.safetensors"
    try:
        with safe_open(str(path), "pt") as f:
            keys = list(f.keys())
            if not keys:
                raise GuardError(f"{path}: holds no tensors")
            for key in keys:
                m = _LAYER.search(key)
                if m is None:
                    continue
                layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
                if layer >= layers:
                    raise GuardError(f"adapter {info.path} targets layer {layer}, the base model has {layers} layers")
                if module not in dims:
                    continue
                t = f.get_tensor(key)
                d_in, d_out = dims[module]
                want = (info.rank, d_in) if ab == "A" else (d_out, info.rank)
                if tuple(t.shape) != want:
                    raise GuardError(f"adapter {info.path} does not fit this base model: {key} has shape "
                                     f"{tuple(t.shape)}, expected {want}")
                if not torch.isfinite(t).all():
                    raise GuardError(f"adapter {info.path}: tensor {key} holds NaN or inf values")
    except SafetensorError as e:
        raise GuardError(f"{path}: unreadable ({e})") from None


def write_guard_meta(adapter_dir: Path, meta: dict[str, Any]) -> None:
    (adapter_dir / GUARD_META).write_text(json.dumps(meta, indent=2, sort_keys=True, allow_nan=False) + "\n")
