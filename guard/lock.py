"""SafetyLock vectors: the artifact format, its checks, and applying it to an HF model.

A lock is a set of attention heads (layer, head), each with a unit direction in its head_dim slice of the
o_proj input and a strength (α · std of the probe projections along it). Steering adds strength·direction
to the head's slice at every position. Because o_proj is linear, that equals adding W_o·d to o_proj's
output, where d is the layer's full displacement vector (zeros outside the selected heads): one folded
bias per layer. The artifact stores both the per-head form (what the probes found, readable) and the
folded per-layer biases (what serving adds), computed once from the aligned base's weights.

Training writes this file (`training/safetylock.py`), HF evaluation applies it (`LockHandle` below) and the
vLLM worker extension reads the very same file. `load_lock` is the one place that checks it.

**`apply_lock` mutates the model**: it attaches bias tensors to the o_proj layers while on; `off()` sets them
back to `None`, which restores the exact original forward (bit-identical logits), and `remove()` forgets
the preallocated buffers.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.artifacts import atomic_path, check_finite, check_fingerprint
from guard.errors import GuardError
from guard.models import ModelShape

if TYPE_CHECKING:
    import torch

LOCK_FORMAT = "safety-guard/safetylock"
# 2: an optional prompt gate (the conditional lock). Version-1 files have none and are rebuilt by `guard lock build`.
LOCK_FORMAT_VERSION = 2
_O_PROJ = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.o_proj$")


@dataclass(frozen=True)
class LockHead:
    layer: int
    head: int
    accuracy: float  # held-out accuracy of this head's safe-vs-unsafe probe
    strength: float  # α · std of the projections on the direction: the length of the shift


GATE_DEPTH = 0.6  # the default gate layer as a share of the model's depth: layer 18 of SmolLM2-135M's 30


def gate_layer_for(num_layers: int, configured: int | None) -> int:
    """The residual-stream layer the prompt gate reads: `lock.gate_layer`, or GATE_DEPTH of the way in.
    bench/lock_gate_dev.py rule v6 chose layer 18 of 30 with per-adapter calibration `quantile` and framed training
    data (gate data v6): of the candidates (layers 12, 15, 18; with and without framed copies), the only ones that
    kept development benign prompts in ordinary framings under 4% flagged, and the one of those that flags most
    framed harmful prompts on the worst development model. Before, rules v4/v5 chose layer 15 on prompts as written
    (and rules v2/v3 layer 3, rule v1 layer 6). Uncalibrated, later layers lose the harmful/benign split once an
    adapter has been trained to comply; calibrated, layer 18 flags 78-89% of every development model's dev harmful
    prompts at <= 1.2% of their dev benign ones."""
    layer = configured if configured is not None else max(1, round(GATE_DEPTH * num_layers))
    if not 0 < layer < num_layers:
        raise GuardError(f"lock.gate_layer {layer} is outside 1..{num_layers - 1}")
    return layer


@dataclass
class PromptGate:
    """The conditional lock's classifier: steer a request when its score passes the threshold.

    score = h · weight + bias, where h is the residual stream entering decoder layer `layer` at the request's
    last prompt token (HF `hidden_states[layer]`), read in float32; flagged when score > threshold. A flagged
    request is steered at layers >= `layer` only (`SafetyLock.from_layer`), from its prefill on, so the state the
    gate reads is never itself steered. Fitted by `training/lockgate.py`; HF calls `flags`, the vLLM worker
    computes the same expression inside the model graph (`serve/worker.py: gate_strengths`).
    """

    layer: int
    weight: torch.Tensor  # [hidden_size], float32
    bias: float
    threshold: float
    meta: dict[str, Any] = field(default_factory=dict)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """[N] scores of [N, hidden] states (any dtype, any device)."""
        return states.float() @ self.weight.to(states.device) + self.bias

    def flags(self, states: torch.Tensor) -> torch.Tensor:
        """[N] bool: which of these requests the lock steers."""
        return self.logits(states) > self.threshold

    def calibrated(self, dev_scores: torch.Tensor, how: str) -> PromptGate:
        """This gate with its threshold set for one adapter from that adapter's scores on the gate's dev slice.

        An adapter moves the residual stream the gate reads: one trained to comply can push every prompt towards
        "benign" (its harmful ones slip under the base's threshold) or, trained on harmful data only, everything
        towards "harmful" (its everyday prompts get flagged). The dev slice is benign, so how it moved says where
        the threshold belongs: `shift` moves the base's threshold by the change of the slice's mean score (the
        base's mean is stored at build as `dev_mean`); `quantile` sets it anew so that at most `max_fpr` of the
        slice is flagged; `none` keeps the base's.
        """
        import torch

        if how == "none":
            return self
        s = dev_scores.float()
        if how == "shift":
            if "dev_mean" not in self.meta:
                raise GuardError("this prompt gate predates calibration (no dev_mean): rebuild the lock "
                                 "(`guard lock build --rebuild`)")
            t = self.threshold + float(s.mean()) - float(self.meta["dev_mean"])
        elif how == "quantile":
            t = quantile_threshold(s, float(self.meta.get("max_fpr", 0.02)))
        else:
            raise GuardError(f"unknown gate calibration '{how}' (none, shift, quantile)")
        meta = {**self.meta, "calibration": how, "base_threshold": self.threshold,
                "calibrated_dev_fpr": round(float((s > t).float().mean()), 4)}
        return PromptGate(layer=self.layer, weight=self.weight, bias=self.bias, threshold=t, meta=meta)


def quantile_threshold(scores: torch.Tensor, max_fpr: float) -> float:
    """The smallest threshold that flags at most `max_fpr` of these (benign) scores (flag: score > t)."""
    import math

    s = sorted(scores.float().tolist(), reverse=True)
    allowed = math.floor(max_fpr * len(s))
    return float(s[allowed] if allowed < len(s) else s[-1] - 1.0)


def refusal_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids a flagged request is answered with under `lock.gate_action: refuse`, then end-of-sequence."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise GuardError("lock.refusal is empty")
    return [int(t) for t in ids] + [int(tokenizer.eos_token_id)]


def forcing_states(head: torch.Tensor, token_ids: list[int], margin: float = 40.0, steps: int = 500) -> torch.Tensor:
    """[len(token_ids), hidden] float32: for each token t, a final-norm state h whose logits head·h rank t first
    by at least `margin` (greedy picks it; at any sane temperature sampling does too). The vLLM worker writes
    these rows over a flagged request's sampled row to answer with a fixed refusal; checked here, not assumed."""
    import torch

    w = head.detach().float()
    out = []
    for t in token_ids:
        v = w[t].clone()
        gap = float("-inf")
        for _ in range(steps):
            logits = w @ v
            best = logits[t].item()
            logits[t] = float("-inf")
            j = int(logits.argmax())
            gap = best - logits[j].item()
            if gap >= margin:
                break
            d = w[t] - w[j]  # raise t's logit over its strongest rival's by the missing amount
            v = v + d * ((margin - gap) / d.pow(2).sum().clamp_min(1e-6))
        if gap < margin:
            raise GuardError(f"cannot make token {t} the sure first choice of this output head")
        out.append(v)
    return torch.stack(out)


@dataclass
class SafetyLock:
    """Per-head directions + strengths, and the per-layer o_proj biases they fold into."""

    heads: tuple[LockHead, ...]
    directions: torch.Tensor  # [len(heads), head_dim], unit rows, float32
    biases: torch.Tensor  # [num_layers, hidden_size], float32: W_o(layer) · displacement(layer)
    shape: ModelShape
    base_fingerprint: str
    alpha: float
    positions: tuple[int, ...] = (-1,)
    meta: dict[str, Any] = field(default_factory=dict)
    gate: PromptGate | None = None  # None: the lock can only steer unconditionally

    def displacement(self) -> torch.Tensor:
        """[num_layers, num_heads * head_dim]: the shift added to each layer's o_proj input."""
        return head_displacement(self.heads, self.directions, self.shape)

    @property
    def layers(self) -> list[int]:
        """Layers whose bias is not zero (the only ones steering touches)."""
        return sorted({h.layer for h in self.heads})

    def from_layer(self, first: int) -> SafetyLock:
        """The same lock steering only layers >= `first`: what the conditional lock applies to a flagged request
        (its gate reads the residual stream entering layer `first`, which steering must not have touched)."""
        keep = [i for i, h in enumerate(self.heads) if h.layer >= first]
        if not keep:
            raise GuardError(f"SafetyLock: no head at layer {first} or later; the conditional lock would steer nothing")
        biases = self.biases.clone()
        biases[:first] = 0
        return SafetyLock(tuple(self.heads[i] for i in keep), self.directions[keep], biases, self.shape,
                          self.base_fingerprint, self.alpha, self.positions, dict(self.meta), self.gate)

    def save(self, path: str | os.PathLike[str]) -> Path:
        from safetensors.torch import save_file

        validate(self)
        header = {
            **self.meta, "format": LOCK_FORMAT, "format_version": LOCK_FORMAT_VERSION,
            "base_fingerprint": self.base_fingerprint, "alpha": self.alpha, "positions": list(self.positions),
            "shape": asdict(self.shape), "heads": [asdict(h) for h in self.heads],
        }
        tensors = {"directions": self.directions.detach().float().contiguous().cpu(),
                   "biases": self.biases.detach().float().contiguous().cpu()}
        if self.gate is not None:
            g = self.gate
            header["gate"] = {"layer": g.layer, "bias": g.bias, "threshold": g.threshold, **g.meta}
            tensors["gate_weight"] = g.weight.detach().float().contiguous().cpu()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"guard": json.dumps(header, sort_keys=True)})
        return Path(path)


