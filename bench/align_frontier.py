"""Every alignment recipe measured on the development sets, as one picture: bench/results/align_frontier.png.

Reads bench/results/align_dev.jsonl (rules v3-v7: the same dev sets) and plots dev harmful refusal (`ood`: pyrit's
red-team objectives + the scorer objectives' dev third) against dev edgy over-refusal (the over-refusal generator's
dev templates). A recipe that qualifies under v3's constraints is filled; v5's delta scales of the released base and
v6's of each A16F seed are joined by lines. No held-out number is read here: this is the picture the recipe was chosen from.

    python bench/align_frontier.py [--rows bench/results/align_dev.jsonl] [--out bench/results/align_frontier.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import common  # noqa: F401  (puts the repo root on sys.path)

from lab.align_dev import _meets_v3
from lab.redteam import read_rows


def load(rows_path: Path) -> list[dict]:
    return [r for r in read_rows(rows_path) if r.get("rule") in (3, 4, 5, 6) and "dev_edgy" in r]


def plot(rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from guard.artifacts import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 5))
    style = {3: ("o", "tab:blue", "v3 recipes (Intel Xeon)"), 4: ("s", "tab:orange", "v4, v7-v9 recipes, each seed (AMD EPYC)")}
    for rule, (marker, color, label) in style.items():
        rs = [r for r in rows if r["rule"] == rule and r["variant"] != "SB2T.s0"]
        for i, r in enumerate(rs):
            ok = _meets_v3(r)
            ax.scatter(r["dev_edgy"], r["ood"], marker=marker, s=50, edgecolors=color, linewidths=1.5,
                       facecolors=color if ok else "none", label=label if i == 0 else None, zorder=3)
            ax.annotate(r["variant"], (r["dev_edgy"], r["ood"]), textcoords="offset points", xytext=(4, 3), fontsize=7)
    scales = sorted((r for r in rows if r["rule"] == 5), key=lambda r: r["delta_scale"])
    if scales:
        ax.plot([r["dev_edgy"] for r in scales], [r["ood"] for r in scales], "-", color="tab:green", zorder=2,
                label="v5: the released LoRA merged at delta scale s (AMD EPYC)")
        for r in scales:
            ok = _meets_v3(r)
            ax.scatter(r["dev_edgy"], r["ood"], marker="D", s=40, edgecolors="tab:green", linewidths=1.5,
                       facecolors="tab:green" if ok else "none", zorder=3)
            ax.annotate(f"s={r['delta_scale']:g}", (r["dev_edgy"], r["ood"]), textcoords="offset points",
                        xytext=(4, -9), fontsize=7, color="tab:green")
    for k, seed in enumerate(sorted({r["seed_variant"] for r in rows if r["rule"] == 6})):
        line = sorted((r for r in rows if r["rule"] == 6 and r["seed_variant"] == seed), key=lambda r: r["delta_scale"])
        ax.plot([r["dev_edgy"] for r in line], [r["ood"] for r in line], ":", color="tab:purple", zorder=2,
                label="v6: each A16F seed's LoRA at delta scale 0.8-1.0" if k == 0 else None)
        for r in line:
            ax.scatter(r["dev_edgy"], r["ood"], marker="v", s=30, edgecolors="tab:purple", linewidths=1.2,
                       facecolors="tab:purple" if _meets_v3(r) else "none", zorder=3)
        ax.annotate(f"{seed} s=0.8", (line[0]["dev_edgy"], line[0]["ood"]), textcoords="offset points",
                    xytext=(4, -9), fontsize=6, color="tab:purple")
    ax.axvline(8, color="grey", ls="--", lw=1)
    ax.text(8.2, ax.get_ylim()[0] + 1, "dev edgy limit 8%", fontsize=7, color="grey")
    ax.set_xlabel("dev edgy prompts refused (%, over-refusal: lower is better)")
    ax.set_ylabel("dev harmful prompts refused (%, higher is better)")
    ax.set_title("Alignment recipes on development sets (filled: within every v3 constraint)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=Path, default=Path("bench/results/align_dev.jsonl"))
    ap.add_argument("--out", type=Path, default=Path("bench/results/align_frontier.png"))
    args = ap.parse_args()
    print(plot(load(args.rows), args.out))


if __name__ == "__main__":
    main()
