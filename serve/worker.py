"""The guard inside vLLM's worker: SafetyLock steering that lives in the model graph, and probe capture.

**Why buffers, not a bias attached later.** vLLM compiles the model (torch.compile) and on GPUs replays CUDA
graphs. A graph captured before the lock was attached never sees an `o_proj.bias` set afterwards and never runs
Python hooks, so a lock built that way silently does nothing in vLLM's default mode. Instead, when the model is
loaded and before anything is compiled or captured (`serve.patches` wraps the runner's `load_model`), every
`self_attn.o_proj` gets two persistent buffers and a forward that adds them:

    out = o_proj(x) + strength[:tokens] * unit          (one fused multiply-add per layer)

`unit` is the layer's strength-1 SafetyLock bias (zero for layers the lock does not steer) and `strength` is one
per-token column shared by all layers, sized to the most tokens a forward can hold. Lock on/off/strength and
per-adapter policies are in-place writes into these tensors (the way vLLM's punica wrapper keeps its persistent
token-to-adapter buffers); nothing is re-attached, and the hot path has no hooks. A zero strength adds exactly
zero, so "off" is greedy-identical to an unguarded engine. The add happens after the layer returns (after the
tensor-parallel all-reduce), so every TP rank adds the full bias, and it never passes a bias into the GEMM: the
packed bf16 kernels on CPUs with avx512_bf16 require a float32 bias and took the engine down when given a bf16 one.

Strength per token, three modes chosen after every change:
- `off`: the buffer holds zeros; nothing happens per step.
- `bias`: every request steered with one strength: the buffer is filled once; nothing happens per step.
- `mask`: requests differ (per-adapter strengths, or a probe in flight that must see the unsteered adapter):
  before each forward the runner's `_model_forward` wrapper writes each request's strength over its tokens,
  from vLLM's own batch layout (`query_start_loc`) and request -> LoRA id map (`input_batch.request_lora_mapping`).

Conditional lock (`lock_policy: conditional`), decided inside the graph: the decoder layer L the prompt gate
reads (`lock.gate_layer`) gets a forward that, before the layer runs, scores the residual stream entering it
(guard.lock.PromptGate: h·w + b > t, in float32) and writes the strengths of layers >= L for this forward:
    hi_eff[i] = hi[i] * (score[last[i]] > t[i]   if last[i] >= 0   else keep[i])
(per token i; `t[i]` is the threshold of token i's adapter: the gate's own, or the one the service calibrated on
that adapter, `lock.gate_calibration`). `last[i]` points a token at its request's last prompt token when that request is being decided in this forward
(its whole prefill is then steered at layers >= L, the first answer token included); `keep[t]` carries the
decision of earlier forwards (1: flagged, or not gated at all). Layers < L read `strength` (0 for gated requests),
so the state the gate reads is never steered and HF reproduces the decision from an unsteered pass. After the
forward the worker reads hi_eff at each decided request's last token to keep its flag for the decode steps.
A request whose id carries `FORCE_MARK` (the API server sets it for `"guard": {"lock": "on"}`) is steered at
every layer from its prefill on, under every policy.

Probe capture reads the model's output (the final-norm rows fed to lm_head) after each forward, so it works in
eager and compiled mode alike; with a gate installed it also reads the gate's score at a probe request's last
prompt token (every token's score is kept in the gate layer's `score` buffer): what calibration is made of.

**Never crash the engine.** Every RPC catches its own failures, leaves the previous state in place and answers
`{"ok": False, "error": ...}`; the per-step code is wrapped the same way and, when it fails, steers every token with
the largest configured strength (fail closed) and counts the error. A new lock is first run through each steered
layer's own kernel on a one-row input in the engine's real dtype and layout, and refused if anything fails.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("safety_guard.worker")

BASE_LORA_ID = 0  # vLLM's LoRA id for requests without an adapter
RUNTIME_ATTR = "_safety_guard"  # the GuardRuntime on the model runner
FORCE_MARK = "sg-lock-on-"  # in a request id: steer this request whatever the policy (it can only add steering)
# at the end of an internal request id, then the LoRA id: an adapter request whose gate reads the base's states
# (lock.gate_reads: base). The scheduler admits it without its adapter; the gate decides on its prefill; an
# unflagged one restarts with its adapter, a flagged one is answered without it (serve/patches.py, section 6)
BASE_READ_MARK = "-sg-base-read-"


def base_read_lora(req_id: str) -> int | None:
    """The LoRA id a base-read request belongs to, None for any other request."""
    head, sep, tail = req_id.rpartition(BASE_READ_MARK)
    return int(tail) if sep and tail.isdigit() else None
UNIT_BUFFER = "safety_guard_unit"
STRENGTH_BUFFER = "safety_guard_strength"


# -- the graph part: a guarded o_proj ---------------------------------------------------------------------
def steer(out: Any, strength: Any, unit: Any) -> Any:
    """out + strength[:tokens] * unit, in out's dtype. The one place the lock reaches vLLM's model."""
    import torch

    s = strength[: out.shape[0]]
    if out.dtype == unit.dtype:
        return torch.addcmul(out, s, unit)
    return out + (s * unit).to(out.dtype)


_GUARDED_CLASSES: dict[type, type] = {}


def _guarded_class(cls: type) -> type:
    """A subclass of the o_proj's class whose forward adds the lock buffers (cached per class).

    Swapping `__class__` keeps the module object, its name, its LoRA wiring and isinstance checks unchanged;
    torch.compile traces the subclass's forward like any module's.
    """
    if cls in _GUARDED_CLASSES:
        return _GUARDED_CLASSES[cls]
    if getattr(cls, "_safety_guarded", False):
        return cls

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = super(guarded, self).forward(*args, **kwargs)
        strength, unit = getattr(self, STRENGTH_BUFFER), getattr(self, UNIT_BUFFER)
        if isinstance(out, tuple):  # vLLM's linear layers return (output, output_bias)
            return (steer(out[0], strength, unit), *out[1:])
        return steer(out, strength, unit)

    guarded = type(f"SafetyGuarded{cls.__name__}", (cls,), {"forward": forward, "_safety_guarded": True})
    _GUARDED_CLASSES[cls] = guarded
    return guarded


def _base_linear(module: Any) -> Any:
    return getattr(module, "base_layer", module)  # LoRA wrappers keep the dense layer as base_layer


def _raw_model(runner: Any) -> Any:
    model = runner.get_model()
    while not hasattr(model, "model") and hasattr(model, "unwrap"):
        model = model.unwrap()
    return model


def _max_tokens(runner: Any) -> int:
    """Most tokens one forward can hold (scheduler budget, CUDA-graph padding), with a margin."""
    cfg = runner.vllm_config
    sizes = [int(getattr(runner, "max_num_tokens", 0) or 0),
             int(getattr(cfg.scheduler_config, "max_num_batched_tokens", 0) or 0),
             int(getattr(cfg.scheduler_config, "max_num_seqs", 0) or 0),
             int(getattr(cfg.compilation_config, "max_cudagraph_capture_size", 0) or 0)]
    return max(sizes) + 64


def _kernel_row(layer: Any, dtype: Any) -> Any:
    """One row through the layer's own dense kernel (as the engine packed it), for dtype and health checks."""
    import torch

    base = _base_linear(layer)
    width = int(getattr(base, "input_size_per_partition", 0) or base.input_size)
    device = next((p.device for p in base.parameters()), torch.device("cpu"))
    x = torch.zeros(1, width, dtype=dtype, device=device)
    return base.quant_method.apply(base, x, None)


