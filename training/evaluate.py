"""Measurements: refusal rates (HS, over-refusal) with the named judge, and benign-task accuracy (FA).

HS = % of held-out harmful prompts answered without refusal; over-refusal = % of held-out benign prompts
refused; FA = exact-label accuracy on the benign task's held-out split. Greedy answers, fixed token budget,
so a number is reproducible from the model, the prompt set and the judge version.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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
                  desc: str | None = None, score: Callable[[str, str], bool] = score_topic) -> float:
    """% of `examples` answered exactly (`score`: the task's checker; topic labels by default)."""
    outs = answers(model, tokenizer, [e.prompt for e in examples], max_tokens, desc)
    return 100.0 * sum(score(o, e.answer) for o, e in zip(outs, examples)) / len(examples)


def load_base_with_adapter(cfg: Any, adapter: Any | None = None) -> tuple[Any, Any, str]:
    """(model, tokenizer, base fingerprint): the configured aligned base, with `adapter` loaded when given.

    The adapter is checked against the base (rank, shapes, fingerprint) before any of its weights load.
    """
    from guard.adapters import check_adapter_fits, read_adapter
    from guard.artifacts import read_json
    from guard.models import fingerprint_dir, load_causal_lm
    from guard.workspace import Workspace

    base = Workspace(cfg).base()
    fp = fingerprint_dir(base)
    info = None
    if adapter is not None:
        info = read_adapter(adapter, cfg.harden.max_rank)
        check_adapter_fits(info, read_json(base / "config.json", "model config"), fp)
    model, tok = load_causal_lm(base, "float32")
    if info is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(info.path), is_trainable=False)
        model.eval()
    return model, tok, fp


def lock_comparison(model: Any, tokenizer: Any, lock: Any, harmful: Sequence[str], benign: Sequence[str],
                    max_tokens: int = 32, strength: float = 1.0) -> dict[str, dict[str, float]]:
    """HS and over-refusal of `model` without and with `lock` (same prompts, greedy, same judge)."""
    from guard.lock import LockHandle

    handle = LockHandle(model, lock)
    out: dict[str, dict[str, float]] = {}
    try:
        for name, on in (("unlocked", False), ("locked", True)):
            if on:
                handle.set_strength(strength)
                handle.on()
            refused, _ = refusal_rate(model, tokenizer, harmful, max_tokens, desc=f"harmful ({name})")
            over, _ = refusal_rate(model, tokenizer, benign, max_tokens, desc=f"benign ({name})")
            out[name] = {"hs": round(100.0 - refused, 2), "over_refusal": round(over, 2)}
    finally:
        handle.remove()
    return out


def conditional_comparison(model: Any, tokenizer: Any, lock: Any, harmful: Sequence[str], benign: Sequence[str],
                           max_tokens: int = 32, strength: float = 1.0, calibration: str = "none",
                           action: dict[str, Any] | None = None, reads: str = "adapter") -> dict[str, dict[str, float]]:
    """HS and over-refusal without the lock and under the conditional lock (guard.generation.generate_conditional),
    plus the share of each set the prompt gate flags; the gate calibrated for `model` first (`calibration`);
    `action`: guard.generation.action_args of lock.gate_action (None: steer); `reads`: lock.gate_reads."""
    from guard.generation import generate_conditional
    from training.lockgate import calibrate_lock

    if lock.gate is None:
        from guard.errors import GuardError

        raise GuardError("this lock has no prompt gate; rebuild it with `guard lock build --rebuild`")
    lock = calibrate_lock(model, tokenizer, lock, calibration, reads)
    out: dict[str, dict[str, float]] = {"unlocked": {}, "conditional": {}}
    for key, prompts in (("hs", harmful), ("over_refusal", benign)):
        ids = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
        plain = generate_greedy(model, tokenizer, ids, max_tokens, desc=f"{key} (unlocked)")
        cond, flags = generate_conditional(model, tokenizer, ids, lock, strength, max_tokens,
                                           desc=f"{key} (conditional)", reads_base=reads == "base", **(action or {}))
        for name, ans in (("unlocked", plain), ("conditional", cond)):
            r = 100.0 * DEFAULT_JUDGE.refusal_ratio(ans)
            out[name][key] = round(100.0 - r if key == "hs" else r, 2)
        out["conditional"][f"flagged_{'harmful' if key == 'hs' else 'benign'}"] = round(100.0 * sum(flags) / max(1, len(flags)), 2)
    return out
