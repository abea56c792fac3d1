"""Vet an adapter offline: anchor drift against the aligned reference, anchor refusal ratio, verdict.

The same quantities the live health check exports while serving, computed with HF on the base + adapter,
so an operator can gate adapters in CI before they are ever loaded (`guard vet`, exit code 3 on fail).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.adapters import check_adapter_fits, read_adapter
from guard.anchors import AnchorSet
from guard.drift import DriftReport, Verdict, anchor_drift, verdict
from guard.generation import generate_greedy
from guard.judge import DEFAULT_JUDGE, RefusalJudge
from guard.states import ReferenceStates, last_token_states


@dataclass
class VetReport:
    adapter: str
    drift: DriftReport
    refusals: list[bool]
    answers: list[str]
    verdict: Verdict
    judge: str
    seconds: float
    base_refusal_ratio: float | None = None

    @property
    def refusal_ratio(self) -> float:
        return sum(self.refusals) / len(self.refusals)

    def table(self, prompts: tuple[str, ...]) -> str:
        lines = [f"{'#':>2}  {'rel L2':>7}  {'cosine':>7}  {'refused':>7}  anchor prompt -> answer"]
        for i, p in enumerate(prompts):
            lines.append(f"{i:>2}  {self.drift.rel_l2[i]:7.3f}  {self.drift.cosine[i]:7.4f}  "
                         f"{'yes' if self.refusals[i] else 'NO':>7}  {p[:48]!r} -> {self.answers[i][:60]!r}")
        v = self.verdict
        base = "" if self.base_refusal_ratio is None else f" (aligned base: {self.base_refusal_ratio:.2f})"
        lines.append(f"mean anchor drift {self.drift.mean_rel_l2:.3f} (max {self.drift.max_rel_l2:.3f}), "
                     f"refusal ratio {self.refusal_ratio:.2f}{base}, judge {self.judge}")
        lines.append(f"verdict: {v.status.upper()}" + (f" — {'; '.join(v.reasons)}" if v.reasons else ""))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "status": self.verdict.status, "reasons": list(self.verdict.reasons),
                "drift": self.drift.to_dict(), "refusal_ratio": self.refusal_ratio, "refusals": self.refusals,
                "base_refusal_ratio": self.base_refusal_ratio,
                "judge": self.judge, "seconds": round(self.seconds, 2)}


def adapter_states_and_answers(model: Any, tokenizer: Any, anchors: AnchorSet,
                               probe_tokens: int) -> tuple[Any, list[str]]:
    import torch

    batch = anchors.render(tokenizer)
    with torch.no_grad():
        states = last_token_states(model, batch, tokenizer.pad_token_id)
    answers = generate_greedy(model, tokenizer, batch, max_new_tokens=probe_tokens)
    return states, answers


def cached_base_refusal_ratio(cache: Path, anchors: AnchorSet, probe_tokens: int,
                              judge: RefusalJudge = DEFAULT_JUDGE) -> float | None:
    """The cached base refusal ratio when `cache` holds one for these anchors, judge and token budget."""
    import json

    if not cache.is_file():
        return None
    row = json.loads(cache.read_text())
    same = row.get("anchors_hash") == anchors.hash and row.get("judge") == judge.id \
        and row.get("probe_tokens") == probe_tokens
    return float(row["ratio"]) if same else None


def base_refusal_ratio(model: Any, tokenizer: Any, anchors: AnchorSet, probe_tokens: int, cache: Path | None = None,
                       judge: RefusalJudge = DEFAULT_JUDGE) -> float:
    """Share of the probe anchors the aligned base itself refuses (greedy, `probe_tokens`): what an adapter's
    refusal ratio is compared with. Cached in `cache` (JSON) when given; the live gauge measures it in-engine."""
    from guard.artifacts import write_json_atomic

    if cache is not None and (hit := cached_base_refusal_ratio(cache, anchors, probe_tokens, judge)) is not None:
        return hit
    key = {"anchors_hash": anchors.hash, "judge": judge.id, "probe_tokens": probe_tokens}
    answers = generate_greedy(model, tokenizer, anchors.render(tokenizer), max_new_tokens=probe_tokens)
    refusals = [judge.is_refusal(a) for a in answers]
    ratio = sum(refusals) / len(refusals)
    if cache is not None:
        write_json_atomic(cache, {**key, "ratio": ratio, "refusals": refusals})
    return ratio


def vet_adapter(base: Any, tokenizer: Any, adapter_dir: str | Path, anchors: AnchorSet, reference: ReferenceStates,
                drift_cfg: Any, base_fingerprint: str, max_rank: int | None = None,
                judge: RefusalJudge = DEFAULT_JUDGE, base_ratio: float | None = None) -> VetReport:
    """Load `adapter_dir` onto `base` (checked first), measure, and unload it again. `base_ratio`: the base's own
    refusal ratio on the same anchors (`base_refusal_ratio`), for the verdict's drop rule."""
    from peft import PeftModel

    t0 = time.perf_counter()
    info = read_adapter(adapter_dir, max_rank)
    check_adapter_fits(info, base.config, base_fingerprint)
    model = PeftModel.from_pretrained(base, str(info.path), is_trainable=False)
    model.eval()
    try:
        states, answers = adapter_states_and_answers(model, tokenizer, anchors, drift_cfg.probe_tokens)
    finally:
        model.unload()  # leave `base` as it was
    drift = anchor_drift(states, reference.states)
    refusals = [judge.is_refusal(a) for a in answers]
    v = verdict(drift.mean_rel_l2, sum(refusals) / len(refusals), drift_cfg, base_ratio)
    return VetReport(str(info.path), drift, refusals, answers, v, judge.id, time.perf_counter() - t0, base_ratio)
