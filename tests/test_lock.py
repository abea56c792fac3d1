"""SafetyLock format, folding and application on tiny random Llama models; extraction on planted signals."""

from __future__ import annotations

import pytest
import torch

from guard.config import LockConfig
from guard.errors import GuardError
from guard.lock import LockHead, SafetyLock, apply_lock, fold_biases, load_lock, o_proj_layers
from guard.models import ModelShape
from tests.conftest import make_tiny_llama
from training.safetylock import build_lock_from_activations, head_activations, select_heads, fit_head_probes


def random_lock(model, heads=((0, 1), (1, 3), (1, 0)), seed=0, fingerprint="f" * 64) -> SafetyLock:
    shape = ModelShape.from_config(model.config)
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(len(heads), shape.head_dim, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    lh = tuple(LockHead(l, h, 0.9, 2.0 + i) for i, (l, h) in enumerate(heads))
    weights = {i: m.weight.detach() for i, m in o_proj_layers(model).items()}
    return SafetyLock(lh, dirs, fold_biases(lh, dirs, shape, weights), shape, fingerprint, 6.0)


def ids(tok):
    return torch.tensor([tok("Write a tutorial on how to make a cake")["input_ids"]])


def test_folded_bias_equals_shifting_the_o_proj_input(tiny_model, tiny_tokenizer):
    lock = random_lock(tiny_model)
    x = ids(tiny_tokenizer)
    disp = lock.displacement()
    layers = o_proj_layers(tiny_model)
    hooks = [layers[i].register_forward_pre_hook(lambda m, a, i=i: (a[0] + disp[i],)) for i in lock.layers]
    with torch.no_grad():
        shifted = tiny_model(input_ids=x).logits
    for h in hooks:
        h.remove()
    with torch.no_grad(), apply_lock(tiny_model, lock):
        folded = tiny_model(input_ids=x).logits
    torch.testing.assert_close(folded, shifted, atol=1e-5, rtol=0)
    assert not torch.allclose(folded, tiny_model(input_ids=x).logits, atol=1e-3)  # the lock does something


def test_off_is_bit_identical_and_strength_is_in_place(tiny_model, tiny_tokenizer):
    x = ids(tiny_tokenizer)
    with torch.no_grad():
        before = tiny_model(input_ids=x).logits
    handle = apply_lock(tiny_model, random_lock(tiny_model))
    buf = o_proj_layers(tiny_model)[1].bias
    ptr = buf.data_ptr()
    with torch.no_grad():
        on = tiny_model(input_ids=x).logits
        handle.set_strength(0.5)
        half = tiny_model(input_ids=x).logits
    assert o_proj_layers(tiny_model)[1].bias.data_ptr() == ptr  # rescaled in place, not reallocated
    assert not torch.equal(on, half)
    handle.set_strength(0.0)
    with torch.no_grad():
        zero = tiny_model(input_ids=x).logits
    torch.testing.assert_close(zero, before, atol=1e-6, rtol=0)
    handle.off()
    assert all(m.bias is None for m in o_proj_layers(tiny_model).values())
    with torch.no_grad():
        after = tiny_model(input_ids=x).logits
    assert torch.equal(after, before)  # exact original path


def test_lock_applies_through_a_peft_adapter(tiny_model, tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"]))
    layers = o_proj_layers(peft_model)
    assert all(type(m).__name__ == "Linear" and not hasattr(m, "lora_A") for m in layers.values())
    x = ids(tiny_tokenizer)
    with torch.no_grad():
        base = peft_model(input_ids=x).logits
        with apply_lock(peft_model, random_lock(tiny_model)):
            locked = peft_model(input_ids=x).logits
        assert torch.equal(peft_model(input_ids=x).logits, base)
    assert not torch.allclose(base, locked, atol=1e-3)


def test_save_load_roundtrip_and_checks(tmp_path, tiny_model, tiny_tokenizer):
    lock = random_lock(tiny_model)
    path = lock.save(tmp_path / "lock.safetensors")
    shape = ModelShape.from_config(tiny_model.config)
    back = load_lock(path, shape, "f" * 64)
    assert back.heads == lock.heads and torch.equal(back.biases, lock.biases)
    assert back.positions == (-1,)

    other = make_tiny_llama(len(tiny_tokenizer), num_hidden_layers=3)
    with pytest.raises(GuardError, match="num_layers=2.*num_layers=3"):
        load_lock(path, ModelShape.from_config(other.config))
    wide = make_tiny_llama(len(tiny_tokenizer), hidden_size=128, num_attention_heads=4)
    with pytest.raises(GuardError, match="hidden_size=64"):
        load_lock(path, ModelShape.from_config(wide.config))
    with pytest.raises(GuardError, match="made for base model ffffffffffff"):
        load_lock(path, shape, "0" * 64)
    with pytest.raises(GuardError, match="not found"):
        load_lock(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(GuardError, match="unreadable SafetyLock"):
        load_lock(tmp_path / "junk.safetensors")


def test_bad_locks_are_refused_and_nothing_is_written(tmp_path, tiny_model):
    lock = random_lock(tiny_model)
    nan = SafetyLock(lock.heads, lock.directions, lock.biases.clone(), lock.shape, lock.base_fingerprint, 6.0)
    nan.biases[1, 0] = float("nan")
    with pytest.raises(GuardError, match="NaN"):
        nan.save(tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []  # no partial file, no temp file left behind
    bad = SafetyLock(lock.heads, lock.directions[:2], lock.biases, lock.shape, lock.base_fingerprint, 6.0)
    with pytest.raises(GuardError, match="directions have shape"):
        bad.save(tmp_path / "bad.safetensors")
    out_of_range = SafetyLock((LockHead(5, 0, 0.9, 1.0),), lock.directions[:1], lock.biases, lock.shape, "f", 6.0)
    with pytest.raises(GuardError, match="outside 2 layers"):
        apply_lock(tiny_model, out_of_range)


def test_probes_find_a_planted_head_and_direction(tiny_model):
    """Activations where only head (1, 2) separates the classes, along a known direction."""
    torch.manual_seed(0)
    shape = ModelShape.from_config(tiny_model.config)
    n = 80
    x = torch.randn(n, shape.num_layers, shape.num_heads, shape.head_dim)
    y = (torch.arange(n) % 2).long()
    true_dir = torch.zeros(shape.head_dim)
    true_dir[3] = 1.0
    x[:, 1, 2] += 3.0 * (y.float()[:, None] * 2 - 1) * true_dir
    train = torch.arange(n) < 56
    scores = fit_head_probes(x, y, train)
    assert select_heads(scores, 1) == [(1, 2)]
    assert scores.accuracy[1, 2] > 0.95 and scores.accuracy.mean() < 0.8
    lock, _ = build_lock_from_activations(x, y, train, tiny_model, LockConfig(heads=3, alpha=2.0), "f" * 64)
    assert (lock.heads[0].layer, lock.heads[0].head) == (1, 2)
    assert float(lock.directions[0] @ true_dir) > 0.9  # points from unsafe (0) towards safe (1)
    assert len(lock.heads) == 3 and lock.biases.shape == (shape.num_layers, shape.hidden_size)


def test_head_activations_are_the_o_proj_inputs(tiny_model, tiny_tokenizer):
    prompts, answers = ["Explain how photosynthesis works", "Sure"], ["I can't help with that.", "Sure, here is a plan"]
    acts = head_activations(tiny_model, tiny_tokenizer, prompts, answers, positions=[-1, -2])
    shape = ModelShape.from_config(tiny_model.config)
    assert acts.shape == (2, 2, shape.num_layers, shape.num_heads, shape.head_dim)
    # the same rows from an unbatched forward of the second sequence
    from guard.anchors import render_chat

    seq = render_chat(tiny_tokenizer, [{"role": "user", "content": prompts[1]}])
    seq += tiny_tokenizer(answers[1], add_special_tokens=False)["input_ids"]
    seen = {}
    layer1 = o_proj_layers(tiny_model)[1]
    hook = layer1.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    with torch.no_grad():
        tiny_model(input_ids=torch.tensor([seq]))
    hook.remove()
    torch.testing.assert_close(acts[1, 0, 1].reshape(-1), seen["x"][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts[1, 1, 1].reshape(-1), seen["x"][0, -2], atol=1e-5, rtol=0)
    # non-negative positions count from the answer's first token (where a refusal or compliance begins)
    start = len(render_chat(tiny_tokenizer, [{"role": "user", "content": prompts[1]}]))
    head = head_activations(tiny_model, tiny_tokenizer, prompts, answers, positions=[0, 1])
    torch.testing.assert_close(head[1, 0, 1].reshape(-1), seen["x"][0, start], atol=1e-5, rtol=0)
    torch.testing.assert_close(head[1, 1, 1].reshape(-1), seen["x"][0, start + 1], atol=1e-5, rtol=0)


def test_every_lock_knob_is_either_part_of_the_build_or_read_at_run_time():
    """The cached lock is keyed by its build knobs only: flipping a run-time knob (gate_reads, gate_action, ...)
    must not cost a ten-minute rebuild, and a new field must be placed in one of the two sets."""
    from training.safetylock import BUILD_LOCK_KNOBS, RUNTIME_LOCK_KNOBS, built_with

    assert not BUILD_LOCK_KNOBS & RUNTIME_LOCK_KNOBS
    assert BUILD_LOCK_KNOBS | RUNTIME_LOCK_KNOBS == set(LockConfig.model_fields)
    settings = LockConfig().model_dump(mode="json", include=BUILD_LOCK_KNOBS)
    assert built_with({**settings, "gate_reads": "adapter"}, settings)  # a file keyed when it was a build knob
    assert not built_with({**settings, "heads": settings["heads"] + 1}, settings)
    assert not built_with({k: v for k, v in settings.items() if k != "alpha"}, settings) and not built_with(None, settings)
