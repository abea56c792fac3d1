"""The conditional lock's prompt gate: format, fitting, and the HF conditional path on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

from guard.anchors import render_chat
from guard.errors import GuardError
from guard.generation import generate_conditional, generate_greedy
from guard.lock import LockHandle, PromptGate, SafetyLock, load_lock, o_proj_layers
from guard.models import ModelShape
from tests.test_lock import random_lock
from training.lockgate import fit_probe, layer_states, threshold_for

PROMPTS = ["Write a tutorial on how to make a cake", "Hi!", "Tell me about cats and dogs", "How do I bake bread?"]


def gated(model, threshold: float, layer: int = 1, seed: int = 0) -> tuple[SafetyLock, PromptGate]:
    lock = random_lock(model)
    g = torch.Generator().manual_seed(seed)
    gate = PromptGate(layer, torch.randn(model.config.hidden_size, generator=g), 0.0, threshold)
    lock.gate = gate
    return lock, gate


def base_and_adapter(model) -> tuple:
    """(a copy of `model`, a copy under a random peft LoRA on q, v and o): an adapter that moves every state."""
    import copy

    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    return copy.deepcopy(model), get_peft_model(copy.deepcopy(model), cfg).eval()


def steered_greedy(model, tok, lock, prompts_ids, strength, n):
    handle = LockHandle(model, lock)
    handle.set_strength(strength)
    handle.on()
    try:
        return generate_greedy(model, tok, prompts_ids, n)
    finally:
        handle.remove()


def test_from_layer_keeps_only_the_heads_at_or_above_it(tiny_model):
    lock, _ = gated(tiny_model, 0.0)
    above = lock.from_layer(1)
    assert {h.layer for h in above.heads} == {1} and len(above.heads) == 2
    assert above.biases[0].abs().sum() == 0 and torch.equal(above.biases[1], lock.biases[1])
    with pytest.raises(GuardError, match="no head at layer"):
        above.from_layer(2)


@pytest.mark.parametrize("threshold,flagged", [(-1e9, True), (1e9, False)])
def test_flagged_prompts_get_the_lock_above_the_gate_from_the_prefill_unflagged_are_plain(
        tiny_model, tiny_tokenizer, threshold, flagged):
    lock, gate = gated(tiny_model, threshold)
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    texts, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, lock, 3.0, max_new_tokens=6)
    assert steered == [flagged] * len(PROMPTS)
    want = (steered_greedy(tiny_model, tiny_tokenizer, lock.from_layer(1), batch, 3.0, 6) if flagged
            else generate_greedy(tiny_model, tiny_tokenizer, batch, 6))
    assert texts == want
    assert all(m.bias is None for m in o_proj_layers(tiny_model).values())  # left unsteered
    # the lock shows, and steering only above the gate is not the whole lock
    plain = generate_greedy(tiny_model, tiny_tokenizer, batch, 6)
    assert steered_greedy(tiny_model, tiny_tokenizer, lock.from_layer(1), batch, 3.0, 6) != plain


def test_force_steers_every_layer_whatever_the_gate_says(tiny_model, tiny_tokenizer):
    lock, gate = gated(tiny_model, 1e9)
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    texts, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, lock, 3.0, 6, force=[True, False, False, True])
    assert steered == [True, False, False, True]
    assert texts[1:3] == generate_greedy(tiny_model, tiny_tokenizer, batch[1:3], 6)
    assert [texts[0], texts[3]] == steered_greedy(tiny_model, tiny_tokenizer, lock, [batch[0], batch[3]], 3.0, 6)


def test_gate_flags_by_its_layer_state(tiny_model, tiny_tokenizer):
    """The HF path scores hidden_states[layer] at the last prompt token: the same as layer_states."""
    lock, gate = gated(tiny_model, 0.0)
    states = layer_states(tiny_model, tiny_tokenizer, PROMPTS, [1])[:, 0]
    gate.threshold = float(gate.logits(states).median())
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    _, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, lock, 1.0, 2)
    assert steered == gate.flags(states).tolist() and 0 < sum(steered) < len(PROMPTS)



def test_layer_states_stops_early_and_equals_the_full_forwards_hidden_states(tiny_tokenizer):
    """The hooks read exactly HF's hidden_states[layer] at the last prompt token, on a plain and a peft model, and
    leave no hook behind (the next full forward still runs to the logits)."""
    import copy

    from peft import LoraConfig, get_peft_model

    from guard.states import pad_right
    from tests.conftest import make_tiny_llama

    tiny_model = make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=4)
    pm = get_peft_model(copy.deepcopy(tiny_model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False)).eval()
    seqs = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    for model in (tiny_model, pm):
        n = model.config.num_hidden_layers
        got = layer_states(model, tiny_tokenizer, PROMPTS, list(range(1, n)), batch_size=3)
        from training.lockgate import decoder_layers

        ran = []
        h = decoder_layers(model)[3].register_forward_hook(lambda *a: ran.append(1))
        assert torch.equal(layer_states(model, tiny_tokenizer, PROMPTS, [2], batch_size=3)[:, 0], got[:, 1])
        h.remove()
        assert not ran  # the forward stopped before layer 3
        ids, mask, last = pad_right(seqs[:3], tiny_tokenizer.pad_token_id or 0)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
        rows = torch.arange(3)
        for j, layer in enumerate(range(1, n)):
            assert torch.equal(got[:3, j], out.hidden_states[layer][rows, last].float())
        assert out.logits.shape[0] == 3
        assert not any(m._forward_pre_hooks for m in model.modules())

def test_fit_probe_separates_a_planted_direction_and_threshold_caps_false_flags():
    g = torch.Generator().manual_seed(0)
    d = torch.randn(32, generator=g)
    neg = torch.randn(200, 32, generator=g) * 3 + 5
    pos = neg[:100] + 2.0 * d  # shifted along d, with a large common offset the fold must undo
    w, b = fit_probe(pos, neg)
    gate = PromptGate(1, w, b, 0.0)
    assert float(gate.flags(pos).float().mean()) > 0.95 and float(gate.flags(neg).float().mean()) < 0.1
    dev = torch.randn(100, 32, generator=g) * 3 + 5
    t = threshold_for(gate.logits(dev), 0.02)
    assert float((gate.logits(dev) > t).float().mean()) <= 0.02 and t >= 0.0


def test_gate_roundtrips_and_bad_gates_are_refused(tmp_path, tiny_model):
    lock, gate = gated(tiny_model, 0.5)
    gate.meta["dev_fpr"] = 0.01
    path = lock.save(tmp_path / "lock.safetensors")
    back = load_lock(path, ModelShape.from_config(tiny_model.config))
    assert back.gate is not None and back.gate.layer == 1 and back.gate.threshold == 0.5
    assert torch.equal(back.gate.weight, gate.weight) and back.gate.meta == {"dev_fpr": 0.01}
    plain = random_lock(tiny_model)
    assert load_lock(plain.save(tmp_path / "plain.safetensors")).gate is None
    lock.gate = PromptGate(2, gate.weight, 0.0, 0.0)  # the tiny model has 2 layers: 2 is past the last
    with pytest.raises(GuardError, match="gate reads layer 2"):
        lock.save(tmp_path / "bad.safetensors")
    lock.gate = PromptGate(1, gate.weight[:10], 0.0, 0.0)
    with pytest.raises(GuardError, match="gate weight has shape"):
        lock.save(tmp_path / "bad.safetensors")
    lock.gate = PromptGate(1, gate.weight, float("nan"), 0.0)
    with pytest.raises(GuardError, match="NaN"):
        lock.save(tmp_path / "bad.safetensors")


def test_version_1_lock_files_are_refused_with_the_rebuild_command(tmp_path, tiny_model):
    import json

    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    path = random_lock(tiny_model).save(tmp_path / "lock.safetensors")
    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["guard"])
    header["format_version"] = 1
    save_file(load_file(str(path)), str(path), metadata={"guard": json.dumps(header)})
    with pytest.raises(GuardError, match="guard lock build --rebuild"):
        load_lock(path)


def test_forcing_states_make_each_token_the_sure_first_choice():
    from guard.lock import forcing_states

    g = torch.Generator().manual_seed(0)
    head = torch.randn(300, 24, generator=g)
    ids = [7, 5, 299, 0]
    rows = forcing_states(head, ids, margin=40.0)
    logits = rows @ head.t()
    assert logits.argmax(-1).tolist() == ids
    top2 = logits.topk(2, dim=-1).values
    assert bool(((top2[:, 0] - top2[:, 1]) >= 40.0 - 1e-3).all())
    head[9] = head[:9].mean(0)  # inside the hull of the other rows: no state can make it the first choice
    with pytest.raises(GuardError, match="cannot make token 9"):
        forcing_states(head, [9])


def test_refuse_action_answers_flagged_prompts_with_the_refusal_and_leaves_the_rest(tiny_model, tiny_tokenizer):
    from guard.lock import refusal_ids

    lock, gate = gated(tiny_model, 0.0)
    states = layer_states(tiny_model, tiny_tokenizer, PROMPTS, [1])[:, 0]
    gate.threshold = float(gate.logits(states).median())
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    ids = refusal_ids(tiny_tokenizer, "I can't help with that.")
    assert ids[-1] == tiny_tokenizer.eos_token_id
    texts, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, lock, 1.0, 8, refusal=ids)
    plain = generate_greedy(tiny_model, tiny_tokenizer, batch, 8)
    want = tiny_tokenizer.decode(ids[:8], skip_special_tokens=True).strip()
    assert [t for t, s in zip(texts, steered) if s] == [want] * sum(steered) and 0 < sum(steered) < len(PROMPTS)
    assert [t for t, s in zip(texts, steered) if not s] == [p for p, s in zip(plain, steered) if not s]


def test_fallback_action_answers_flagged_prompts_with_the_adapter_set_aside(tiny_model, tiny_tokenizer):
    """gate_action fallback, HF side: a flagged prompt gets the base's own answer (the adapter disabled for the
    whole request, as the engine restarts it), the rest the adapter's; the gate reads the adapter's states."""
    from guard.generation import action_args

    base, pm = base_and_adapter(tiny_model)
    lock, gate = gated(pm, 0.0)
    gate.threshold = float(gate.logits(layer_states(pm, tiny_tokenizer, PROMPTS, [1])[:, 0]).median())
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    texts, flagged = generate_conditional(pm, tiny_tokenizer, batch, lock, 1.0, 8,
                                          **action_args("fallback", tiny_tokenizer, "No."))
    on_base, on_adapter = generate_greedy(base, tiny_tokenizer, batch, 8), generate_greedy(pm, tiny_tokenizer, batch, 8)
    assert on_base != on_adapter and 0 < sum(flagged) < len(PROMPTS)
    assert texts == [b if f else a for b, a, f in zip(on_base, on_adapter, flagged)]
    plain, _ = generate_conditional(base, tiny_tokenizer, batch, lock, 1.0, 8, fallback=True)
    assert plain == on_base  # on a model without an adapter, fallback is its own plain answer
    assert action_args("steer", tiny_tokenizer, "No.") == {} and "refusal" in action_args("refuse", tiny_tokenizer, "No.")


def test_calibration_follows_an_adapter_that_moved_the_benign_slice():
    w = torch.zeros(4)
    w[0] = 1.0
    gate = PromptGate(6, w, 0.0, 1.0, meta={"dev_mean": -2.0, "max_fpr": 0.1})
    moved = torch.linspace(0.0, 2.0, 20)  # the adapter's benign dev scores: mean 1.0, 3 above the base mean
    assert gate.calibrated(moved, "none") is gate
    shifted = gate.calibrated(moved, "shift")
    assert shifted.threshold == pytest.approx(1.0 + 1.0 - (-2.0))
    assert shifted.meta["base_threshold"] == 1.0 and shifted.meta["calibration"] == "shift"
    q = gate.calibrated(moved, "quantile")
    assert float((moved > q.threshold).float().mean()) <= 0.1 + 1e-6
    assert float((moved > q.threshold - 1e-3).float().mean()) > 0.1 - 1e-6  # the smallest such threshold
    down = gate.calibrated(moved - 10.0, "quantile")  # an adapter that pushed everything towards benign
    assert down.threshold < 0.0  # may go below the probe's boundary, unlike the base's threshold
    with pytest.raises(GuardError, match="rebuild"):
        PromptGate(6, w, 0.0, 1.0).calibrated(moved, "shift")
    with pytest.raises(GuardError, match="unknown gate calibration"):
        gate.calibrated(moved, "median")


def test_screen_drops_exactly_the_examples_the_gate_flags_on_the_base(tiny_model, tiny_tokenizer):
    """`harden.screen_data`: an example goes when the gate's score of its whole prompt chat passes the threshold."""
    from training.screen import screen
    from training.userdata import ChatExample

    rows = [ChatExample(({"role": "user", "content": p},), "ok") for p in PROMPTS]
    rows.append(ChatExample(({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}), "Hello"))
    _, gate = gated(tiny_model, 0.0)
    chats = [list(r.messages) for r in rows]
    scores = gate.logits(layer_states(tiny_model, tiny_tokenizer, chats, [gate.layer])[:, 0])
    # the chat is scored as a whole: a system turn changes the score of the same user message
    assert not torch.allclose(scores[1], scores[-1])
    t = float(scores.median())
    _, gate = gated(tiny_model, t)
    res = screen(tiny_model, tiny_tokenizer, rows, gate, desc=None)
    assert res.dropped == [i for i, s in enumerate(scores.tolist()) if s > t] and 0 < len(res.dropped) < len(rows)
    assert res.kept == [r for i, r in enumerate(rows) if i not in res.dropped]
    assert res.summary()["dropped"] == len(res.dropped) and res.summary()["of"] == len(rows)
    assert screen(tiny_model, tiny_tokenizer, rows, gated(tiny_model, 1e9)[1], desc=None).kept == rows
    assert screen(tiny_model, tiny_tokenizer, rows, gated(tiny_model, -1e9)[1], desc=None).kept == []
    # harden.screen_keep_steps: the kept examples, cycled in order back up to the input's count
    assert res.train_rows() == res.kept
    cycled = res.train_rows(keep_steps=True)
    assert len(cycled) == len(rows) and all(r in res.kept for r in cycled) and cycled[:len(res.kept)] == res.kept
    none = screen(tiny_model, tiny_tokenizer, rows, gated(tiny_model, -1e9)[1], desc=None)
    assert none.train_rows(keep_steps=True) == []  # nothing kept: nothing to cycle (harden refuses the data)


