"""The conditional lock's prompt gate: format, fitting, and the HF conditional path on tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

from guard.anchors import render_chat
from guard.errors import GuardError
from guard.generation import generate_conditional, generate_greedy
from guard.lock import LockHandle, PromptGate, SafetyLock, load_lock
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


def reference_answer(model, handle, prompt_ids: list[int], steer: str, n: int) -> list[int]:
    """Token by token with a KV cache, no padding: steer = 'none' | 'decode' (prompt unsteered, every forward
    after the first answer token steered) | 'all'."""
    from transformers import DynamicCache

    cache = DynamicCache()
    (handle.on if steer == "all" else handle.off)()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
        toks = [int(out.logits[0, -1].argmax())]
        if steer == "decode":
            handle.on()
        for _ in range(n - 1):
            out = model(input_ids=torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True)
            toks.append(int(out.logits[0, -1].argmax()))
    handle.off()
    return toks


@pytest.mark.parametrize("threshold,steer", [(-1e9, "decode"), (1e9, "none")])
def test_conditional_path_equals_a_step_by_step_reference(tiny_model, tiny_tokenizer, threshold, steer):
    lock, gate = gated(tiny_model, threshold)
    handle = LockHandle(tiny_model, lock)
    handle.set_strength(3.0)  # strong enough that steered and unsteered answers differ on a random model
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    texts, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, handle, gate, max_new_tokens=6)
    assert steered == [steer == "decode"] * len(PROMPTS)
    assert not handle.enabled
    for p, t in zip(batch, texts):
        ref = reference_answer(tiny_model, handle, p, steer, 6)
        assert t == tiny_tokenizer.decode(ref, skip_special_tokens=True).strip()
    # steering changes something (else the comparison above could not tell the two modes apart)
    assert any(reference_answer(tiny_model, handle, p, "decode", 6) != reference_answer(tiny_model, handle, p, "none", 6)
               for p in batch)


def test_unflagged_is_plain_greedy_and_force_steers_from_the_prefill(tiny_model, tiny_tokenizer):
    lock, gate = gated(tiny_model, 1e9)
    handle = LockHandle(tiny_model, lock)
    handle.set_strength(3.0)
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    texts, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, handle, gate, 6, force=[True, False, False, True])
    assert steered == [True, False, False, True]
    assert texts[1:3] == generate_greedy(tiny_model, tiny_tokenizer, batch[1:3], 6)
    for i in (0, 3):
        assert texts[i] == tiny_tokenizer.decode(reference_answer(tiny_model, handle, batch[i], "all", 6),
                                                 skip_special_tokens=True).strip()


def test_gate_flags_by_its_layer_state(tiny_model, tiny_tokenizer):
    """The HF path scores hidden_states[layer] at the last prompt token: the same as layer_states."""
    _, gate = gated(tiny_model, 0.0)
    states = layer_states(tiny_model, tiny_tokenizer, PROMPTS, [1])[:, 0]
    gate.threshold = float(gate.logits(states).median())
    lock = random_lock(tiny_model)
    handle = LockHandle(tiny_model, lock)
    batch = [render_chat(tiny_tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]
    _, steered = generate_conditional(tiny_model, tiny_tokenizer, batch, handle, gate, 2)
    assert steered == gate.flags(states).tolist() and 0 < sum(steered) < len(PROMPTS)


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