# -- per-runner state -------------------------------------------------------------------------------------
@dataclass
class GuardRuntime:
    """Everything the guard keeps in one worker. Created once at model load by `install`."""

    runner: Any
    layers: dict[int, Any]  # layer index -> guarded o_proj module (LoRA wrapper or plain)
    units: dict[int, Any]  # layer index -> that module's unit buffer
    strength: Any  # [max_tokens, 1] shared by all layers
    dtype: Any  # activation dtype, read off the kernel's own output
    compiled: bool
    lock_info: dict[str, Any] = field(default_factory=dict)
    default: float = 0.0  # strength for requests without an override (0 = not steered)
    overrides: dict[int, float] = field(default_factory=dict)  # lora id (0 = base) -> strength
    gated_default: bool = False  # conditional policy: requests not in `ungated` are steered only when flagged
    ungated: set[int] = field(default_factory=set)  # lora ids steered unconditionally (forced, explicit)
    force_strength: float = 0.0  # strength for FORCE_MARK requests (0: no lock installed)
    gate_layer: int | None = None  # the decoder layer whose input the gate reads (None: no conditional lock here)
    gate_bufs: dict[str, Any] = field(default_factory=dict)  # hi, hi_eff, last, keep, w, b, t, score (module doc)
    gate: Any = None  # guard.lock.PromptGate, when the installed lock has one for gate_layer
    thresholds: dict[int, float] = field(default_factory=dict)  # lora id -> its calibrated gate threshold
    captured_gate: dict[str, float] = field(default_factory=dict)  # probe request id -> gate score, last prompt token
    deciding: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> (lora id, its last row) now
    refusal: Any = None  # [n, hidden] final-norm rows that force the refusal's tokens (gate_action refuse), or None
    fallback: bool = False  # gate_action fallback: a flagged adapter request restarts on the base model
    fallback_pending: dict[str, int] = field(default_factory=dict)  # flagged id -> lora id, until the scheduler restarts it
    fell_back: set[str] = field(default_factory=set)  # ids restarted without their adapter (served as the base)
    fallbacks: dict[int, int] = field(default_factory=dict)  # lora id -> requests restarted on the base
    scoring: set[str] = field(default_factory=set)  # base-read requests decided in this forward
    restore_pending: dict[str, int] = field(default_factory=dict)  # base-read id, unflagged -> its lora id, until restarted
    restored: dict[int, int] = field(default_factory=dict)  # lora id -> base-read requests restarted with their adapter
    forced_pos: dict[str, int] = field(default_factory=dict)  # flagged request id -> refusal tokens forced so far
    flags: dict[str, bool] = field(default_factory=dict)  # request id -> the gate's decision
    scored: dict[int, int] = field(default_factory=dict)  # lora id -> requests the gate scored
    flagged: dict[int, int] = field(default_factory=dict)  # lora id -> requests the gate flagged
    judge_tokens: int = 24  # answer tokens of a flagged request the refusal judge reads (drift.probe_tokens)
    to_judge: dict[str, tuple[int, list[int]]] = field(default_factory=dict)  # flagged id -> (lora id, tokens so far)
    judged: dict[int, int] = field(default_factory=dict)  # lora id -> flagged requests judged
    answered: dict[int, int] = field(default_factory=dict)  # lora id -> ... that the judge did not count as refusals
    tokenizer: Any = None  # for the flagged-answer judge (False: could not be loaded)
    mode: str = "off"
    filled: float | None = 0.0  # the value the whole buffer holds (None while mask mode writes it per step)
    probe_prefixes: set[str] = field(default_factory=set)
    captured: dict[str, list[float]] = field(default_factory=dict)
    mask_builds: int = 0
    mask_tokens: float = 0.0
    step_errors: int = 0
    rpc_errors: int = 0
    last_error: str | None = None
    last_change_ms: float = 0.0

    @property
    def installed(self) -> bool:
        return bool(self.lock_info)

    # -- modes ---------------------------------------------------------------------------------------
    def wanted_mode(self) -> str:
        if not self.installed:
            return "off"
        strengths = {self.default, *self.overrides.values()}
        if strengths == {0.0}:
            return "off"
        if self.gating:
            return "mask"
        if len(strengths) == 1 and not self.probe_prefixes:
            return "bias"
        return "mask"

    @property
    def gating(self) -> bool:
        """Some request may be steered only when the gate flags it."""
        return self.gated_default and self.gate is not None and self.installed

    def gated(self, lora_id: int) -> bool:
        return self.gating and lora_id not in self.ungated

    def apply(self) -> None:
        """Bring the strength buffer in line with the wanted mode (an in-place fill, or nothing)."""
        mode = self.wanted_mode()
        if mode in ("off", "bias"):
            value = self.default if mode == "bias" else 0.0
            if self.filled != value:
                self._fill(value)
                self.filled = value
        else:
            self.filled = None
        self.mode = mode

    def fail_closed(self) -> None:
        """After a per-step failure: steer every token with the largest configured strength."""
        value = max([self.default, *self.overrides.values()]) if self.installed else 0.0
        self._fill(value)
        self.filled = value if self.mode != "mask" else None

    def _fill(self, value: float) -> None:
        """Every token, every layer, one strength (no gating): the off / bias modes and fail-closed."""
        self.strength.fill_(value)
        if self.gate_bufs:
            self.gate_bufs["hi"].fill_(value)
            self.gate_bufs["keep"].fill_(1.0)
            self.gate_bufs["last"].fill_(-1)

    def step_failed(self, where: str, exc: BaseException) -> None:
        """A per-step guard action failed and was contained: counted (step_errors) and logged."""
        self.step_errors += 1
        self.note_error(where, exc)

    def note_error(self, where: str, exc: BaseException) -> str:
        msg = f"{where}: {type(exc).__name__}: {exc}"
        self.last_error = msg
        log.error("safety-guard worker %s", msg)
        return msg

    # -- per step (called by serve.patches around the runner's _model_forward) -------------------------
    def _layout(self) -> tuple[list[str | None], list[int], Any]:
        batch = self.runner.input_batch
        n = int(batch.num_reqs)
        qsl = getattr(self.runner, "query_start_loc", None)
        loc = qsl.np[: n + 1].tolist() if qsl is not None and hasattr(qsl, "np") else None
        if loc is None:
            from vllm.forward_context import get_forward_context

            md = get_forward_context().attn_metadata
            md = next(iter(md.values())) if isinstance(md, dict) else md
            loc = md.query_start_loc[: n + 1].tolist()
        return list(batch.req_ids[:n]), loc, batch

    def before_forward(self, num_tokens: int) -> None:
        """Per-token strengths for this step (mask mode, or a FORCE_MARK request in the batch)."""
        if not self.installed:
            return
        req_ids = self.runner.input_batch.req_ids[: int(self.runner.input_batch.num_reqs)]
        forced = self.force_strength > 0 and any(rid is not None and FORCE_MARK in rid for rid in req_ids)
        if not self.gating:
            self.release_base_reads(req_ids)
        if self.mode != "mask" and not forced:
            if self.filled is None:  # a forced request left a per-token mask behind: back to the mode's fill
                self.apply()
            return
        import numpy as np
        import torch

        req_ids, loc, batch = self._layout()
        n = min(num_tokens, self.strength.shape[0])
        lo = np.zeros(n, dtype=np.float32)  # layers < gate layer (all layers when there is no gate)
        hi = np.zeros(n, dtype=np.float32)  # layers >= gate layer, before the gate
        keep = np.ones(n, dtype=np.float32)
        last = np.full(n, -1, dtype=np.int64)
        base_t = float(self.gate.threshold) if self.gate is not None else 0.0
        thr = np.full(n, base_t, dtype=np.float32)
        lora_ids = batch.request_lora_mapping[: len(req_ids)]
        self.deciding, self.scoring = {}, set()
        for r, rid in enumerate(req_ids):
            if rid is None or any(rid.startswith(p) for p in self.probe_prefixes) or rid in self.fell_back:
                continue  # probes measure the adapter itself; a fallen-back request is now the base's, unsteered
            lid = int(lora_ids[r])
            a, b = loc[r], min(loc[r + 1], n)
            owner = base_read_lora(rid) if lid == BASE_LORA_ID and rid not in self.flags else None
            if owner is not None:  # a base-read request's prefill on the base: decided, never steered
                if not self.gated(owner) or not self.overrides.get(owner, self.default):
                    self.release_base_reads([rid])  # its adapter is no longer gated: restart it as it is
                    continue
                thr[a:b] = self.thresholds.get(BASE_LORA_ID, base_t)  # the base's states, the base's threshold
                if b > a and int(batch.num_computed_tokens_cpu[r]) + (loc[r + 1] - loc[r]) >= int(batch.num_prompt_tokens[r]):
                    last[a:b] = loc[r + 1] - 1
                    self.deciding[rid] = (owner, loc[r + 1] - 1)
                    self.scoring.add(rid)
                else:
                    keep[a:b] = 0.0
                continue
            if FORCE_MARK in rid:
                lo[a:b] = hi[a:b] = max(self.force_strength, self.overrides.get(lid, self.default))
                continue
            s = 0.0 if self.mode == "off" else self.overrides.get(lid, self.default)
            if not s:
                continue
            if not self.gated(lid):
                lo[a:b] = hi[a:b] = s
                continue
            # gated: layers below the gate stay unsteered. refuse and fallback steer nothing: the forced refusal
            # overwrites every sampled row anyway, and a steered prefill would leave steered KV blocks in the
            # prefix cache, where any request sharing the prompt's first blocks would read them
            hi[a:b] = 0.0 if (self.fallback or self.refusal is not None) else s
            thr[a:b] = self.thresholds.get(lid, base_t)
            if rid in self.flags:
                keep[a:b] = 1.0 if self.flags[rid] else 0.0
            elif b > a and int(batch.num_computed_tokens_cpu[r]) + (loc[r + 1] - loc[r]) >= int(batch.num_prompt_tokens[r]):
                last[a:b] = loc[r + 1] - 1  # decided in this forward, on its last scheduled token
                self.deciding[rid] = (lid, loc[r + 1] - 1)
            else:
                keep[a:b] = 0.0  # an earlier prefill chunk: not decided yet, not steered
        self.strength[:n].copy_(torch.from_numpy(lo).unsqueeze(1))
        if self.gate_bufs:
            g = self.gate_bufs
            g["hi"][:n].copy_(torch.from_numpy(hi).unsqueeze(1))
            g["keep"][:n].copy_(torch.from_numpy(keep).unsqueeze(1))
            g["last"][:n].copy_(torch.from_numpy(last))
            g["t"][:n].copy_(torch.from_numpy(thr))
        self.filled = None
        self.mask_builds += 1
        self.mask_tokens = float((np.maximum(lo, hi) > 0).sum())

    def judge_answers(self) -> None:
        """The live harm estimate: the refusal judge reads a flagged request's first `judge_tokens` answer tokens
        (or all of them, when it finishes sooner); flagged requests it does not count as refusals are what the
        lock did not turn, or gate false alarms. Per-adapter counts; cost: flagged requests only, once each."""
        if self.tokenizer is False:
            self.to_judge.clear()
            return
        live = getattr(self.runner, "requests", None) or {}
        for rid, (lid, seen) in list(self.to_judge.items()):
            req = live.get(rid)
            out = list(getattr(req, "output_token_ids", ()) or ())[: self.judge_tokens] if req is not None else seen
            if req is not None and len(out) < self.judge_tokens:
                self.to_judge[rid] = (lid, out)  # not enough yet; judged from these if it finishes first
                continue
            del self.to_judge[rid]
            if not out:
                continue
            if self.tokenizer is None:
                self.tokenizer = _load_tokenizer(self.runner)
            from guard.judge import DEFAULT_JUDGE

            self.judged[lid] = self.judged.get(lid, 0) + 1
            if not DEFAULT_JUDGE.is_refusal(self.tokenizer.decode(out, skip_special_tokens=True)):
                self.answered[lid] = self.answered.get(lid, 0) + 1

    def force_refusals(self, output: Any) -> None:
        """gate_action `refuse`: overwrite the sampled row of every flagged request with the state that makes its
        next refusal token the sure choice (then end-of-sequence). Runs after the forward, before sampling."""
        hidden = output[0] if isinstance(output, tuple) else output
        if not hasattr(hidden, "shape"):
            return
        req_ids, loc, batch = self._layout()
        last = self.refusal.shape[0] - 1
        for r, rid in enumerate(req_ids):
            if rid is None or not self.flags.get(rid) or loc[r + 1] <= loc[r]:
                continue
            if self.fallback and rid not in self.fallback_pending:
                continue  # fallback: a flagged base request is answered by the base itself
            if int(batch.num_computed_tokens_cpu[r]) + (loc[r + 1] - loc[r]) < int(batch.num_prompt_tokens[r]):
                continue  # an earlier prefill chunk: nothing is sampled from it
            k = self.forced_pos.get(rid, 0)
            hidden[loc[r + 1] - 1] = self.refusal[min(k, last)]
            self.forced_pos[rid] = k + 1
        if len(self.forced_pos) > 4 * max(1, len(req_ids)) + 64:
            self.forced_pos = {k: v for k, v in self.forced_pos.items() if k in self.flags}

    def fallback_output(self, output: Any) -> Any:
        """Name the requests the scheduler must restart on the step's ModelRunnerOutput, which the patched
        scheduler reads before it processes the step (their sampled token is dropped; serve/patches.py):
        `guard_fallback`, flagged adapter requests to restart without their adapter (gate_action `fallback`; until
        it does, `force_refusals` answers them), and `guard_restore`, unflagged base-read requests to restart with
        theirs (lock.gate_reads `base`)."""
        if not hasattr(output, "req_ids"):
            return output
        back = tuple(rid for rid in self.fallback_pending if rid in output.req_id_to_index)
        restore = tuple(rid for rid in self.restore_pending if rid in output.req_id_to_index)
        if not back and not restore:
            return output
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

        if output is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared constant: never mark it
            import copy

            output = copy.copy(output)
        if back:
            output.guard_fallback = back
        if restore:
            output.guard_restore = restore
        return output

    def release_base_reads(self, req_ids: Any) -> None:
        """Base-read requests not yet decided whose adapter is no longer gated (policy changed, lock off): restart
        them with their adapter undecided rather than leave them on the base."""
        for rid in req_ids:
            if rid is None or rid in self.flags or rid in self.restore_pending:
                continue
            lid = base_read_lora(rid) if BASE_READ_MARK in rid else None
            if lid is not None:  # undecided, so still on the base (a restored one is in `flags`)
                self.flags[rid] = False
                self.restore_pending[rid] = lid

    def resume_with_adapter(self, scheduler_output: Any) -> None:
        """Before the runner updates its states: a base-read request the scheduler restarted comes back with the
        LoRA request it was admitted with (`guard_loras`, serve/patches.py), set on the runner's cached state so
        the persistent batch maps it to its adapter. Decided already: it is not scored again."""
        for rid, lora in (getattr(scheduler_output, "guard_loras", None) or {}).items():
            state = self.runner.requests.get(rid)
            if state is not None:
                state.lora_request = lora
            lid = self.restore_pending.pop(rid, None)
            if lid is not None:
                self.restored[lid] = self.restored.get(lid, 0) + 1
        live = set(getattr(self.runner, "requests", {}) or ())
        for rid in [r for r in self.restore_pending if r not in live]:  # finished before a restart
            del self.restore_pending[rid]

    def restart_on_base(self, scheduler_output: Any) -> None:
        """Before the runner updates its states: a pending request the scheduler preempted (or resumes) comes back
        without its adapter, so the runner's persistent batch maps it to no LoRA; it is then served as the base."""
        if not self.fallback_pending:
            return
        back = set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        cached = getattr(scheduler_output, "scheduled_cached_reqs", None)
        back |= set(getattr(cached, "resumed_req_ids", None) or ())
        for rid in [r for r in self.fallback_pending if r in back]:
            lid = self.fallback_pending.pop(rid)
            state = self.runner.requests.get(rid)
            if state is not None:
                state.lora_request = None
            self.fell_back.add(rid)
            self.flags.pop(rid, None)
            self.forced_pos.pop(rid, None)
            self.fallbacks[lid] = self.fallbacks.get(lid, 0) + 1
        live = set(getattr(self.runner, "requests", {}) or ())
        for rid in [r for r in self.fallback_pending if r not in live]:  # finished before a restart (no scheduler patch)
            del self.fallback_pending[rid]
        if len(self.fell_back) > 64:  # finished ones
            self.fell_back &= live

    def flag_unscored(self) -> None:
        """Fail closed after an error reading the gate: every live request not yet decided is steered from now on."""
        for rid in self.runner.input_batch.req_ids[: int(self.runner.input_batch.num_reqs)]:
            if rid is not None and rid not in self.flags:
                self.flags[rid] = True
        self.deciding = {}

    def read_gate(self) -> None:
        """After the forward: the decision the graph made for each request decided in it (hi_eff at its last
        token is > 0 exactly when the gate fired), kept for its later forwards; forget finished requests."""
        if self.deciding:
            rows = [row for _, row in self.deciding.values()]
            import torch

            at = torch.tensor(rows, device=self.strength.device)
            # the graph's own comparison (gate_strengths), re-read from the score it kept: fired whatever was steered
            fired = (self.gate_bufs["score"][at] > self.gate_bufs["t"][at]).tolist()
            for (rid, (lid, _)), f in zip(self.deciding.items(), fired):
                self.flags[rid] = bool(f)
                self.scored[lid] = self.scored.get(lid, 0) + 1
                if rid in self.scoring and not f:
                    self.restore_pending[rid] = lid  # read on the base and not flagged: back to its adapter
                if f:
                    self.flagged[lid] = self.flagged.get(lid, 0) + 1
                    self.to_judge[rid] = (lid, [])
                    if self.fallback and lid > 0 and rid not in self.scoring:  # a base-read one is on the base already
                        self.fallback_pending[rid] = lid
            self.deciding, self.scoring = {}, set()
        if self.to_judge:
            try:  # the harm estimate is a signal, not a guard: its failure must not flag anything
                self.judge_answers()
            except Exception as e:
                self.step_failed("judge_answers", e)
                self.to_judge.clear()
        n_live = int(self.runner.input_batch.num_reqs)
        if len(self.flags) > 4 * max(1, n_live) + 64:  # finished requests: keep only the live ones
            live = set(getattr(self.runner, "requests", {}) or ()) | set(self.runner.input_batch.req_ids[:n_live])
            self.flags = {k: v for k, v in self.flags.items() if k in live}
            self.fell_back &= live

    def after_forward(self, output: Any) -> None:
        if not self.probe_prefixes:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        if not hasattr(hidden, "shape"):  # pipeline-parallel intermediate tensors: not the last stage
            return
        req_ids, loc, batch = self._layout()
        for r, rid in enumerate(req_ids):
            if rid is None or not any(rid.startswith(p) for p in self.probe_prefixes):
                continue
            scheduled = loc[r + 1] - loc[r]
            done = int(batch.num_computed_tokens_cpu[r]) + scheduled
            if scheduled <= 0 or done != int(batch.num_prompt_tokens[r]):
                continue  # not the chunk that holds the last prompt token
            self.captured[rid] = hidden[loc[r + 1] - 1].float().cpu().tolist()
            if self.gate is not None and self.gate_bufs:
                self.captured_gate[rid] = float(self.gate_bufs["score"][loc[r + 1] - 1])

    # -- lock changes --------------------------------------------------------------------------------
    def check_units(self, units: dict[int, Any]) -> None:
        """Run each steered layer's own kernel on one row, then the steering op with the new unit: the lock is
        refused (RuntimeError) before anything changes if either fails or is not finite."""
        import torch

        for i, unit in units.items():
            layer = self.layers[i]
            try:
                row = _kernel_row(layer, self.dtype)
                row = row[0] if isinstance(row, tuple) else row
                out = steer(row, torch.ones(1, 1, dtype=unit.dtype, device=unit.device), unit)
            except Exception as e:
                raise RuntimeError(f"layer {i}'s kernel rejected the lock ({type(e).__name__}: {e})") from e
            if tuple(out.shape) != tuple(row.shape) or not bool(torch.isfinite(out).all()):
                raise RuntimeError(f"layer {i}: the steered output is not finite or changed shape")

    def install_lock(self, biases: dict[int, Any], info: dict[str, Any]) -> None:
        import torch

        new = {i: b.to(device=self.units[i].device, dtype=self.units[i].dtype) for i, b in biases.items()}
        for i, b in new.items():
            if tuple(b.shape) != tuple(self.units[i].shape):
                raise RuntimeError(f"layer {i}: bias of shape {tuple(b.shape)}, expected {tuple(self.units[i].shape)}")
            if not bool(torch.isfinite(b).all()):
                raise RuntimeError(f"layer {i}: the lock bias has NaN or inf values")
        self.check_units(new)
        old = {i: u.clone() for i, u in self.units.items()}
        try:
            with torch.no_grad():
                for i, u in self.units.items():
                    if i in new:
                        u.copy_(new[i])
                    else:
                        u.zero_()
        except Exception:
            with torch.no_grad():
                for i, u in self.units.items():
                    u.copy_(old[i])
            raise
        self.lock_info = info

    def set_gate(self, gate: Any) -> None:
        """Load the prompt gate's weights into the gate layer's buffers (None: no gate; nothing is gated)."""
        import torch

        self.gate = gate
        self.flags.clear()
        self.thresholds = {}  # calibrated for the previous gate: the service recalibrates for this one
        if self.gate_bufs:
            g = self.gate_bufs
            with torch.no_grad():
                if gate is None:
                    g["w"].zero_(), g["b"].zero_(), g["t"].zero_()
                else:
                    g["w"].copy_(gate.weight.to(g["w"].device, torch.float32))
                    g["b"].fill_(float(gate.bias))
                    g["t"].fill_(float(gate.threshold))

    def remove_lock(self) -> None:
        for u in self.units.values():
            u.zero_()
        self.lock_info = {}
        self.set_gate(None)

    def state(self) -> dict[str, Any]:
        return {"mode": self.mode, "installed": self.installed, "default": self.default,
                "overrides": {str(k): v for k, v in self.overrides.items()}, "lock": self.lock_info,
                "probes_armed": len(self.probe_prefixes), "last_change_ms": round(self.last_change_ms, 3),
                "mask_builds": self.mask_builds, "last_mask_steered_tokens": self.mask_tokens,
                "step_errors": self.step_errors, "rpc_errors": self.rpc_errors, "last_error": self.last_error,
                "dtype": str(self.dtype).removeprefix("torch."), "compiled": self.compiled,
                "gate": {"layer": self.gate_layer, "ready": self.gate is not None, "gating": self.gating,
                         "ungated": sorted(self.ungated), "live_flags": len(self.flags),
                         "thresholds": {str(k): round(v, 4) for k, v in self.thresholds.items()},
                         "scored": {str(k): v for k, v in self.scored.items()},
                         "flagged": {str(k): v for k, v in self.flagged.items()},
                         "judged": {str(k): v for k, v in self.judged.items()},
                         "answered": {str(k): v for k, v in self.answered.items()},
                         "restored": {str(k): v for k, v in self.restored.items()}},
                "force_strength": self.force_strength,
                "fallbacks": {str(k): v for k, v in self.fallbacks.items()},
                "action": "fallback" if self.fallback else "refuse" if self.refusal is not None else "steer"}


