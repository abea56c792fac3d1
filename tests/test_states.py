import pytest
import torch

from guard.anchors import AnchorSet
from guard.errors import GuardError
from guard.states import ReferenceStates, cached_reference, compute_reference, last_token_states, reference_path

PROMPTS = ("Write a tutorial on how to make a cake", "Explain how photosynthesis works", "Sure")


def test_state_is_exactly_the_lm_head_input(tiny_model, tiny_tokenizer):
    """lm_head(h) must equal the model's own next-token logits: h is the row the model decodes from."""
    batch = AnchorSet("t", PROMPTS).render(tiny_tokenizer)
    with torch.no_grad():
        h = last_token_states(tiny_model, batch, pad_id=tiny_tokenizer.pad_token_id)
        for i, ids in enumerate(batch):
            logits = tiny_model(input_ids=torch.tensor([ids])).logits[0, -1]
            assert torch.equal(tiny_model.lm_head(h[i : i + 1])[0], logits) or torch.allclose(
                tiny_model.lm_head(h[i : i + 1])[0], logits, atol=1e-5, rtol=0)
        # bit-exact: h is the last row of the very tensor the model's lm_head turns into its logits
        ids = torch.tensor([batch[0]])
        seen = {}
        hook = tiny_model.lm_head.register_forward_hook(lambda m, i, o: seen.update(inp=i[0], out=o))
        out = tiny_model(input_ids=ids)
        hook.remove()
        h0 = last_token_states(tiny_model, [batch[0]])
        assert torch.equal(h0[0], seen["inp"][0, -1])
        assert torch.equal(seen["out"][0, -1], out.logits[0, -1])


def test_right_padding_does_not_change_states(tiny_model, tiny_tokenizer):
    batch = AnchorSet("t", PROMPTS).render(tiny_tokenizer)
    assert len({len(b) for b in batch}) > 1  # really padded
    with torch.no_grad():
        together = last_token_states(tiny_model, batch, pad_id=tiny_tokenizer.pad_token_id)
        alone = torch.cat([last_token_states(tiny_model, [b]) for b in batch])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


def test_states_are_differentiable(tiny_model, tiny_tokenizer):
    batch = AnchorSet("t", PROMPTS[:1]).render(tiny_tokenizer)
    h = last_token_states(tiny_model, batch)
    h.pow(2).sum().backward()
    assert tiny_model.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_reference_round_trip_and_checks(tmp_path, tiny_model, tiny_tokenizer):
    anchors = AnchorSet("t", PROMPTS)
    ref = compute_reference(tiny_model, tiny_tokenizer, anchors, "f" * 64)
    assert ref.states.shape == (3, 64) and ref.states.dtype == torch.float32
    path = ref.save(tmp_path / "ref.safetensors")
    back = ReferenceStates.load(path, "f" * 64, anchors.hash, hidden_size=64)
    assert torch.equal(back.states, ref.states) and back.prompt_ids_hash == ref.prompt_ids_hash
    with pytest.raises(GuardError, match="computed on model ffffffffffff, not on 000000000000"):
        ReferenceStates.load(path, "0" * 64)
    with pytest.raises(GuardError, match="another anchor set"):
        ReferenceStates.load(path, anchors_hash=AnchorSet("t", PROMPTS[:2]).hash)
    with pytest.raises(GuardError, match="hidden size 64, the model has 576"):
        ReferenceStates.load(path, hidden_size=576)
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(GuardError, match="unreadable reference states"):
        ReferenceStates.load(tmp_path / "junk.safetensors")
    with pytest.raises(GuardError, match="not found"):
        ReferenceStates.load(tmp_path / "missing.safetensors")


def test_nan_reference_is_never_written(tmp_path):
    bad = ReferenceStates(torch.full((2, 4), float("nan")), "f" * 64, "a" * 64, "i" * 64)
    with pytest.raises(GuardError, match="NaN"):
        bad.save(tmp_path / "r.safetensors")
    assert not (tmp_path / "r.safetensors").exists()


def test_cache_hit_reuses_file(tmp_path, tiny_model, tiny_tokenizer):
    anchors = AnchorSet("t", PROMPTS)
    first = cached_reference(tiny_model, tiny_tokenizer, anchors, "f" * 64, tmp_path)
    path = reference_path(tmp_path, "f" * 64, anchors.hash)
    mtime = path.stat().st_mtime_ns
    second = cached_reference(tiny_model, tiny_tokenizer, anchors, "f" * 64, tmp_path)
    assert path.stat().st_mtime_ns == mtime and torch.equal(first.states, second.states)


def test_shared_prefix_is_used_and_matches_full_forwards(tiny_model, tiny_tokenizer):
    from guard.states import batch_states, prepare_batch

    batch = AnchorSet("t", PROMPTS).render(tiny_tokenizer)
    shared = prepare_batch(batch, tiny_tokenizer.pad_token_id)
    plain = prepare_batch(batch, tiny_tokenizer.pad_token_id, share_prefix=False)
    assert shared.prefix is not None and shared.prefix.shape[1] >= 8  # the chat template's system prompt
    assert shared.ids.numel() < plain.ids.numel()
    tiny_model.train()  # as SBR runs it: gradients through the repeated prefix cache
    h_shared = batch_states(tiny_model, shared)
    h_plain = batch_states(tiny_model, plain)
    torch.testing.assert_close(h_shared, h_plain, atol=1e-5, rtol=1e-5)
    h_shared.pow(2).sum().backward()
    q0 = tiny_model.model.layers[0].self_attn.k_proj.weight.grad
    assert q0 is not None and q0.abs().sum() > 0  # reaches layer 0's keys through the prefix cache


def test_tail_states_are_the_last_positions_of_a_plain_forward(tiny_model, tiny_tokenizer):
    """Anchoring answer tokens: the gathered positions equal the per-position states of an unpadded forward,
    with the shared prefix on and rows of different lengths."""
    from guard.states import batch_states, decoder_of, prepare_batch

    batch = [ids + [5, 6, 7] for ids in AnchorSet("t", PROMPTS).render(tiny_tokenizer)]
    pb = prepare_batch(batch, tiny_tokenizer.pad_token_id, tail=3)
    assert pb.prefix is not None
    got = batch_states(tiny_model, pb)
    assert got.shape == (len(batch), 4, tiny_model.config.hidden_size)
    with torch.no_grad():
        for i, ids in enumerate(batch):
            full = decoder_of(tiny_model)(input_ids=torch.tensor([ids])).last_hidden_state[0]
            torch.testing.assert_close(got[i], full[-4:], atol=1e-5, rtol=1e-5)
    with pytest.raises(GuardError, match="tail"):
        prepare_batch([[1, 2]], 0, tail=2)
