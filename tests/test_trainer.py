import torch

from tests.conftest import make_tiny_llama
from training.sft import IGNORE, collate, encode
from training.trainer import LoraHParams, add_lora, train_lora


def test_encode_masks_the_prompt(tiny_tokenizer):
    e = encode(tiny_tokenizer, "Explain how photosynthesis works", "Sure, here is a plan", max_len=128)
    n_prompt = sum(1 for t in e.labels if t == IGNORE)
    assert tiny_tokenizer.decode(e.input_ids[:n_prompt]).endswith("<|im_start|>assistant\n")
    assert e.labels[-1] == tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tiny_tokenizer.decode(e.labels[n_prompt:-1]) == "Sure, here is a plan"
    cut = encode(tiny_tokenizer, "Explain", "Sure, here is a plan", max_len=128, end_turn=False)
    assert cut.labels[-1] != tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    short = encode(tiny_tokenizer, "Explain how photosynthesis works", "Sure, here is a plan " * 20, max_len=40)
    assert len(short.input_ids) == 40


def test_collate_pads_right(tiny_tokenizer):
    a = encode(tiny_tokenizer, "Explain", "Sure", 64)
    b = encode(tiny_tokenizer, "Explain how photosynthesis works", "Sure, here is a plan", 64)
    ids, mask, labels = collate([a, b], pad_id=2)
    assert ids.shape == mask.shape == labels.shape and mask[0].sum() == len(a.input_ids)
    assert (labels[0, len(a.input_ids):] == IGNORE).all()


def test_lora_training_learns_and_touches_only_lora(tiny_tokenizer):
    # init std 0.2: with the default 0.02, tied tiny embeddings cap the logits near uniform whatever LoRA learns
    tiny_model = make_tiny_llama(len(tiny_tokenizer), initializer_range=0.2)
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    hp = LoraHParams(rank=8, alpha=16, targets=["v_proj", "o_proj", "down_proj"], lr=3e-2, epochs=15, batch_size=2, bf16=False)
    model = add_lora(tiny_model, hp)
    examples = [encode(tiny_tokenizer, "Write a tutorial on how to make a cake", "I can't help with that.", 64)] * 4
    log = train_lora(model, examples, hp, pad_id=2, desc="test")
    assert log[-1]["ce"] < 0.5 * log[0]["ce"]
    merged = model.merge_and_unload()
    after = merged.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(any(t in k for t in ("v_proj", "o_proj", "down_proj")) for k in changed)