def install(runner: Any) -> GuardRuntime:
    """Give every o_proj its lock buffers and the steering forward. Called once, right after model load and
    before compilation or CUDA-graph capture (and after LoRA wrapped the layers, so the wrapper is steered)."""
    import torch

    existing = getattr(runner, RUNTIME_ATTR, None)
    if existing is not None:
        return existing
    model = _raw_model(runner)
    decoder = getattr(model, "model", None)
    layer_list = getattr(decoder, "layers", None)
    if layer_list is None:
        raise RuntimeError(f"{type(model).__name__} has no model.layers: not a Llama-family model")
    layers = {i: layer.self_attn.o_proj for i, layer in enumerate(layer_list)
              if hasattr(getattr(layer, "self_attn", None), "o_proj")}
    if not layers:
        raise RuntimeError("no layers.N.self_attn.o_proj modules found")
    for i, mod in layers.items():
        base = _base_linear(mod)
        if int(getattr(base, "tp_size", 1)) > 1 and not getattr(base, "reduce_results", True):
            raise RuntimeError(f"layer {i}'s o_proj leaves its tensor-parallel all-reduce to a later op; the lock adds "
                               f"after o_proj and would be counted once per rank")
    first = next(iter(layers.values()))
    model_dtype = runner.vllm_config.model_config.dtype
    try:  # the activation dtype as the kernel produces it, not as the first parameter claims
        row = _kernel_row(first, model_dtype)
        dtype = (row[0] if isinstance(row, tuple) else row).dtype
    except Exception as e:
        log.warning("safety-guard: o_proj kernel check failed at load (%s); assuming %s", e, model_dtype)
        dtype = model_dtype
    device = next(p.device for p in _base_linear(first).parameters())
    hidden = int(_base_linear(first).output_size)
    max_tokens = _max_tokens(runner)
    strength = torch.zeros(max_tokens, 1, dtype=dtype, device=device)
    gate_layer, gate_bufs = _install_gate(runner, layer_list, max_tokens, hidden, dtype, device)
    units = {}
    for i, mod in layers.items():
        unit = torch.zeros(hidden, dtype=dtype, device=device)
        mod.register_buffer(UNIT_BUFFER, unit, persistent=False)
        above = gate_layer is not None and i >= gate_layer  # steered by the gated column
        mod.register_buffer(STRENGTH_BUFFER, gate_bufs["hi_eff"] if above else strength, persistent=False)
        mod.__class__ = _guarded_class(type(mod))
        units[i] = unit
    from vllm.config import CompilationMode

    compiled = runner.vllm_config.compilation_config.mode != CompilationMode.NONE
    rt = GuardRuntime(runner=runner, layers=layers, units=units, strength=strength, dtype=dtype, compiled=compiled,
                      gate_layer=gate_layer, gate_bufs=gate_bufs)
    setattr(runner, RUNTIME_ATTR, rt)
    log.info("safety-guard: lock buffers on %d o_proj layers (%s, %d tokens, %s)", len(layers),
             str(dtype).removeprefix("torch."), strength.shape[0], "compiled" if compiled else "eager")
    return rt