def test_screening_threshold_of_its_own_comes_from_the_gates_dev_prompts_on_the_base(tiny_model, tiny_tokenizer):
    """`harden.screen_max_fpr`: the threshold flags at most that share of the dev prompts the gate carries, on the
    model screened with; None keeps the live gate's threshold."""
    import dataclasses

    from training.lockgate import dev_scores
    from training.screen import screen
    from training.userdata import ChatExample

    dev = [f"Tell me something nice about number {i}." for i in range(20)]
    _, gate = gated(tiny_model, 1e9)
    gate = dataclasses.replace(gate, meta={"dev_prompts": dev})
    rows = [ChatExample(({"role": "user", "content": p},), "ok") for p in PROMPTS + dev]
    assert screen(tiny_model, tiny_tokenizer, rows, gate, None, desc=None).dropped == []  # the gate's own threshold
    res = screen(tiny_model, tiny_tokenizer, rows, gate, 0.25, desc=None)
    scores = dev_scores(tiny_model, tiny_tokenizer, gate)
    assert res.threshold < 1e9 and float((scores > res.threshold).float().mean()) <= 0.25
    assert float((scores >= res.threshold).float().mean()) > 0.25  # the smallest such threshold
    dropped_dev = [i - len(PROMPTS) for i in res.dropped if i >= len(PROMPTS)]
    assert dropped_dev == [i for i, v in enumerate(scores.tolist()) if v > res.threshold] and len(dropped_dev) == 5


