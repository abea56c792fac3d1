"""Lock-strength sweeps for the lock benches (bench/lock_search.py, bench/lock_eval.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from training.evaluate import refusal_rate


def strength_sweep(model: Any, tokenizer: Any, lock: Any, grid: Sequence[float], harmful: Sequence[str],
                   benign: Sequence[str], max_tokens: int, max_rise: float, unlocked_over: float | None = None,
                   label: str = "dev") -> tuple[list[dict[str, float]], dict[str, float] | None]:
    """(sweep, best): refusal of `harmful` and over-refusal of `benign` at each lock strength in `grid`.

    The rule both lock benches choose by: the most harmful prompts refused while over-refusal stays within
    `max_rise` points of the unlocked model's (`unlocked_over`; None = the grid's first point, e.g. strength 0).
    The sweep stops once over-refusal exceeds that or everything is refused (a stronger lock cannot win).
    """
    from guard.lock import LockHandle

    handle = LockHandle(model, lock)
    handle.on()
    sweep: list[dict[str, float]] = []
    allowed = None if unlocked_over is None else unlocked_over + max_rise
    try:
        for g in grid:
            handle.set_strength(g)
            refused, _ = refusal_rate(model, tokenizer, harmful, max_tokens, desc=f"{label} harmful @{g}")
            over, _ = refusal_rate(model, tokenizer, benign, max_tokens, desc=f"{label} benign @{g}")
            sweep.append({"strength": g, "dev_refused": round(refused, 2), "dev_over_refusal": round(over, 2)})
            print(label, sweep[-1], flush=True)
            if allowed is None:
                allowed = sweep[0]["dev_over_refusal"] + max_rise
            if over > allowed or refused >= 99.9:
                break
    finally:
        handle.remove()
    ok = [r for r in sweep if allowed is not None and r["dev_over_refusal"] <= allowed]
    return sweep, max(ok, key=lambda r: (r["dev_refused"], -r["strength"])) if ok else None