def head_displacement(heads: tuple[LockHead, ...] | list[LockHead], directions: torch.Tensor,
                      shape: ModelShape) -> torch.Tensor:
    """[num_layers, num_heads * head_dim]: strength · direction in each selected head's slice, zeros elsewhere."""
    import torch

    d = torch.zeros(shape.num_layers, shape.num_heads * shape.head_dim)
    for h, vec in zip(heads, directions):
        d[h.layer, h.head * shape.head_dim : (h.head + 1) * shape.head_dim] += h.strength * vec.float()
    return d


def fold_biases(heads: tuple[LockHead, ...] | list[LockHead], directions: torch.Tensor, shape: ModelShape,
                o_proj_weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """Per-layer biases W_o(layer) · d(layer) in float32; `o_proj_weights` maps layer -> [hidden, heads*head_dim]."""
    import torch

    disp = head_displacement(heads, directions, shape)
    biases = torch.zeros(shape.num_layers, shape.hidden_size)
    for layer in sorted({h.layer for h in heads}):
        if layer not in o_proj_weights:
            raise GuardError(f"SafetyLock: no o_proj weight for layer {layer}")
        w = o_proj_weights[layer].float()
        if tuple(w.shape) != (shape.hidden_size, shape.num_heads * shape.head_dim):
            raise GuardError(f"SafetyLock: o_proj of layer {layer} has shape {tuple(w.shape)}, expected "
                             f"{(shape.hidden_size, shape.num_heads * shape.head_dim)}")
        biases[layer] = w @ disp[layer]
    return biases


def validate(lock: SafetyLock, shape: ModelShape | None = None, where: str = "SafetyLock") -> None:
    """Every way a lock can be wrong, as one line: shapes, head indices, finiteness, fit to a model."""
    s = lock.shape
    if shape is not None:
        for name in ("num_layers", "hidden_size", "num_heads", "head_dim"):
            if getattr(s, name) != getattr(shape, name):
                raise GuardError(f"{where}: built for a model with {name}={getattr(s, name)}, "
                                 f"this model has {name}={getattr(shape, name)}")
    n = len(lock.heads)
    if n == 0:
        raise GuardError(f"{where}: selects no heads")
    if tuple(lock.directions.shape) != (n, s.head_dim):
        raise GuardError(f"{where}: directions have shape {tuple(lock.directions.shape)}, expected {(n, s.head_dim)}")
    if tuple(lock.biases.shape) != (s.num_layers, s.hidden_size):
        raise GuardError(f"{where}: biases have shape {tuple(lock.biases.shape)}, "
                         f"expected {(s.num_layers, s.hidden_size)}")
    seen = set()
    for h in lock.heads:
        if not (0 <= h.layer < s.num_layers and 0 <= h.head < s.num_heads):
            raise GuardError(f"{where}: head ({h.layer}, {h.head}) is outside {s.num_layers} layers x {s.num_heads} heads")
        if (h.layer, h.head) in seen:
            raise GuardError(f"{where}: head ({h.layer}, {h.head}) is listed twice")
        seen.add((h.layer, h.head))
    check_finite(where, {"directions": lock.directions, "biases": lock.biases,
                         **{f"strength[{i}]": float(h.strength) for i, h in enumerate(lock.heads)}})
    g = lock.gate
    if g is not None:
        if not 0 < g.layer < s.num_layers:
            raise GuardError(f"{where}: the prompt gate reads layer {g.layer}, outside 1..{s.num_layers - 1}")
        if tuple(g.weight.shape) != (s.hidden_size,):
            raise GuardError(f"{where}: gate weight has shape {tuple(g.weight.shape)}, expected {(s.hidden_size,)}")
        check_finite(where, {"gate_weight": g.weight, "gate bias": float(g.bias), "gate threshold": float(g.threshold)})


def load_lock(path: str | os.PathLike[str], shape: ModelShape | None = None,
              base_fingerprint: str | None = None) -> SafetyLock:
    """Load a lock file and check it against the model it is about to steer (shape, fingerprint)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise GuardError(f"SafetyLock file not found: {p}")
    try:
        with safe_open(str(p), "pt") as f:
            header = json.loads((f.metadata() or {}).get("guard", "{}"))
            missing = {"directions", "biases"} - set(f.keys())
            if missing:
                raise GuardError(f"{p}: not a SafetyLock file (missing tensors: {', '.join(sorted(missing))})")
            directions, biases = f.get_tensor("directions"), f.get_tensor("biases")
            gate_weight = f.get_tensor("gate_weight") if "gate_weight" in f.keys() else None
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise GuardError(f"{p}: unreadable SafetyLock file ({e})") from None
    if header.get("format") != LOCK_FORMAT:
        raise GuardError(f"{p}: not a SafetyLock file (format {header.get('format')!r})")
    if header.get("format_version") != LOCK_FORMAT_VERSION:
        raise GuardError(f"{p}: lock format version {header.get('format_version')} is not the supported "
                         f"{LOCK_FORMAT_VERSION}; rebuild it with `guard lock build --rebuild`")
    try:
        gate_header = header.pop("gate", None)
        gate = None
        if gate_header is not None or gate_weight is not None:
            if gate_header is None or gate_weight is None:
                raise GuardError(f"{p}: the prompt gate is incomplete (header and weight must both be present)")
            gate = PromptGate(layer=int(gate_header.pop("layer")), weight=gate_weight.to(torch.float32),
                              bias=float(gate_header.pop("bias")), threshold=float(gate_header.pop("threshold")),
                              meta=gate_header)
        lock = SafetyLock(
            heads=tuple(LockHead(**h) for h in header.pop("heads")),
            directions=directions.to(torch.float32), biases=biases.to(torch.float32),
            shape=ModelShape(**header.pop("shape")), base_fingerprint=str(header.pop("base_fingerprint")),
            alpha=float(header.pop("alpha")), positions=tuple(header.pop("positions", (-1,))),
            meta={k: v for k, v in header.items() if k not in ("format", "format_version")}, gate=gate,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise GuardError(f"{p}: malformed SafetyLock metadata ({e})") from None
    validate(lock, shape, str(p))
    if base_fingerprint is not None:
        check_fingerprint(f"SafetyLock {p}", lock.base_fingerprint, base_fingerprint)
    return lock


def o_proj_layers(model: Any) -> dict[int, Any]:
    """layer index -> the plain linear o_proj of an HF (or peft-wrapped) Llama-family model."""
    out = {}
    for name, module in model.named_modules():
        m = _O_PROJ.search(name)
        if m is not None:
            out[int(m.group(1))] = getattr(module, "base_layer", module)  # peft LoRA wraps the linear
    if not out:
        raise GuardError(f"{type(model).__name__} has no layers.N.self_attn.o_proj modules (not a Llama-family model)")
    return out


MAX_STRENGTH = 10.0  # x the built strength; far past where every answer is a refusal


def check_strength(strength: Any) -> float:
    """The one validation of a lock strength (HF handle, lock table, worker RPC): finite, 0 <= s <= MAX_STRENGTH."""
    import math

    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise GuardError(f"lock strength must be a finite number, got {strength!r}")
    if not 0 <= strength <= MAX_STRENGTH:
        raise GuardError(f"lock strength must be within [0, {MAX_STRENGTH:g}], got {strength}")
    return float(strength)


class LockHandle:
    """The lock installed on one HF model: on / off / strength without allocating.

    The bias buffers are allocated once; `on()` attaches them to the o_proj layers, `off()` detaches them
    (o_proj has no bias of its own, so `None` is the exact original forward), `set_strength(s)` rescales
    them in place (s=1 is the strength the lock was built with).
    """

    def __init__(self, model: Any, lock: SafetyLock) -> None:
        import torch

        self._layers = o_proj_layers(model)
        validate(lock, ModelShape.from_config(model.config))
        for i in lock.layers:
            if getattr(self._layers[i], "bias", None) is not None:
                raise GuardError(f"o_proj of layer {i} already has a bias; SafetyLock expects a bias-free o_proj")
        ref = next(iter(self._layers.values())).weight
        self.lock = lock
        self._base = {i: lock.biases[i].to(ref.dtype).to(ref.device) for i in lock.layers}
        self._buf = {i: torch.nn.Parameter(b.clone(), requires_grad=False) for i, b in self._base.items()}
        self.strength = 1.0
        self.enabled = False

    def on(self) -> None:
        for i, p in self._buf.items():
            self._layers[i].bias = p
        self.enabled = True

    def off(self) -> None:
        for i in self._buf:
            self._layers[i].bias = None
        self.enabled = False

    def set_strength(self, strength: float) -> None:
        import torch

        strength = check_strength(strength)
        with torch.no_grad():
            for i, p in self._buf.items():
                p.copy_(self._base[i]).mul_(strength)
        self.strength = strength

    def remove(self) -> None:
        self.off()
        self._buf.clear()

    def __enter__(self) -> LockHandle:
        self.on()
        return self

    def __exit__(self, *exc: object) -> None:
        self.off()


def apply_lock(model: Any, lock: SafetyLock, strength: float = 1.0) -> LockHandle:
    """Install `lock` on `model` (turned on). **Mutates the model**; `handle.off()` restores it exactly."""
    handle = LockHandle(model, lock)
    if strength != 1.0:
        handle.set_strength(strength)
    handle.on()
    return handle


def lock_path(home: Path, base_fingerprint: str) -> Path:
    """Where `guard prepare` / `guard lock build` keep the lock of a base model."""
    return home / "locks" / f"{base_fingerprint[:16]}.safetensors"
