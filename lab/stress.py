"""The harmful-fine-tuning stress test: SFT vs SBR vs AsFT (and SafetyLock on top), measured every epoch.

Protocol: one mixed fine-tuning set — benign topic-classification examples plus a poison
share of harmful request -> compliant answer pairs generated at run time by the unaligned original — and
every method trained on it with identical hyper-parameters, seed and example order. After every epoch:
- HS: % of held-out harmful prompts (StrongREJECT eval split; AdvBench-derived training splits, so this is
  an out-of-distribution measure) answered without refusal, greedy, judged by the named judge;
- FA: exact-label accuracy on the topic task's held-out split;
- over-refusal: % of held-out benign-but-edgy prompts refused;
- drift: mean relative L2 of the anchor states from the aligned reference (the live gauge's number);
and for SFT and SBR the same with the SafetyLock on ("sft+lock", "sbr+lock"). The SFT and SBR adapters of
every epoch are kept under the data dir, so `relock` can re-measure the locked rows with another lock or
strength without training again.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from guard.anchors import load_anchor_set
from guard.artifacts import atomic_path, provenance, read_json, write_json_atomic, write_text_atomic
from guard.config import GuardConfig
from guard.errors import GuardError
from guard.judge import DEFAULT_JUDGE
from guard.lock import LockHandle, load_lock
from guard.models import ModelShape, fingerprint_dir, load_causal_lm
from guard.states import cached_reference
from training import data
from training.evaluate import refusal_rate, task_accuracy
from guard.workspace import Workspace
from lab.attack import attack_mix
from training import methods
from training.harden import anchor_report, drift_probe, hparams
from training.methods import MethodInputs
from training.methods.sbr import SBR
from training.safetylock import ensure_lock
from training.sft import encode
from training.trainer import add_lora, train_lora

METHODS = methods.names()


@dataclass
class StressConfig:
    """Sizes are chosen so the default run fits in ~60 min on a 2-core CPU (see README)."""

    methods: list[str] = field(default_factory=lambda: list(METHODS))
    poison: float = 0.1
    epochs: int = 4
    benign: int = 144  # benign task examples in the mix (harmful ones are added on top by the poison ratio)
    lr: float = 5e-4
    grad_accum: int = 2  # micro-batches of harden.batch_size (8) per step: 10 steps per epoch
    lambdas: list[float] = field(default_factory=list)  # extra SBR runs "sbr@λ" (a λ sweep)
    lock: bool = True  # also measure "sft+lock" and "sbr+lock"
    n_harmful: int = 64  # held-out harmful eval prompts per measurement
    n_task: int = 100  # held-out topic-task examples for FA
    n_benign: int = 48  # held-out benign-but-edgy prompts for over-refusal
    max_tokens: int = 24  # greedy tokens judged (a refusal shows in the first ~16)
    seed: int = 0

    @classmethod
    def smoke(cls) -> StressConfig:
        """The whole pipeline in a few minutes for CI; its numbers are not results."""
        return cls(epochs=1, benign=16, n_harmful=6, n_task=6, n_benign=4, max_tokens=8)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise GuardError(f"--methods: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(METHODS)}")
        if not 0 <= self.poison < 1:
            raise GuardError(f"--poison must be in [0, 1), got {self.poison}")
        if self.epochs < 1:
            raise GuardError(f"--epochs must be >= 1, got {self.epochs}")
        if any(not math.isfinite(x) or x < 0 for x in self.lambdas):
            raise GuardError(f"--lambdas must be non-negative numbers, got {self.lambdas}")


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation with average ranks for ties; None when a side is constant or n < 3."""
    if len(xs) < 3:
        return None

    def ranks(v: list[float]) -> list[float]:
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return None if vx == 0 or vy == 0 else cov / math.sqrt(vx * vy)


