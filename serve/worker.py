"""Worker extension: SafetyLock as o_proj biases, per-adapter steering, and anchor-state capture for probes.

Mixed into vLLM's worker with `--worker-extension-cls serve.worker.GuardWorkerExtension`; the API server
calls the `guard_*` methods with `engine_client.collective_rpc(...)`. RPCs run between engine steps, so a
change lands on the next forward of in-flight requests. All state lives in one lazy `self._guard_state`.

How the lock is added (one of three modes, chosen after every change):
- `off`: every o_proj's `bias` is `None` and no hook is registered: vLLM's exact original forward.
- `bias`: every request is steered with one strength: the preallocated bias parameters are attached as
  `o_proj.bias`, so the layer's own GEMM adds them (RowParallelLinear adds its bias on TP rank 0 only,
  before the all-reduce). Costs one vector add per locked layer.
- `mask`: only some requests are steered (per-adapter policy, per-adapter strengths, or a probe in flight
  that must see the unsteered model): a pre-forward hook builds a per-token strength column from the
  input batch (request -> LoRA id is `input_batch.request_lora_mapping`, request -> tokens is the attention
  metadata's `query_start_loc`, exactly how vLLM builds its own token-to-adapter mapping) and a forward
  hook on each locked o_proj adds `strength[t] * unit_bias` to its output. The output is already reduced
  across TP ranks there, so every rank adds it.

Probe capture: while a probe prefix is armed, a forward hook on the final norm keeps the row of the last
prompt token of every request whose id starts with the prefix (the lm_head input h(x), DESIGN §3).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

BASE_LORA_ID = 0  # vLLM's LoRA id for requests without an adapter


@dataclass
class _GuardState:
    model: Any
    layers: dict[int, Any]  # layer -> o_proj module as called by the model (LoRA wrapper or plain)
    linears: dict[int, Any]  # layer -> the RowParallelLinear that owns `.bias`
    dtype: Any
    lock_path: str | None = None
    lock_info: dict[str, Any] = field(default_factory=dict)
    unit: dict[int, Any] = field(default_factory=dict)  # strength-1 bias per locked layer (model dtype)
    params: dict[int, Any] = field(default_factory=dict)  # preallocated bias parameters
    param_scale: float = 1.0  # what `params` currently hold, as a multiple of `unit`
    default: float = 0.0  # strength for requests without an override (0 = not steered)
    overrides: dict[int, float] = field(default_factory=dict)  # lora id (0 = base) -> strength
    mode: str = "off"
    hooks: list[Any] = field(default_factory=list)
    mask: Any = None  # [tokens, 1] strengths of the current forward (mask mode)
    probe_prefixes: set[str] = field(default_factory=set)
    captured: dict[str, list[float]] = field(default_factory=dict)
    norm_hook: Any = None
    mask_builds: int = 0
    mask_tokens: float = 0.0  # steered tokens in the last mask built (diagnostics)
    last_change_ms: float = 0.0


def _unwrap(module: Any) -> Any:
    return getattr(module, "base_layer", module)


def _attn_metadata() -> Any:
    """The current forward's attention metadata (a per-layer dict on CPU), or None outside a forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if isinstance(md, dict):
        md = next(iter(md.values()), None)
    if isinstance(md, list):  # micro-batched runs keep a list of dicts
        md = md[0] if md else None
        if isinstance(md, dict):
            md = next(iter(md.values()), None)
    return md