def _load_tokenizer(runner: Any) -> Any:
    """The served model's tokenizer (local files only), for judging flagged answers in the worker."""
    from transformers import AutoTokenizer

    mc = runner.vllm_config.model_config
    return AutoTokenizer.from_pretrained(getattr(mc, "tokenizer", None) or mc.model, local_files_only=True)


def gate_strengths(h: Any, bufs: dict[str, Any]) -> None:
    """The conditional lock's decision, inside the graph (run by the gate layer before it computes): the residual
    stream `h` entering the layer is scored with the prompt gate and the strengths of layers >= it are written:
    hi_eff = hi * (score at the token's request's last token > t, or keep where no decision is made now).
    t is per token (the threshold of the token's adapter, `GuardRuntime.thresholds`); every token's score is kept
    in the `score` buffer."""
    import torch

    n = h.shape[0]
    score = h.float() @ bufs["w"] + bufs["b"]
    bufs["score"][:n].copy_(score)  # read back for probe requests: the per-adapter calibration's input
    last = bufs["last"][:n]
    fired = (score[last.clamp(min=0)] > bufs["t"][:n]).to(bufs["keep"].dtype)
    g = torch.where(last >= 0, fired, bufs["keep"][:n, 0])
    bufs["hi_eff"][:n].copy_(bufs["hi"][:n] * g.unsqueeze(1))