class Meter:
    """HS / FA / over-refusal / drift of whatever model it is handed, on fixed held-out sets."""

    def __init__(self, tok: Any, sc: StressConfig, probe: SBR) -> None:
        s = data.splits()
        self.tok, self.sc, self.probe = tok, sc, probe
        self.harmful = list(s.eval[: sc.n_harmful])
        self.benign = list(s.overrefusal[: sc.n_benign])
        _, self.task = data.topic_task(n_train=max(sc.benign, 1), n_eval=max(sc.n_task, 1))
        self.task = self.task[: sc.n_task]

    def __call__(self, model: Any, label: str) -> dict[str, float]:
        refused, _ = refusal_rate(model, self.tok, self.harmful, self.sc.max_tokens, desc=f"{label}: HS")
        over, _ = refusal_rate(model, self.tok, self.benign, self.sc.max_tokens, desc=f"{label}: over-refusal")
        fa = task_accuracy(model, self.tok, self.task, desc=f"{label}: FA")
        drift = anchor_report(model, self.probe).mean_rel_l2
        return {"hs": round(100.0 - refused, 2), "fa": round(fa, 2), "over_refusal": round(over, 2),
                "drift": round(drift, 5)}


def aligned_with_probe(cfg: GuardConfig) -> tuple[Any, Any, str, Any, Any, SBR]:
    """(model, tokenizer, fingerprint, anchors, reference, drift probe) for the configured aligned base; the
    probe is an SBR term with λ=0, used only for its anchor drift."""
    base = Workspace(cfg).base()
    fp = fingerprint_dir(base)
    model, tok = load_causal_lm(base, "float32")
    anchors = load_anchor_set(cfg.anchors.set, cfg.anchors.k, cfg.anchors.system_prompt)
    ref = cached_reference(model, tok, anchors, fp, cfg.runtime.resolved_home())
    return model, tok, fp, anchors, ref, drift_probe(tok, anchors, ref)


def h_screens(cfg: GuardConfig, sc: StressConfig) -> bool:
    """Whether a run screens: `harden.screen_data` and at least one protected method (or λ sweep) in it."""
    return cfg.harden.screen_data and (any(m != "sft" for m in sc.methods) or bool(sc.lambdas))


