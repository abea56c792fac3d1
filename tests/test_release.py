"""Aligned-base releases: a machine-independent merge, and a release that reproduces the trained base byte for byte."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from guard import release
from guard.errors import GuardError
from guard.models import fingerprint_dir


def test_bit_rounding_matches_torch_round_to_nearest_even():
    x = torch.cat([torch.randn(50_000) * torch.logspace(-30, 30, 50_000),
                   torch.tensor([0.0, -0.0, 1.0, -1.0, 1.00390625, 1.01171875, -3.0e38, 3.0e38])])
    ours = release.bf16_bits_round(x)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.view(torch.int16), x.to(torch.bfloat16).view(torch.int16))


def test_merge_is_a_fixed_order_float64_sum_independent_of_threads():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=g).to(torch.bfloat16)
    a = torch.randn(8, 40, generator=g).to(torch.bfloat16)
    b = torch.randn(24, 8, generator=g).to(torch.bfloat16)
    # the reference: numpy float64, summing the rank-1 terms in rank order, element by element
    ref = np.zeros((24, 40))
    a64, b64 = a.double().numpy(), b.double().numpy()
    for i in range(8):
        ref = ref + np.outer(b64[:, i], a64[i, :])
    want = release.bf16_bits_round(torch.from_numpy(w.double().numpy() + ref * 2.0).float())
    before = torch.get_num_threads()
    try:
        got = []
        for n in (1, max(1, before)):
            torch.set_num_threads(n)
            got.append(release.merge_weight(w, a, b, 2.0))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(g_.view(torch.int16), want.view(torch.int16)) for g_ in got)
    # and it is the LoRA merge: W + s·B@A up to the final bf16 rounding
    assert torch.allclose(got[0].float(), (w.float() + 2.0 * b.float() @ a.float()), atol=0.05, rtol=0.01)


def _lora_factors(model, rank=4, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                  lora_dropout=0.0))
    with torch.no_grad():  # B starts at zero; give it something to merge
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return peft_model


def test_release_reproduces_the_trained_base_and_matches_peft(tmp_path, tiny_model, tiny_tokenizer):
    original = tmp_path / "original"
    tiny_model.to(torch.bfloat16).save_pretrained(original)
    tiny_tokenizer.save_pretrained(original)
    peft_model = _lora_factors(tiny_model.float())
    from training.align import peft_factors

    factors, scaling = peft_factors(peft_model)
    assert scaling == 2.0 and "model.layers.0.self_attn.q_proj.lora_A" in factors
    factors = {k: release.bf16_bits_round(v) for k, v in factors.items()}
    meta = {"key": "k1", "original_fingerprint": fingerprint_dir(original), "seconds": 1.0}

    trained = release.write_merged(original, tmp_path / "trained", factors, scaling, meta)
    rel_dir = release.write_release(tmp_path / "rel", factors, scaling, meta)
    applied = release.Release.read(rel_dir).apply(original, tmp_path / "applied")
    assert fingerprint_dir(trained) == fingerprint_dir(applied) != fingerprint_dir(original)
    assert (applied / "tokenizer_config.json").is_file() and (applied / "guard_align.json").is_file()

    from transformers import AutoModelForCausalLM

    ours = AutoModelForCausalLM.from_pretrained(applied, dtype=torch.float32)
    merged = peft_model.merge_and_unload()
    for name, p in merged.state_dict().items():
        assert torch.allclose(ours.state_dict()[name], p.to(torch.bfloat16).float(), atol=0.02), name


def test_bundled_lookup_and_errors(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    factors = {"model.layers.9.self_attn.q_proj.lora_A": torch.zeros(2, 64, dtype=torch.bfloat16),
               "model.layers.9.self_attn.q_proj.lora_B": torch.zeros(64, 2, dtype=torch.bfloat16)}
    with pytest.raises(ValueError, match="not bfloat16"):  # unrounded factors would merge differently
        release.write_release(tmp_path / "bad", {k: v.float() for k, v in factors.items()}, 1.0, {})
    assert not (tmp_path / "bad").exists()
    release.write_release(tmp_path / "bundle" / "r1", factors, 1.0, {"key": "abc", "original_fingerprint": "x"})
    monkeypatch.setattr(release, "BUNDLED_DIR", tmp_path / "bundle")
    assert release.bundled("abc") is not None and release.bundled("other") is None
    original = tmp_path / "original"
    tiny_model.save_pretrained(original)
    with pytest.raises(GuardError, match="made for another model"):
        release.bundled("abc").apply(original, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # atomic: nothing half-written
    with pytest.raises(GuardError, match="not an aligned-base release"):
        release.Release.read(tmp_path)


def test_the_bundled_release_is_the_default_recipe():
    """`guard prepare` merges the bundled release only when its key is the default recipe's on the original it
    records; a change to AlignConfig's defaults or to the alignment data without a new release would silently turn
    a 6-second merge into 10-20 minutes of training on every fresh machine. This fails first."""
    from guard.config import AlignConfig
    from training.align import train_key

    bundled = [d for d in sorted(release.BUNDLED_DIR.iterdir()) if d.is_dir()]
    assert bundled, "no release bundled in guard/releases"
    rel = release.Release.read(bundled[0])
    # the training's key: the default align.delta_scale merges this same release at another strength
    assert train_key(rel.meta["original_fingerprint"], AlignConfig()) == rel.key
    assert release.bundled(rel.key) is not None


def test_align_merges_a_release_at_the_delta_scale_without_training(tmp_path, monkeypatch, tiny_model, tiny_tokenizer):
    """`align.delta_scale` re-merges the release of the same training (bundled, or kept beside the base) at another
    strength: the weights are W + scale·s·B@A, the base carries its own key, and nothing is trained."""
    from guard.config import AlignConfig
    from training import align as align_mod

    original = tmp_path / "original"
    tiny_model.to(torch.bfloat16).save_pretrained(original)
    tiny_tokenizer.save_pretrained(original)
    factors, scaling = align_mod.peft_factors(_lora_factors(tiny_model.float()))
    factors = {k: release.bf16_bits_round(v) for k, v in factors.items()}
    release.write_release(tmp_path / "bundle" / "r1", factors, scaling,
                          {"key": "trained-k", "original_fingerprint": fingerprint_dir(original)})
    monkeypatch.setattr(release, "BUNDLED_DIR", tmp_path / "bundle")
    monkeypatch.setattr(align_mod, "train_key", lambda fp, cfg: "trained-k")
    monkeypatch.setattr(align_mod, "load_causal_lm", lambda *a, **k: pytest.fail("trained instead of merging"))

    out = tmp_path / "base"
    cfg = AlignConfig(delta_scale=1.5)
    align_mod.align(original, out, cfg, tmp_path / "work")
    want = release.write_merged(original, tmp_path / "want", factors, scaling * 1.5, {})
    assert fingerprint_dir(out) == fingerprint_dir(want)
    meta = json.loads((out / align_mod.ALIGN_META).read_text())
    assert meta["key"] == align_mod.align_key("x", cfg) != "trained-k" and meta["delta_scale"] == 1.5
    assert align_mod.is_current(out, align_mod.align_key("x", cfg))

    # back to 1.0 from the release kept beside the base (the bundle gone): the release's own bytes and key
    shutil.rmtree(tmp_path / "bundle")
    align_mod.align(original, out, AlignConfig(delta_scale=1.0), tmp_path / "work")
    plain = release.Release.read(align_mod.release_dir(out)).apply(original, tmp_path / "plain")
    assert fingerprint_dir(out) == fingerprint_dir(plain) != fingerprint_dir(want)
    assert json.loads((out / align_mod.ALIGN_META).read_text())["key"] == "trained-k"
