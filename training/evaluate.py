"""Measurements: refusal rates (HS, over-refusal) with the named judge, and benign-task accuracy (FA).

HS = % of held-out harmful prompts answered without refusal; over-refusal = % of held-out benign prompts
refused; FA = exact-label accuracy on the benign task's held-out split. Greedy answers, fixed token budget,
so a number is reproducible from the model, the prompt set and the judge version.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from guard.anchors import render_chat
from guard.generation import generate_greedy
from guard.judge import DEFAULT_JUDGE, RefusalJudge
from training.data import TaskExample, score_topic


def answers(model: Any, tokenizer: Any, prompts: Sequence[str], max_tokens: int, desc: str | None = None) -> list[str]:
    ids = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    return generate_greedy(model, tokenizer, ids, max_new_tokens=max_tokens, desc=desc)


def refusal_rate(model: Any, tokenizer: Any, prompts: Sequence[str], max_tokens: int = 32,
                 judge: RefusalJudge = DEFAULT_JUDGE, desc: str | None = None) -> tuple[float, list[str]]:
    """(% of prompts refused, the answers)."""
    outs = answers(model, tokenizer, prompts, max_tokens, desc)
    return 100.0 * judge.refusal_ratio(outs), outs


def task_accuracy(model: Any, tokenizer: Any, examples: Sequence[TaskExample], max_tokens: int = 6,
                  desc: str | None = None) -> float:
    outs = answers(model, tokenizer, [e.prompt for e in examples], max_tokens, desc)
    return 100.0 * sum(score_topic(o, e.answer) for o, e in zip(outs, examples)) / len(examples)