def test_screening_without_a_prepared_lock_says_what_to_do(tmp_path):
    from guard.config import GuardConfig
    from training.screen import gate_for_screening

    cfg = GuardConfig.model_validate({"runtime": {"home": str(tmp_path)}, "model": {"base": str(tmp_path / "none")}})
    with pytest.raises(GuardError, match="guard prepare"):
        gate_for_screening(cfg)


def test_gate_framings_are_four_disjoint_pools_and_framing_is_deterministic():
    """Train framings (gate data, framed SBR anchors), dev framings (the gate's choice), the dev attacker's
    (dev_gate_dodge) and the held-out attacker's (the report) share no framing and no opening or closing words, so
    what is chosen on one pool is reported on framings it never met."""
    from lab.redteam import DEV_DODGE_FRAMES, DEV_FRAMES, DODGE_FRAMES
    from training.lockgate import GATE_TRAIN_FRAMES, framed_copies, gate_data

    pools = [set(GATE_TRAIN_FRAMES), set(DEV_FRAMES) - {"{p}"}, set(DODGE_FRAMES) - {"{p}"},
             set(DEV_DODGE_FRAMES) - {"{p}"}]
    ends = [{(f.split("{p}")[0].strip()[:12], f.split("{p}")[1].strip()[:12]) for f in pool} for pool in pools]
    for i in range(len(pools)):
        for j in range(i + 1, len(pools)):
            assert not pools[i] & pools[j] and not ends[i] & ends[j]
    assert all(f.count("{p}") == 1 for pool in pools for f in pool)
    prompts = [f"question number {i}" for i in range(60)]
    a, b = framed_copies(prompts), framed_copies(prompts)
    assert a == b and all(p in x and p != x for p, x in zip(prompts, a))
    assert len({x.replace(p, "") for p, x in zip(prompts, a)}) >= len(GATE_TRAIN_FRAMES) - 2  # spread over the pool
    plain, framed = gate_data(cap=20, framed=False), gate_data(cap=20, framed=True)
    assert framed.harmful[:20] == plain.harmful and framed.benign[:20] == plain.benign
    assert framed.harmful[20:] == framed_copies(plain.harmful) and framed.dev_benign == plain.dev_benign
    assert gate_data(cap=20) == framed  # gate data v6 (rule v6 adopted the framed copies): what `guard lock build` fits


