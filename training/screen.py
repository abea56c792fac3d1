"""Screen a customer's fine-tuning data with the lock's prompt gate before training (`harden.screen_data`).

Why: on the development family (100 harmful examples beside an arithmetic task) SBR kept harm near the base's
but the task learned far less than under plain SFT (FA 23 vs 42): every harmful example's cross-entropy pulls
against the anchor term for the whole run, and the optimizer spends the adapter on that tug of war. The gate
that decides the conditional lock (a linear probe on the aligned base's residual stream, `training/lockgate.py`)
already tells harmful requests from benign ones, tasks included, at a threshold fixed on development prompts.
Scoring each training example's prompt with it *on the aligned base* — before any adapter exists, so the
customer's data cannot move the score — and dropping the flagged ones takes most of the attack out of the data,
and leaves the regularizer (SBR / AsFT) the remainder it was built for. Nothing here is trained or tuned.

What it cannot do: a request phrased to pass a linear probe on the base goes through; that is why the
regularizer stays on, and why the red-team bench measures both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from guard.errors import GuardError
from guard.lock import PromptGate, quantile_threshold
from training.userdata import ChatExample


@dataclass(frozen=True)
class ScreenResult:
    kept: list[ChatExample]
    dropped: list[int]  # indices into the input, in order
    threshold: float
    layer: int
    max_fpr: float | None = None  # screening's own threshold setting (None: the live gate's threshold)

    def dropped_among(self, rows: Sequence[ChatExample], prompts: set[str]) -> int:
        """How many dropped examples of `rows` (the screened input) have their last user message in `prompts`."""
        return sum(rows[i].messages[-1]["content"] in prompts for i in self.dropped)

    def train_rows(self, keep_steps: bool = False) -> list[ChatExample]:
        """What to train on: the kept examples, or with `keep_steps` (harden.screen_keep_steps) the kept ones
        cycled in order up to the input's count, so an epoch takes as many optimizer steps as it would have
        without screening (the first `dropped` kept examples appear twice per epoch)."""
        if not keep_steps or not self.kept:
            return list(self.kept)
        return [self.kept[i % len(self.kept)] for i in range(len(self.kept) + len(self.dropped))]

    def summary(self) -> dict[str, Any]:
        return {"dropped": len(self.dropped), "of": len(self.kept) + len(self.dropped), "layer": self.layer,
                "threshold": round(self.threshold, 4), "max_fpr": self.max_fpr, "dropped_indices": self.dropped[:200]}


def gate_for_screening(cfg: Any) -> PromptGate:
    """The configured base's lock gate (the file `guard prepare` / `guard lock build` made, or lock.path)."""
    from guard.lock import load_lock
    from guard.workspace import Workspace

    ws = Workspace(cfg)
    path, _ = ws.lock_file()
    if path is None or not path.is_file():
        raise GuardError("harden.screen_data needs the base's SafetyLock with a prompt gate: run `guard prepare` "
                         "(or `guard lock build`) first, or train without screening (--no-screen, harden.screen_data: false)")
    gate = load_lock(path, base_fingerprint=ws.base_fingerprint).gate
    if gate is None:
        raise GuardError(f"{path}: this lock has no prompt gate (rebuild it with `guard lock build --rebuild`)")
    return gate


def screen(model: Any, tokenizer: Any, rows: Sequence[ChatExample], gate: PromptGate, max_fpr: float | None = None,
           desc: str | None = "screen data") -> ScreenResult:
    """Drop the examples whose prompt (the chat before the trained answer) the gate flags on `model`, which must
    be the aligned base the gate was fitted on (no adapter).

    `max_fpr` (harden.screen_max_fpr) gives screening a threshold of its own: the score above which at most that
    share of the gate's benign dev prompts (they travel in the lock) falls on this model. The live gate's threshold
    is held to what a user in a chat would notice (1% refused); a training set can lose more of its benign
    examples than that, and every harmful one it keeps is trained on. None keeps the gate's threshold."""
    from training.lockgate import dev_scores, layer_states

    if max_fpr is not None:
        gate = dataclasses.replace(gate, threshold=quantile_threshold(dev_scores(model, tokenizer, gate, desc=None), max_fpr))
    if not rows:
        return ScreenResult([], [], gate.threshold, gate.layer, max_fpr)
    states = layer_states(model, tokenizer, [list(r.messages) for r in rows], [gate.layer], desc=desc)[:, 0]
    flagged = gate.flags(states).tolist()
    return ScreenResult([r for r, f in zip(rows, flagged) if not f], [i for i, f in enumerate(flagged) if f],
                        gate.threshold, gate.layer, max_fpr)
