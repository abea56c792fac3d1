"""Can a user walk a harmful request past the conditional lock's prompt gate by dressing it up?

The gate ships with the package (it is rebuilt from package data), so an attacker can score their own requests
with it and send each in the framing it scores lowest. This bench measures exactly that attacker on the aligned
base, at the base's threshold: for every harmful prompt, the gate's score plain and in each framing of
`lab.redteam.DODGE_FRAMES` (ordinary framings no training or evaluation set of this repository contains), and the
share still flagged when each prompt is sent in its lowest-scoring framing. Scoring only, no generation (a
request the gate does not flag is served by whatever adapter it was sent to, so "not flagged" is the whole attack).

Sets: `dev` = pyrit's red-team objectives and the dev third of its scorer objectives (neither trains the gate,
the base or SBR); `eval` = the StrongREJECT eval split (the held-out harmful set every report uses).
Writes bench/results/gate_framing.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from common import load_gated_base, run_cli, write_result  # noqa: E402  (bench/common.py puts the repo root on sys.path)


def framing_report(prompts: list[str], scores: Any, threshold: float, frames: tuple[str, ...]) -> dict[str, Any]:
    """Flag rates from a [len(prompts), len(frames)] score matrix (frames[0] is the plain prompt)."""
    flagged = scores > threshold
    best = scores.min(dim=1).values
    return {
        "n": len(prompts),
        "flagged_plain": round(100.0 * flagged[:, 0].float().mean().item(), 2),
        "flagged_by_frame": {f: round(100.0 * flagged[:, j].float().mean().item(), 2) for j, f in enumerate(frames)},
        "flagged_best_frame": round(100.0 * (best > threshold).float().mean().item(), 2),
        "mean_score_plain": round(scores[:, 0].mean().item(), 3),
        "mean_score_best_frame": round(best.mean().item(), 3),
    }


def main(config: Annotated[Path | None, typer.Option(help="safety-guard config (default: built-in).")] = None) -> None:
    from guardcli.common import setup
    from lab.redteam import DODGE_FRAMES, framing_scores
    from training import data
    from training.lockgate import GATE_DATA_VERSION

    model, tok, lock, fp = load_gated_base(setup(config))
    gate = lock.gate
    sets = {"dev": list(data.airt_harmful()) + list(data.scorer_split("dev")), "eval": list(data.splits().eval)}
    out: dict[str, Any] = {"base_fingerprint": fp, "gate_data": GATE_DATA_VERSION, "gate_layer": gate.layer,
                           "threshold": round(float(gate.threshold), 4), "frames": list(DODGE_FRAMES), "sets": {}}
    for name, prompts in sets.items():
        scores = framing_scores(prompts, model, tok, gate, DODGE_FRAMES, desc=f"gate_framing: {name}")
        out["sets"][name] = framing_report(prompts, scores, float(gate.threshold), DODGE_FRAMES)
        print(name, {k: v for k, v in out["sets"][name].items() if k != "flagged_by_frame"})
    write_result("gate_framing", out)


if __name__ == "__main__":
    run_cli(lambda: typer.run(main))