def test_gate_rule_v6_adopts_framed_data_only_for_a_clear_gain_within_the_limits():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    import lock_gate_dev

    def row(framed, layer, tf, t=80.0, f=1.0, ff=2.0, how="quantile"):
        return {"framed": framed, "layer": layer, "calibration": how, "tpr": {"base": t, "sft": t},
                "fpr": {"base": f, "sft": f}, "task_fpr": {"base": 0.0, "sft": 0.0},
                "tpr_framed": {"base": tf, "sft": tf}, "fpr_framed": {"base": ff, "sft": ff}}

    got = lock_gate_dev.choose_v6([row(False, 15, 40.0), row(True, 15, 70.0), row(True, 12, 69.0, t=70.0)])
    assert got == {"framed": True, "layer": 15, "calibration": "quantile", "adopt": True, "meets_limits": True}
    # within 2 points the higher as-written rate decides, then unframed data
    assert lock_gate_dev.choose_v6([row(False, 15, 60.0), row(True, 15, 61.0)])["framed"] is False
    # a framed pick less than 15 points above the best unframed one is not adopted
    assert not lock_gate_dev.choose_v6([row(False, 15, 50.0), row(True, 15, 60.0)])["adopt"]
    # framed benign prompts flagged above 4% rule a candidate out
    assert lock_gate_dev.choose_v6([row(False, 15, 40.0), row(True, 15, 90.0, ff=5.0)])["framed"] is False
    assert lock_gate_dev.choose_v6([row(True, 15, 90.0, f=3.0)]) == {"framed": False, "adopt": False,
                                                                     "meets_limits": False}