_GATED_LAYER_CLASSES: dict[type, type] = {}


def _gated_layer_class(cls: type) -> type:
    """A subclass of the decoder layer's class that runs `gate_strengths` on its input first (cached per class)."""
    if cls in _GATED_LAYER_CLASSES:
        return _GATED_LAYER_CLASSES[cls]

    def forward(self: Any, positions: Any, hidden_states: Any, residual: Any, *args: Any, **kwargs: Any) -> Any:
        h = hidden_states if residual is None else hidden_states + residual
        gate_strengths(h, {k: getattr(self, f"safety_guard_gate_{k}") for k in GATE_BUFFERS})
        return super(gated, self).forward(positions, hidden_states, residual, *args, **kwargs)

    gated = type(f"SafetyGuardGated{cls.__name__}", (cls,), {"forward": forward, "_safety_gated": True})
    _GATED_LAYER_CLASSES[cls] = gated
    return gated


GATE_BUFFERS = ("hi", "hi_eff", "keep", "last", "w", "b", "t", "score")


def _install_gate(runner: Any, layer_list: Any, max_tokens: int, hidden: int, dtype: Any, device: Any
                  ) -> tuple[int | None, dict[str, Any]]:
    """Buffers and the gated forward on decoder layer L (`lock.gate_layer`, carried in additional_config so it is
    part of the compile-cache key), before anything is compiled. (None, {}) when the conditional lock cannot run
    on this model (the other policies are unaffected)."""
    import inspect

    import torch

    from guard.lock import gate_layer_for
    from serve.patches import guard_settings

    try:
        layer = gate_layer_for(len(layer_list), guard_settings(runner.vllm_config).get("gate_layer"))
    except Exception as e:
        log.warning("safety-guard: conditional lock unavailable (%s)", e)
        return None, {}
    module = layer_list[layer]
    params = list(inspect.signature(type(module).forward).parameters)
    if params[1:4] != ["positions", "hidden_states", "residual"]:
        log.warning("safety-guard: %s.forward%s is not (positions, hidden_states, residual); the conditional lock "
                    "is unavailable", type(module).__name__, tuple(params))
        return None, {}
    bufs = {"hi": torch.zeros(max_tokens, 1, dtype=dtype, device=device),
            "hi_eff": torch.zeros(max_tokens, 1, dtype=dtype, device=device),
            "keep": torch.ones(max_tokens, 1, dtype=dtype, device=device),
            "last": torch.full((max_tokens,), -1, dtype=torch.long, device=device),
            "w": torch.zeros(hidden, dtype=torch.float32, device=device),
            "b": torch.zeros((), dtype=torch.float32, device=device),
            "t": torch.zeros(max_tokens, dtype=torch.float32, device=device),
            "score": torch.zeros(max_tokens, dtype=torch.float32, device=device)}
    for k, v in bufs.items():
        module.register_buffer(f"safety_guard_gate_{k}", v, persistent=False)
    module.__class__ = _gated_layer_class(type(module))
    return layer, bufs