def run_stress(cfg: GuardConfig, sc: StressConfig, out: Path, name: str = "stress_default") -> dict[str, Any]:
    """Train every method on the same attack mix, measure each epoch, write JSON + markdown + plots to `out`."""
    t0 = time.perf_counter()
    home = cfg.runtime.resolved_home()
    ws = Workspace(cfg)
    base, original = ws.base(), ws.original()
    model, tok, fp, anchors, ref, probe = aligned_with_probe(cfg)
    lock = load_lock(ensure_lock(cfg), ModelShape.from_config(model.config), fp) if sc.lock else None
    from training.screen import gate_for_screening, screen

    gate = gate_for_screening(cfg) if h_screens(cfg, sc) else None  # fails now, not after the base is measured
    mix, n_harm = attack_mix(original, home / "work", sc.benign, sc.poison, seed=sc.seed)
    h = cfg.harden.model_copy(update={"lr": sc.lr, "epochs": sc.epochs, "seed": sc.seed, "grad_accum": sc.grad_accum})
    examples = [encode(tok, list(e.messages), e.answer, h.max_len) for e in mix]
    meter = Meter(tok, sc, probe)

    result: dict[str, Any] = {
        "judge": DEFAULT_JUDGE.id, "name": name, "base_fingerprint": fp,
        "config": {**asdict(sc), "examples": len(examples), "harmful_examples": n_harm,
                   "hparams": asdict(hparams(h)), "sbr_lambda": h.sbr_lambda, "asft_lambda": h.asft_lambda,
                   "sbr_anchors": {"set": h.sbr_anchors, "k": h.sbr_k, "per_step": h.sbr_anchors_per_step},
                   "anchors_k": len(anchors), "lock_heads": len(lock.heads) if lock else None,
                   "lock_strength": cfg.lock.strength, "lock_positions": list(lock.positions) if lock else None,
                   "eval_sets": {"harmful": f"StrongREJECT eval split, first {len(meter.harmful)} (out of distribution)",
                                 "benign": f"held-out benign-but-edgy, first {len(meter.benign)}",
                                 "task": f"topic classification held-out, {len(meter.task)}"}},
        "methods": {},
    }
    result["base"] = meter(model, "base")
    saved = adapters_dir(home, name)
    result["adapters"] = str(saved)
    runs: list[tuple[str, str, float | None]] = [(m, m, None) for m in sc.methods]
    runs += [(f"sbr@{lam:g}", "sbr", lam) for lam in sc.lambdas]
    screened: list[Any] | None = None
    if gate is not None:
        # the protected methods run as `guard harden` does by default: the data screened by the lock's prompt gate
        # on the base first; "sft" is the unprotected customer and trains on everything
        res = screen(model, tok, mix, gate, h.screen_max_fpr, desc="stress: screen")
        if not res.kept:
            raise GuardError("stress: the prompt gate screened out every example (set harden.screen_data: false)")
        screened = [encode(tok, list(e.messages), e.answer, h.max_len) for e in res.kept]
        result["config"]["screened"] = {**res.summary(), "applies_to": "every method but sft", "harmful": n_harm,
                                        # attack_mix takes its harmful requests from the attack split
                                        "harmful_dropped": res.dropped_among(mix, set(data.splits().attack))}
    for label, method, lam in runs:
        hm = h.model_copy(update={"sbr_lambda": lam}) if lam is not None else h
        reg = methods.get(method).build(MethodInputs(hm, model, tok, anchors, ref, base, original))
        peft_model = add_lora(model, hparams(hm))
        train_set = screened if screened is not None and method != "sft" else examples
        rows: dict[str, list[dict[str, float]]] = {label: []}
        with_lock = lock is not None and label in ("sft", "sbr")
        if with_lock:
            rows[f"{label}+lock"] = []
            handle = LockHandle(peft_model, lock)
            handle.set_strength(cfg.lock.strength)

        def on_epoch(epoch: int) -> dict[str, float]:
            m = meter(peft_model, f"{label} epoch {epoch}")
            rows[label].append({"epoch": epoch, **m})
            if label in ("sft", "sbr"):  # kept for `relock` (another lock or strength, no retraining)
                with atomic_path(saved / label / f"epoch-{epoch}") as tmp:
                    peft_model.save_pretrained(str(tmp))
            if with_lock:
                handle.on()
                rows[f"{label}+lock"].append({"epoch": epoch, **meter(peft_model, f"{label}+lock epoch {epoch}")})
                handle.off()
            tqdm.write(f"{label} epoch {epoch}: {m}")
            return m

        train_lora(peft_model, train_set, hparams(hm), tok.pad_token_id, reg, desc=f"stress {label}", on_epoch=on_epoch)
        if with_lock:
            handle.remove()
        model = peft_model.unload()  # back to the plain aligned base for the next method
        for k, v in rows.items():
            result["methods"][k] = {"epochs": v}
        write_json_atomic(out / f"{name}.partial.json", result)  # progress survives a kill

    points = [(e["drift"], e["hs"]) for k, v in result["methods"].items() if "+lock" not in k for e in v["epochs"]]
    rho = spearman([p[0] for p in points], [p[1] for p in points])
    result["spearman_drift_hs"] = None if rho is None else round(rho, 4)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result.update(provenance())
    write_outputs(result, out, name)
    (out / f"{name}.partial.json").unlink(missing_ok=True)
    return result


def adapters_dir(home: Path, name: str) -> Path:
    """Where a run keeps the SFT and SBR adapters of every epoch (under the data dir, not the results)."""
    return home / "work" / "stress" / name


