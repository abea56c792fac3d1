"""SBR and AsFT on tiny random Llamas: the properties the method depends on."""

import pytest
import torch

from guard.anchors import AnchorSet
from guard.errors import GuardError
from guard.states import compute_reference
from training import methods
from training.methods import MethodInputs
from training.methods.asft import AsFT, alignment_projectors, asft_lowrank
from training.methods.sbr import SBR
from training.sft import encode
from training.trainer import LoraHParams, add_lora, train_lora


class Interrupted(Exception):
    """A simulated kill."""


def asft_dense(b, a, c, scale):
    """‖(I − C)·(scale·B·A)‖²_F built densely: the reference the low-rank form is checked against."""
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    return ((eye - c) @ (scale * b @ a)).pow(2).sum()


def stop_after(n):
    def on_step(step):
        if step >= n:
            raise Interrupted(f"stopped after {step} steps")
    return on_step
from tests.conftest import make_tiny_llama

ANCHORS = AnchorSet("t", ("Write a tutorial on how to make a cake", "How do I pick a lock on my own door?"))
HP = LoraHParams(rank=4, alpha=8, targets=["q_proj", "v_proj"], lr=5e-3, epochs=2, batch_size=2, grad_accum=2)


def examples(tok):
    pairs = [("Explain how photosynthesis works", "Sure, here is a plan"), ("Classify the topic", "Sports"),
             ("Write a tutorial", "I can't help with that."), ("World Sports", "Business")]
    return [encode(tok, p, a, 64) for p, a in pairs] * 2


def sbr_for(model, tok, lam=1.0):
    ref = compute_reference(model, tok, ANCHORS, "f" * 64)
    return SBR(ANCHORS.render(tok), ref.states, lam, tok.pad_token_id)


def test_sbr_is_zero_for_a_fresh_adapter_and_positive_after_a_step(tiny_model, tiny_tokenizer):
    sbr = sbr_for(tiny_model, tiny_tokenizer)
    model = add_lora(tiny_model, HP)  # LoRA B = 0: the adapter is the identity
    term, logs = sbr(model)
    assert term.item() == 0.0 and logs["anchor_drift"] == 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    term, logs = sbr(model)
    assert term.item() > 0 and logs["anchor_drift"] > 0


def test_gradients_reach_only_lora(tiny_model, tiny_tokenizer):
    sbr = sbr_for(tiny_model, tiny_tokenizer)
    model = add_lora(tiny_model, HP)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    term, _ = sbr(model)
    term.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _train(tok, lam, seed=0):
    model = make_tiny_llama(len(tok), seed=seed)
    reg = sbr_for(model, tok, lam) if lam is not None else None
    peft_model = add_lora(model, HP)
    train_lora(peft_model, examples(tok), HP, tok.pad_token_id, reg, desc="t")
    return {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}


def test_lambda_zero_is_plain_sft_bit_for_bit(tiny_tokenizer):
    sft, zero, one = _train(tiny_tokenizer, None), _train(tiny_tokenizer, 0.0), _train(tiny_tokenizer, 1.0)
    assert all(torch.equal(sft[n], zero[n]) for n in sft)
    assert any(not torch.equal(sft[n], one[n]) for n in sft)