def test_reading_the_base_decides_on_the_base_states_and_answers_flagged_prompts_without_the_adapter(
        tiny_model, tiny_tokenizer):
    """lock.gate_reads base, HF side: the flags are the base model's (the adapter set aside for scoring), a
    flagged prompt is answered without the adapter under every action, the rest by the adapter."""
    base, pm = base_and_adapter(tiny_model)
    lock, gate = gated(base, 0.0)
    gate.threshold = float(gate.logits(layer_states(base, tiny_tokenizer, PROMPTS, [1])[:, 0]).median())
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    _, on_base = generate_conditional(base, tiny_tokenizer, batch, lock, 1.0, 8)
    _, on_adapter = generate_conditional(pm, tiny_tokenizer, batch, lock, 1.0, 8)
    assert on_base != on_adapter, "the stand-in adapter must move the state the gate reads"
    texts, flagged = generate_conditional(pm, tiny_tokenizer, batch, lock, 1.0, 8, fallback=True, reads_base=True)
    assert flagged == on_base and 0 < sum(flagged) < len(PROMPTS)
    plain_base, plain_adapter = generate_greedy(base, tiny_tokenizer, batch, 8), generate_greedy(pm, tiny_tokenizer, batch, 8)
    assert texts == [b if f else a for b, a, f in zip(plain_base, plain_adapter, flagged)]
    steered, _ = generate_conditional(pm, tiny_tokenizer, batch, lock, 3.0, 8, reads_base=True)
    base_steered, _ = generate_conditional(base, tiny_tokenizer, batch, lock, 3.0, 8)
    assert [t for t, f in zip(steered, flagged) if f] == [t for t, f in zip(base_steered, flagged) if f]
    assert [t for t, f in zip(steered, flagged) if not f] == [a for a, f in zip(plain_adapter, flagged) if not f]