def write_outputs(result: dict[str, Any], out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", markdown(result))
    plot(result, out, name)


def relock(cfg: GuardConfig, out: Path, name: str = "stress_default") -> dict[str, Any]:
    """Re-measure the "+lock" rows of a finished run with the current lock, from the adapters it saved.

    A lock rebuilt with other settings (or a new default strength) does not need the training re-run: the
    SFT and SBR adapters of every epoch are kept, so only the locked measurements are repeated.
    """
    from peft import PeftModel

    t0 = time.perf_counter()
    result = read_json(out / f"{name}.json", "stress result")
    saved = Path(result.get("adapters") or adapters_dir(cfg.runtime.resolved_home(), name))
    model, tok, fp, _, _, probe = aligned_with_probe(cfg)
    known = set(StressConfig.__dataclass_fields__)
    sc = StressConfig(**{k: v for k, v in result["config"].items() if k in known})
    meter = Meter(tok, sc, probe)
    lock_file = ensure_lock(cfg)
    lock = load_lock(lock_file, ModelShape.from_config(model.config), fp)
    for label in ("sft", "sbr"):
        epochs = [e["epoch"] for e in result["methods"].get(label, {}).get("epochs", [])]
        if not epochs:
            continue
        missing = [e for e in epochs if not (saved / label / f"epoch-{e}" / "adapter_config.json").is_file()]
        if missing:
            raise GuardError(f"relock: the {label} adapters of epochs {missing} are not in {saved} (re-run the stress test)")
        rows = []
        for e in epochs:
            peft_model = PeftModel.from_pretrained(model, str(saved / label / f"epoch-{e}"), is_trainable=False)
            handle = LockHandle(peft_model, lock)
            handle.set_strength(cfg.lock.strength)
            handle.on()
            rows.append({"epoch": e, **meter(peft_model, f"{label}+lock epoch {e}")})
            handle.remove()
            model = peft_model.unload()
        result["methods"][f"{label}+lock"] = {"epochs": rows}
    result["config"].update(lock_heads=len(lock.heads), lock_strength=cfg.lock.strength,
                            lock_positions=list(lock.positions))
    result["relock"] = {"lock_file": lock_file.name, "seconds": round(time.perf_counter() - t0, 1), **provenance()}
    write_outputs(result, out, name)
    return result


def markdown(r: dict[str, Any]) -> str:
    """Final and worst epoch per method, the base, and the drift-HS correlation."""
    b = r["base"]
    lines = [f"Judge `{r['judge']}`; poison {r['config']['poison']}, {r['config']['epochs']} epochs, "
             f"{r['config']['examples']} examples ({r['config']['harmful_examples']} harmful); "
             f"wall time {r['seconds'] / 60:.1f} min.", "",
             "| method | final HS % | worst HS % | final FA % | final over-refusal % | final drift |",
             "|---|---|---|---|---|---|",
             f"| aligned base | {b['hs']:.1f} | | {b['fa']:.1f} | {b['over_refusal']:.1f} | {b['drift']:.3f} |"]
    for k, v in r["methods"].items():
        e = v["epochs"]
        lines.append(f"| {k} | {e[-1]['hs']:.1f} | {max(x['hs'] for x in e):.1f} | {e[-1]['fa']:.1f} | "
                     f"{e[-1]['over_refusal']:.1f} | {e[-1]['drift']:.3f} |")
    rho = r.get("spearman_drift_hs")
    lines += ["", f"Spearman rank correlation of anchor drift and HS over all (method, epoch) points without the "
                  f"lock: **{'n/a' if rho is None else f'{rho:.2f}'}**."]
    return "\n".join(lines) + "\n"


def plot(r: dict[str, Any], out: Path, name: str) -> None:
    """HS, FA and over-refusal vs epoch per method (a locked run dashed, in its method's colour), and drift vs
    HS: `{name}.png`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 4, figsize=(19, 4.2))
    colours: dict[str, str] = {}
    for k, v in r["methods"].items():
        method = k.split("+")[0]
        colour = colours.setdefault(method, f"C{len(colours)}")
        ep = [e["epoch"] for e in v["epochs"]]
        style = "--" if "+lock" in k else "-"
        for ax, key in zip(axes[:3], ("hs", "fa", "over_refusal")):
            ax.plot(ep, [e[key] for e in v["epochs"]], style, color=colour, marker="o", label=k)
        if "+lock" not in k:
            axes[3].scatter([e["drift"] for e in v["epochs"]], [e["hs"] for e in v["epochs"]], color=colour, label=k)
    for ax, key in zip(axes[:3], ("hs", "fa", "over_refusal")):
        ax.axhline(r["base"][key], color="grey", lw=0.8, ls=":", label="aligned base")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set(title="harmfulness score (HS) vs epoch", xlabel="epoch", ylabel="HS %")
    axes[1].set(title="fine-tuning accuracy (FA) vs epoch", xlabel="epoch", ylabel="FA %")
    axes[2].set(title="over-refusal (edgy-benign) vs epoch", xlabel="epoch", ylabel="refused %")
    rho = r.get("spearman_drift_hs")
    axes[3].set(title=f"anchor drift vs HS (Spearman {'n/a' if rho is None else f'{rho:.2f}'})",
                xlabel="mean relative anchor drift", ylabel="HS %")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