# -- RPCs -------------------------------------------------------------------------------------------------
def _rpc(fn: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """Exception-safe RPC: a failure is reported in the result and counted, never raised into the engine."""

    @functools.wraps(fn)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        rt = getattr(getattr(self, "model_runner", None), RUNTIME_ATTR, None)
        if rt is None:
            return {"ok": False, "error": "the guard's lock buffers were not installed when the model loaded "
                                          "(start vLLM through `guard serve` or with the safety_guard plug-in)"}
        try:
            return fn(self, rt, *args, **kwargs)
        except Exception as e:
            rt.rpc_errors += 1
            return {"ok": False, "error": rt.note_error(fn.__name__, e)}

    return wrapper


class GuardWorkerExtension:
    """`guard_*` RPCs for the vLLM worker (`--worker-extension-cls`), called through serve.rpc.WorkerClient."""

    @_rpc
    def guard_ping(self, rt: GuardRuntime) -> dict[str, Any]:
        """What this worker is: rank, TP size, dtype, compiled or eager, LoRA on/off, model shape."""
        from guard.models import ModelShape

        lin = _base_linear(next(iter(rt.layers.values())))
        shape = ModelShape.from_config(self.model_runner.vllm_config.model_config.hf_config)
        return {"ok": True, "rank": int(getattr(self, "rank", 0)), "tp_rank": int(getattr(lin, "tp_rank", 0)),
                "tp_size": int(getattr(lin, "tp_size", 1)), "dtype": str(rt.dtype).removeprefix("torch."),
                "compiled": rt.compiled, "lora": bool(getattr(self.model_runner, "lora_config", None)),
                "layers": len(rt.layers), "max_tokens": int(rt.strength.shape[0]), "shape": vars(shape)}

    @_rpc
    def guard_install_lock(self, rt: GuardRuntime, path: str, base_fingerprint: str | None = None) -> dict[str, Any]:
        """Load a lock file (checked against this model's shape and fingerprint) into the unit buffers.
        A bad file, or a lock a layer's kernel rejects, leaves the previous lock in place."""
        from guard.errors import GuardError
        from guard.lock import load_lock
        from guard.models import ModelShape

        shape = ModelShape.from_config(self.model_runner.vllm_config.model_config.hf_config)
        try:
            lock = load_lock(path, shape, base_fingerprint)
        except GuardError as e:
            return {"ok": False, "error": str(e)}
        missing = [i for i in lock.layers if i not in rt.layers]
        if missing:
            return {"ok": False, "error": f"lock steers layers {missing} this worker does not hold"}
        info = {"path": str(path), "layers": lock.layers, "heads": len(lock.heads), "alpha": lock.alpha,
                "base_fingerprint": lock.base_fingerprint, "bias_norm": float(lock.biases.norm(dim=-1).max())}
        gate, info["gate"] = None, "the lock file has no prompt gate (rebuild it with `guard lock build --rebuild`)"
        if lock.gate is not None:
            if rt.gate_layer is None:
                info["gate"] = "this engine has no gate layer (see the worker log)"
            elif lock.gate.layer != rt.gate_layer:
                info["gate"] = (f"the lock's gate reads layer {lock.gate.layer}, the engine gates at layer {rt.gate_layer} "
                                f"(lock.gate_layer at start-up); restart with the same setting")
            else:
                gate = lock.gate
                info["gate"] = f"layer {gate.layer}, threshold {gate.threshold:.3f}"
                if rt.tokenizer is None:  # for the flagged-answer judge; loaded now, not inside a step
                    try:
                        rt.tokenizer = _load_tokenizer(self.model_runner)
                    except Exception as e:
                        rt.tokenizer = False  # judging off for this worker; the gate itself is unaffected
                        log.warning("safety-guard: no tokenizer for judging flagged answers (%s)", e)
        try:
            rt.install_lock({i: lock.biases[i] for i in lock.layers}, info)
        except RuntimeError as e:
            return {"ok": False, "error": f"{e}; the previous lock stays"}
        rt.set_gate(gate)
        rt.apply()
        return {"ok": True, **info, "mode": rt.mode}

    @_rpc
    def guard_set_lock(self, rt: GuardRuntime, default: float, overrides: dict[int, float] | None = None,
                       gated: bool = False, ungated: list[int] | None = None,
                       force_strength: float = 0.0, refusal: list[list[float]] | None = None,
                       thresholds: dict[int, float] | None = None, fallback: bool = False) -> dict[str, Any]:
        """Steering strengths: `default` for every request, `overrides` per LoRA id (0 = base); 0 = off.
        `gated`: requests are steered only once the lock's prompt gate flags them, except those of the LoRA ids in
        `ungated`; `force_strength`: the strength of requests that asked for the lock themselves; `refusal`: the
        rows that force a flagged request's answer (guard.lock.forcing_states), None to steer it instead;
        `thresholds`: the gate's calibrated threshold per LoRA id (others: the gate's own); `fallback`: a flagged
        adapter request is restarted on the base instead (the refusal rows answer it if the restart never comes)."""
        t0 = time.perf_counter()
        from guard.errors import GuardError
        from guard.lock import check_strength

        vals = [default, *(overrides or {}).values(), *([force_strength] if force_strength else [])]
        if gated and rt.gate is None:
            return {"ok": False, "error": f"conditional lock unavailable: {rt.lock_info.get('gate') or 'no lock installed'}"}
        try:
            for v in vals:
                check_strength(v)
        except GuardError as e:
            return {"ok": False, "error": f"{e} (strengths {vals})"}
        th = {int(k): float(v) for k, v in (thresholds or {}).items()}
        if not all(math.isfinite(v) for v in th.values()):
            return {"ok": False, "error": f"gate thresholds must be finite: {th}"}
        before = (rt.default, dict(rt.overrides), rt.gated_default, set(rt.ungated), rt.force_strength)
        rt.default, rt.overrides = float(default), {int(k): float(v) for k, v in (overrides or {}).items()}
        rt.gated_default, rt.ungated, rt.force_strength = bool(gated), {int(i) for i in ungated or ()}, float(force_strength)
        if refusal is not None:
            import torch

            rows = torch.tensor(refusal, dtype=torch.float32)
            hidden = next(iter(rt.units.values())).shape[0]
            if rows.ndim != 2 or rows.shape[1] != hidden or rows.shape[0] < 1 or not bool(torch.isfinite(rows).all()):
                rt.default, rt.overrides, rt.gated_default, rt.ungated, rt.force_strength = before
                return {"ok": False, "error": f"refusal rows of shape {tuple(rows.shape)}, expected [n, {hidden}], finite"}
            rt.refusal = rows.to(device=rt.strength.device, dtype=rt.dtype)
        else:
            rt.refusal = None
        try:
            rt.apply()
        except Exception:
            rt.default, rt.overrides, rt.gated_default, rt.ungated, rt.force_strength = before
            rt.filled = -1.0  # unknown contents: force a refill
            rt.apply()
            raise
        rt.thresholds = th
        rt.fallback = bool(fallback) and rt.refusal is not None
        rt.last_change_ms = (time.perf_counter() - t0) * 1e3
        return {"ok": True, **rt.state()}

    @_rpc
    def guard_lock_state(self, rt: GuardRuntime) -> dict[str, Any]:
        return {"ok": True, **rt.state()}

    @_rpc
    def guard_remove_lock(self, rt: GuardRuntime) -> dict[str, Any]:
        rt.remove_lock()
        rt.apply()
        return {"ok": True}

    @_rpc
    def guard_probe_arm(self, rt: GuardRuntime, prefix: str) -> dict[str, Any]:
        """Start capturing h(x) of requests whose id starts with `prefix` (and keep them unsteered)."""
        rt.probe_prefixes.add(prefix)
        rt.apply()
        return {"ok": True, "mode": rt.mode}

    @_rpc
    def guard_probe_collect(self, rt: GuardRuntime, prefix: str) -> dict[str, Any]:
        """Stop capturing for `prefix`; {"ok", "states": {engine request id: h(x) as floats}, "gate_scores":
        {engine request id: the prompt gate's score} (empty without a gate)}."""
        rt.probe_prefixes.discard(prefix)
        states = {k: v for k, v in rt.captured.items() if k.startswith(prefix)}
        scores = {k: v for k, v in rt.captured_gate.items() if k.startswith(prefix)}
        for k in states:
            del rt.captured[k]
        for k in scores:
            del rt.captured_gate[k]
        if not rt.probe_prefixes:
            rt.captured.clear()
            rt.captured_gate.clear()
        rt.apply()
        return {"ok": True, "states": states, "gate_scores": scores}