class GuardWorkerExtension:
    """`guard_*` RPCs for the vLLM worker (collective_rpc). Keeps state in `self._guard_state`."""

    # -- state ---------------------------------------------------------------------------------------
    def _guard(self) -> _GuardState:
        st = getattr(self, "_guard_state", None)
        if st is None:
            import torch

            model = self.model_runner.get_model()
            decoder = getattr(model, "model", None)  # LlamaModel
            layers_mod = getattr(decoder, "layers", None)
            if layers_mod is None:
                raise RuntimeError(f"{type(model).__name__} has no model.layers: not a Llama-family model")
            layers, linears = {}, {}
            for i, layer in enumerate(layers_mod):
                attn = getattr(layer, "self_attn", None)
                o_proj = getattr(attn, "o_proj", None) if attn is not None else None
                if o_proj is not None:
                    layers[i] = o_proj
                    linears[i] = _unwrap(o_proj)
            if not layers:
                raise RuntimeError("no layers.N.self_attn.o_proj modules found")
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            st = _GuardState(model=model, layers=layers, linears=linears, dtype=dtype)
            self._guard_state = st
        return st

    def _guard_shape(self) -> Any:
        from guard.models import ModelShape

        return ModelShape.from_config(self.model_runner.vllm_config.model_config.hf_config)

    def guard_ping(self) -> dict[str, Any]:
        """What this worker is: rank, TP size, dtype, LoRA on/off, model shape."""
        st = self._guard()
        lin = next(iter(st.linears.values()))
        return {"rank": int(getattr(self, "rank", 0)), "tp_rank": int(getattr(lin, "tp_rank", 0)),
                "tp_size": int(getattr(lin, "tp_size", 1)), "dtype": str(st.dtype).removeprefix("torch."),
                "lora": bool(getattr(self.model_runner, "lora_config", None)),
                "layers": len(st.layers), "shape": vars(self._guard_shape())}

    # -- lock ----------------------------------------------------------------------------------------
    def guard_install_lock(self, path: str, base_fingerprint: str | None = None) -> dict[str, Any]:
        """Load a lock file (checked against this model's shape and fingerprint) into preallocated biases.

        Returns {"ok": True, ...} or {"ok": False, "error": one line}; a bad file leaves the previous lock.
        """
        import torch

        from guard.errors import GuardError
        from guard.lock import load_lock

        st = self._guard()
        try:
            lock = load_lock(path, self._guard_shape(), base_fingerprint)
        except GuardError as e:
            return {"ok": False, "error": str(e)}
        missing = [i for i in lock.layers if i not in st.linears]
        if missing:
            return {"ok": False, "error": f"lock steers layers {missing} this worker does not hold"}
        for i in lock.layers:
            if st.linears[i].bias is not None and st.linears[i].bias is not st.params.get(i):
                return {"ok": False, "error": f"o_proj of layer {i} has its own bias; SafetyLock expects none"}
        self._guard_detach()
        device = next(st.model.parameters()).device
        st.unit = {i: lock.biases[i].to(device=device, dtype=st.dtype).contiguous() for i in lock.layers}
        st.params = {i: torch.nn.Parameter(b.clone(), requires_grad=False) for i, b in st.unit.items()}
        st.param_scale = 1.0
        st.lock_path = str(path)
        st.lock_info = {"path": str(path), "layers": lock.layers, "heads": len(lock.heads), "alpha": lock.alpha,
                        "base_fingerprint": lock.base_fingerprint,
                        "bias_norm": float(lock.biases.norm(dim=-1).max())}
        self._guard_apply()
        return {"ok": True, **st.lock_info, "mode": st.mode}

    def guard_set_lock(self, default: float, overrides: dict[int, float] | None = None) -> dict[str, Any]:
        """Steering strengths: `default` for every request, `overrides` per LoRA id (0 = base); 0 = off."""
        st = self._guard()
        t0 = time.perf_counter()
        vals = [default, *(overrides or {}).values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in vals):
            return {"ok": False, "error": f"strengths must be finite and >= 0, got {vals}"}
        st.default = float(default)
        st.overrides = {int(k): float(v) for k, v in (overrides or {}).items()}
        self._guard_apply()
        st.last_change_ms = (time.perf_counter() - t0) * 1e3
        return {"ok": True, **self.guard_lock_state()}

    def guard_lock_state(self) -> dict[str, Any]:
        st = self._guard()
        return {"mode": st.mode, "installed": bool(st.unit), "default": st.default,
                "overrides": {str(k): v for k, v in st.overrides.items()}, "lock": st.lock_info,
                "probes_armed": len(st.probe_prefixes), "last_change_ms": round(st.last_change_ms, 3),
                "mask_builds": st.mask_builds, "last_mask_steered_tokens": st.mask_tokens}

    def guard_remove_lock(self) -> dict[str, Any]:
        st = self._guard()
        self._guard_detach()
        st.unit, st.params, st.lock_info, st.lock_path = {}, {}, {}, None
        self._guard_apply()
        return {"ok": True}

    def _guard_wanted_mode(self, st: _GuardState) -> str:
        if not st.unit:
            return "off"
        strengths = {st.default, *st.overrides.values()}
        if strengths == {0.0}:
            return "off"
        if len(strengths) == 1 and not st.probe_prefixes:
            return "bias"
        return "mask"

    def _guard_detach(self) -> None:
        st = self._guard()
        for h in st.hooks:
            h.remove()
        st.hooks.clear()
        st.mask = None
        for i in st.params:
            st.linears[i].bias = None

    def _guard_scale_params(self, scale: float) -> None:
        import torch

        st = self._guard()
        if scale == st.param_scale:
            return
        with torch.no_grad():
            for i, p in st.params.items():
                p.copy_(st.unit[i]).mul_(scale)
        st.param_scale = scale

    def _guard_apply(self) -> None:
        st = self._guard()
        want = self._guard_wanted_mode(st)
        if want == "bias":
            if st.mode != "bias":
                self._guard_detach()
            self._guard_scale_params(st.default)
            for i, p in st.params.items():
                st.linears[i].bias = p
        elif want == "mask":
            if st.mode != "mask":
                self._guard_detach()
                self._guard_scale_params(1.0)
                # LlamaModel's __call__ is replaced by vLLM's compile wrapper (its hooks never fire), so
                # the mask is built in a pre-hook of the first decoder layer, once per forward.
                first = st.model.model.layers[min(st.layers)]
                st.hooks.append(first.register_forward_pre_hook(self._guard_build_mask, with_kwargs=True))
                for i in st.params:
                    st.hooks.append(st.layers[i].register_forward_hook(self._guard_make_add(i)))
        else:
            self._guard_detach()
        st.mode = want

    def _guard_token_strengths(self, num_tokens: int) -> Any:
        """[num_tokens, 1] strength per token of this forward, from the input batch (mask mode)."""
        import numpy as np
        import torch

        st = self._guard()
        md = _attn_metadata()
        batch = self.model_runner.input_batch
        strengths = np.zeros(num_tokens, dtype=np.float32)
        qsl = getattr(md, "query_start_loc", None)
        if qsl is not None:
            n = batch.num_reqs
            loc = qsl[: n + 1].tolist()
            req_ids = batch.req_ids
            lora_ids = batch.request_lora_mapping[:n]
            for r in range(n):
                rid = req_ids[r]
                if rid is None or any(rid.startswith(p) for p in st.probe_prefixes):
                    continue  # probes measure the adapter itself, never the steered model
                s = st.overrides.get(int(lora_ids[r]), st.default)
                if s:
                    strengths[loc[r]: min(loc[r + 1], num_tokens)] = s
        st.mask_builds += 1
        st.mask_tokens = float((strengths > 0).sum())
        return torch.from_numpy(strengths).to(st.dtype).unsqueeze(1)

    def _guard_build_mask(self, module: Any, args: tuple, kwargs: dict | None = None) -> None:
        st = self._guard()
        # LlamaDecoderLayer.forward(positions, hidden_states, residual)
        kwargs = kwargs or {}
        hidden = args[1] if len(args) > 1 else kwargs.get("hidden_states")
        positions = args[0] if args else kwargs.get("positions")
        n = hidden.shape[0] if hidden is not None else positions.shape[-1]
        st.mask = self._guard_token_strengths(int(n))

    def _guard_make_add(self, layer: int):
        st = self._guard()

        def add(module: Any, args: tuple, output: Any) -> Any:
            if st.mask is None:
                return None
            out = output[0] if isinstance(output, tuple) else output
            t = out.shape[0]
            m = st.mask[:t] if st.mask.shape[0] >= t else None
            if m is None:
                return None
            out.addcmul_(m, st.unit[layer])
            return None

        return add

    # -- probes --------------------------------------------------------------------------------------
    def guard_probe_arm(self, prefix: str) -> dict[str, Any]:
        """Start capturing h(x) of requests whose id starts with `prefix` (and keep them unsteered)."""
        st = self._guard()
        st.probe_prefixes.add(prefix)
        if st.norm_hook is None:
            st.norm_hook = st.model.model.norm.register_forward_hook(self._guard_capture)
        self._guard_apply()
        return {"ok": True, "mode": st.mode}

    def guard_probe_collect(self, prefix: str) -> dict[str, list[float]]:
        """Stop capturing for `prefix`; return {engine request id: h(x) as a list of floats}."""
        st = self._guard()
        st.probe_prefixes.discard(prefix)
        out = {k: v for k, v in st.captured.items() if k.startswith(prefix)}
        for k in out:
            del st.captured[k]
        if not st.probe_prefixes:
            if st.norm_hook is not None:
                st.norm_hook.remove()
                st.norm_hook = None
            st.captured.clear()
        self._guard_apply()
        return out

    def _guard_capture(self, module: Any, args: tuple, output: Any) -> None:
        st = self._guard()
        if not st.probe_prefixes:
            return
        md = _attn_metadata()
        qsl = getattr(md, "query_start_loc", None)
        if qsl is None:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        batch = self.model_runner.input_batch
        n = batch.num_reqs
        loc = qsl[: n + 1].tolist()
        for r, rid in enumerate(batch.req_ids[:n]):
            if rid is None or not any(rid.startswith(p) for p in st.probe_prefixes):
                continue
            scheduled = loc[r + 1] - loc[r]
            done = int(batch.num_computed_tokens_cpu[r]) + scheduled
            if done != int(batch.num_prompt_tokens[r]) or scheduled <= 0:
                continue  # not the chunk holding the last prompt token
            st.captured[rid] = hidden[loc[r + 1] - 1].float().cpu().tolist()