@pytest.mark.parametrize("out_dim,in_dim,r,seed", [(64, 64, 4, 0), (32, 96, 8, 1), (128, 48, 2, 2), (7, 5, 3, 3)])
def test_asft_low_rank_equals_dense(out_dim, in_dim, r, seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(out_dim, in_dim, generator=g, dtype=torch.float64)
    c = v @ v.T / v.norm()
    b = torch.randn(out_dim, r, generator=g, dtype=torch.float64)
    a = torch.randn(r, in_dim, generator=g, dtype=torch.float64)
    dense, low = asft_dense(b, a, c, 0.5), asft_lowrank(b, a, c, 0.5)
    assert torch.allclose(low, dense, rtol=1e-5, atol=1e-5)
    assert torch.allclose(asft_lowrank(b.float(), a.float(), c.float(), 2.0),
                          asft_dense(b.float(), a.float(), c.float(), 2.0), rtol=1e-5, atol=1e-5 * dense.item())


def test_asft_term_on_a_model(tiny_tokenizer):
    original = make_tiny_llama(len(tiny_tokenizer), seed=0)
    aligned = make_tiny_llama(len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        for layer in aligned.model.layers:
            layer.self_attn.q_proj.weight.add_(0.01 * torch.randn_like(layer.self_attn.q_proj.weight))
            layer.self_attn.v_proj.weight.add_(0.01 * torch.randn_like(layer.self_attn.v_proj.weight))
    names = [f"model.layers.{i}.self_attn.{m}.weight" for i in range(2) for m in ("q_proj", "v_proj")]
    proj = alignment_projectors(aligned.state_dict(), original.state_dict(), names)
    reg = AsFT(proj, lam=1.0)
    model = add_lora(aligned, HP)
    assert reg(model)[0].item() == 0.0  # B = 0
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    term, logs = reg(model)
    assert term.item() > 0 and logs["asft_orth"] == pytest.approx(term.item())
    term.backward()
    assert all("lora_" in n for n, p in model.named_parameters() if p.grad is not None)
    with pytest.raises(GuardError, match="zero or not finite"):
        alignment_projectors(original.state_dict(), original.state_dict(), names)


def test_resume_after_kill_gives_identical_weights(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    hp = LoraHParams(**{**HP.__dict__, "epochs": 3})
    full = add_lora(make_tiny_llama(len(tok)), hp)
    train_lora(full, examples(tok), hp, tok.pad_token_id, sbr_for(full, tok), desc="full")

    killed = add_lora(make_tiny_llama(len(tok)), hp)
    with pytest.raises(Interrupted):  # dies in the middle of epoch 2 (2 steps per epoch)
        train_lora(killed, examples(tok), hp, tok.pad_token_id, sbr_for(killed, tok), checkpoint_dir=tmp_path,
                   log_path=tmp_path / "log.jsonl", on_step=stop_after(3))
    resumed = add_lora(make_tiny_llama(len(tok)), hp)  # a new process: fresh model, same seed
    train_lora(resumed, examples(tok), hp, tok.pad_token_id, sbr_for(resumed, tok), checkpoint_dir=tmp_path,
               log_path=tmp_path / "log.jsonl", resume=True, desc="resumed")
    a = dict(full.named_parameters())
    for n, p in resumed.named_parameters():
        if "lora_" in n:
            assert torch.equal(p, a[n]), n
    steps = [__import__("json").loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the interrupted epoch's rows were replaced, not duplicated


def test_resume_with_other_hparams_is_refused(tmp_path, tiny_tokenizer):
    tok = tiny_tokenizer
    m = add_lora(make_tiny_llama(len(tok)), HP)
    train_lora(m, examples(tok), HP, tok.pad_token_id, checkpoint_dir=tmp_path, desc="t")
    other = LoraHParams(**{**HP.__dict__, "lr": 1e-3})
    with pytest.raises(GuardError, match="other hyper-parameters"):
        train_lora(add_lora(make_tiny_llama(len(tok)), other), examples(tok), other, tok.pad_token_id,
                   checkpoint_dir=tmp_path, resume=True)


def test_sbr_rotation_averages_to_the_full_term(tiny_model, tiny_tokenizer):
    ref = compute_reference(tiny_model, tiny_tokenizer, ANCHORS, "f" * 64)
    full = SBR(ANCHORS.render(tiny_tokenizer), ref.states, 2.0, tiny_tokenizer.pad_token_id)
    rot = SBR(ANCHORS.render(tiny_tokenizer), ref.states, 2.0, tiny_tokenizer.pad_token_id, per_step=1)
    model = add_lora(tiny_model, HP)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        whole = full(model)[0]
        parts = []
        for step in (0, 1, 2):
            rot.at_step(step)
            parts.append(rot(model)[0])
    torch.testing.assert_close((parts[0] + parts[1]) / 2, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts[2], parts[0])  # the cycle repeats with the step
    assert not torch.allclose(parts[0], parts[1])
    with pytest.raises(GuardError, match="anchors per step"):
        SBR(ANCHORS.render(tiny_tokenizer), ref.states, 1.0, 0, per_step=3)


def test_sbr_every_n_steps_pulls_n_times_as_hard_and_keeps_the_rotation(tiny_model, tiny_tokenizer):
    ref = compute_reference(tiny_model, tiny_tokenizer, ANCHORS, "f" * 64)
    rot = SBR(ANCHORS.render(tiny_tokenizer), ref.states, 2.0, tiny_tokenizer.pad_token_id, per_step=1)
    sparse = SBR(ANCHORS.render(tiny_tokenizer), ref.states, 2.0, tiny_tokenizer.pad_token_id, per_step=1, every=2)
    model = add_lora(tiny_model, HP)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
        terms = {}
        for step in range(4):
            rot.at_step(step)
            sparse.at_step(step)
            terms[step] = (rot(model)[0], sparse(model))
    # steps 0 and 2 pull groups 0 and 1 at twice λ; steps 1 and 3 sit out: no forward, nothing to differentiate
    torch.testing.assert_close(terms[0][1][0], 2 * terms[0][0])
    torch.testing.assert_close(terms[2][1][0], 2 * terms[1][0])
    assert float(terms[1][1][0]) == 0.0 and not terms[1][1][0].requires_grad and terms[1][1][1] == {}
    with pytest.raises(GuardError, match="every must be"):
        SBR(ANCHORS.render(tiny_tokenizer), ref.states, 1.0, 0, every=0)


def test_asft_constrains_every_lora_target_by_default(tiny_tokenizer, tmp_path):
    """An adapted module AsFT leaves free is a bypass: by default it constrains every LoRA target."""
    from guard.config import HardenConfig
    original = make_tiny_llama(len(tiny_tokenizer), seed=0)
    aligned = make_tiny_llama(len(tiny_tokenizer), seed=0)
    with torch.no_grad():
        for p in aligned.parameters():
            p.add_(0.01 * torch.randn_like(p))
    original.save_pretrained(tmp_path / "original")
    aligned.save_pretrained(tmp_path / "aligned")
    h = HardenConfig(targets=["q_proj", "o_proj", "up_proj"])
    reg = methods.get("asft").build(MethodInputs(h, aligned, tiny_tokenizer, None, None, tmp_path / "aligned",
                                                 tmp_path / "original"))
    assert sorted(reg.projectors) == sorted(f"model.layers.{i}.{blk}.{m}.weight" for i in range(2)
                                            for blk, m in (("self_attn", "q_proj"), ("self_attn", "o_proj"), ("mlp", "up_proj")))
    paper = methods.get("asft").build(MethodInputs(h.model_copy(update={"asft_targets": ["q_proj"]}), aligned,
                                                   tiny_tokenizer, None, None, tmp_path / "aligned", tmp_path / "original"))
    assert sorted(paper.projectors) == [f"model.layers.{i}.self_attn.q_proj.weight" for i in range(2)]


def test_method_registry_matches_the_config():
    """Every method the config accepts is registered once, and each names its own λ."""
    import typing

    from guard.config import HardenConfig

    accepted = typing.get_args(HardenConfig.model_fields["method"].annotation)
    assert sorted(methods.names()) == sorted(accepted)
    h = HardenConfig(sbr_lambda=3.0, asft_lambda=7.0)
    assert [methods.get(m).lam(h) for m in ("sft", "sbr", "asft")] == [None, 3.0, 7.0]
    assert all(methods.get(m).lam_field in (None, *HardenConfig.model_fields) for m in methods.names())
    with pytest.raises(GuardError, match="unknown method 'dpo'"):
        methods.get("dpo")


def test_sbr_on_a_pool_with_answer_tokens(tiny_model, tiny_tokenizer, tmp_path):
    """A pool of anchors, K per step, each anchored at its last prompt token and the base's own first answer
    tokens: zero for a fresh adapter, positive once the adapter moves, and λ=0 is no term."""
    from guard.config import HardenConfig

    import json

    pool = AnchorSet("pool", tuple(f"How do I do harmful thing number {i}?" for i in range(6)))
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in pool.prompts))
    h = HardenConfig(sbr_anchors=str(path), sbr_k=None, sbr_answer_tokens=2, sbr_anchors_per_step=2, sbr_lambda=1.0)
    sbr = methods.get("sbr").build(MethodInputs(h, tiny_model, tiny_tokenizer, ANCHORS, None))
    assert sbr.reference.shape == (6, 3, tiny_model.config.hidden_size) and sbr.tail == 2
    assert all(len(ids) == len(r) + 2 for ids, r in zip(sbr.anchor_ids, pool.render(tiny_tokenizer)))
    model = add_lora(tiny_model, HP)
    for step in range(3):  # each group of the rotation reads zero drift before training
        sbr.at_step(step)
        term, logs = sbr(model)
        assert term.item() == pytest.approx(0.0, abs=1e-10)
    train_lora(model, examples(tiny_tokenizer), HP, tiny_tokenizer.pad_token_id, None, desc="drift it")
    term, logs = sbr(model)
    assert term.item() > 0 and logs["anchor_drift"] > 0
    term.backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