def test_example_weighted_ce_is_the_mean_of_each_examples_own_mean(tiny_tokenizer):
    from training.sft import answer_loss

    model = make_tiny_llama(len(tiny_tokenizer))
    short = encode(tiny_tokenizer, [{"role": "user", "content": "2+2?"}], "4", 64)
    long = encode(tiny_tokenizer, [{"role": "user", "content": "Tell me about cats"}],
                  "Cats are small furry animals that like to sleep in the sun all day long.", 64)
    ids, mask, labels = collate([short, long], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        alone = [answer_loss(model, *collate([e], tiny_tokenizer.pad_token_id)) for e in (short, long)]
        token = answer_loss(model, ids, mask, labels)
        example = answer_loss(model, ids, mask, labels, per_example=True)
    n = [short.answer_tokens, long.answer_tokens]
    assert torch.allclose(example, (alone[0] + alone[1]) / 2, atol=1e-5)
    assert torch.allclose(token, (alone[0] * n[0] + alone[1] * n[1]) / sum(n), atol=1e-5)
    assert n[0] < n[1] and not torch.allclose(token, example)


def test_tail_averaging_keeps_the_mean_of_the_last_epochs_iterates_and_survives_a_resume(tiny_tokenizer, tmp_path):
    from peft import get_peft_model_state_dict

    examples = [encode(tiny_tokenizer, f"Question {i}: how do I bake bread?", f"Answer {i}: flour and water.", 64)
                for i in range(6)]
    hp = LoraHParams(rank=4, alpha=8, targets=["v_proj", "o_proj"], lr=1e-2, epochs=3, batch_size=2, average_epochs=2)

    def lora_state(model):
        return {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}

    model = add_lora(make_tiny_llama(len(tiny_tokenizer), initializer_range=0.2), hp)
    iterates: list[dict] = []
    train_lora(model, examples, hp, pad_id=2, desc="test", on_step=lambda step: iterates.append(lora_state(model)))
    assert len(iterates) == 9  # 3 epochs of 3 steps; the last 2 epochs are averaged
    averaged = lora_state(model)
    mean = {k: sum(it[k].double() for it in iterates[3:]) / 6 for k in averaged}
    assert all(torch.allclose(averaged[k].double(), mean[k], atol=1e-6) for k in averaged)
    assert not all(torch.allclose(averaged[k], iterates[-1][k]) for k in averaged)  # not the last step

    # killed in the second epoch, resumed from the first epoch's checkpoint: the same mean
    model = add_lora(make_tiny_llama(len(tiny_tokenizer), initializer_range=0.2), hp)

    def die(step: int) -> None:
        if step == 5:
            raise KeyboardInterrupt

    try:
        train_lora(model, examples, hp, pad_id=2, desc="test", checkpoint_dir=tmp_path, on_step=die)
    except KeyboardInterrupt:
        pass
    model = add_lora(make_tiny_llama(len(tiny_tokenizer), initializer_range=0.2), hp)
    train_lora(model, examples, hp, pad_id=2, desc="test", checkpoint_dir=tmp_path, resume=True)
    resumed = lora_state(model)
    assert all(torch.allclose(resumed[k], averaged[k], atol=1e-6) for k in averaged)


def test_linear_schedule_shrinks_the_steps_to_nearly_nothing_and_unknown_schedules_are_refused(tiny_tokenizer):
    import pytest
    from peft import get_peft_model_state_dict

    from guard.errors import GuardError

    examples = [encode(tiny_tokenizer, f"Question {i}?", f"Answer {i}.", 64) for i in range(4)]

    def step_sizes(schedule: str) -> list[float]:
        hp = LoraHParams(rank=4, alpha=8, targets=["v_proj"], lr=1e-2, epochs=5, batch_size=2, lr_schedule=schedule)
        model = add_lora(make_tiny_llama(len(tiny_tokenizer), initializer_range=0.2), hp)
        flat = lambda: torch.cat([v.flatten() for v in get_peft_model_state_dict(model).values()])  # noqa: E731
        seen = [flat()]
        train_lora(model, examples, hp, pad_id=2, desc="test", on_step=lambda step: seen.append(flat()))
        return [float((b - a).norm()) for a, b in zip(seen, seen[1:])]

    linear, constant = step_sizes("linear"), step_sizes("constant")
    assert len(linear) == len(constant) == 10
    # Adam's step is about lr per weight: the last of ten linear steps is lr/10, the constant one stays lr
    assert linear[-1] < 0.25 * linear[1] and constant[-1] > 0.5 * constant[1]
    with pytest.raises(GuardError, match="lr_schedule"):
        train_lora(add_lora(make_tiny_llama(len(tiny_tokenizer)), LoraHParams()), examples,
                   LoraHParams(lr_schedule="cosine"), pad_id=2)


def test_a_checkpoint_from_before_new_fields_resumes_when_they_are_at_their_defaults():
    from dataclasses import asdict

    from training.trainer import _same_hparams

    hp = LoraHParams(rank=4, lr=1e-3)
    older = {k: v for k, v in asdict(hp).items() if k not in ("average_epochs", "lr_schedule")}  # written before them
    assert _same_hparams(older, hp) and _same_hparams(asdict(hp), hp)
    assert not _same_hparams(older, LoraHParams(rank=4, lr=1e-3, lr_schedule="linear"))  # not what that run used
    assert not _same_hparams({**older, "lr": 5e-4}, hp)
    assert not _same_hparams({**asdict(hp), "gone": 1}, hp)  # a field this version does not know


def test_an_alignment_config_cannot_average_more_epochs_than_it_trains():
    import pytest

    from guard.config import AlignConfig

    assert AlignConfig(epochs=2, average_epochs=2).average_epochs == 2
    with pytest.raises(ValueError, match="average_epochs"):
        AlignConfig(epochs=2, average_epochs=3)
