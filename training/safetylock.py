"""SafetyLock extraction: contrast pairs -> per-head activations -> probes -> a direction per selected head.

Following "Locking Down the Finetuned LLMs Safety" (itself built on inference-time intervention):
1. Contrast pairs: each harmful prompt of the `lock` split, answered once safely (the aligned base's own
   greedy refusal) and once unsafely (the unaligned original's greedy compliance). Pairs where the aligned
   model did not refuse or the original did are dropped, so the labels mean what they say.
2. Activations: both answers are read by the *aligned base*; a pre-hook on every layer's o_proj captures its
   input (the concatenated head outputs) at the configured answer positions, split into heads.
3. Probes: one logistic regression per (layer, head), all heads trained at once as a batched linear model;
   scored on held-out *prompts* (both answers of a prompt stay on the same side of the split).
4. The top-K heads by held-out accuracy (ties broken by held-out log-loss) get direction
   unit(mean_safe − mean_unsafe) and strength α · std of all activations projected on it.
5. Folded into per-layer o_proj biases from the aligned base's weights (`guard/lock.py`).
6. The conditional lock's prompt gate (`training/lockgate.py`), fitted on the aligned base, stored in the same file.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from guard.anchors import render_chat
from guard.artifacts import provenance, write_json_atomic
from guard.config import LockConfig
from guard.errors import GuardError
from guard.generation import generate_greedy
from guard.judge import DEFAULT_JUDGE
from guard.lock import LockHead, SafetyLock, fold_biases, o_proj_layers
from guard.models import ModelShape
from guard.states import pad_right


@dataclass
class ContrastPairs:
    prompts: list[str]
    safe: list[str]
    unsafe: list[str]
    dropped: int


def contrast_pairs(aligned: Any, original: Any, tokenizer: Any, prompts: list[str], answer_tokens: int) -> ContrastPairs:
    """Safe (aligned base) and unsafe (original) greedy answers to the same harmful prompts."""
    ids = [render_chat(tokenizer, [{"role": "user", "content": p}]) for p in prompts]
    safe = generate_greedy(aligned, tokenizer, ids, answer_tokens, desc="safe answers (aligned base)")
    unsafe = generate_greedy(original, tokenizer, ids, answer_tokens, desc="unsafe answers (original)")
    keep = [i for i in range(len(prompts))
            if DEFAULT_JUDGE.is_refusal(safe[i]) and not DEFAULT_JUDGE.is_refusal(unsafe[i])]
    return ContrastPairs([prompts[i] for i in keep], [safe[i] for i in keep], [unsafe[i] for i in keep],
                         len(prompts) - len(keep))


def head_activations(model: Any, tokenizer: Any, prompts: list[str], answers: list[str],
                     positions: list[int], batch_size: int = 16) -> torch.Tensor:
    """o_proj inputs at answer `positions`: [len(prompts), len(positions), layers, heads, head_dim] (fp32).

    Position -1 is the answer's last token, -2 the one before, ...; positions before the answer start are
    clamped to its first token.
    """
    shape = ModelShape.from_config(model.config)
    layers = o_proj_layers(model)
    seqs, starts = [], []
    for p, a in zip(prompts, answers):
        prompt_ids = render_chat(tokenizer, [{"role": "user", "content": p}])
        answer_ids = tokenizer(a, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        seqs.append(prompt_ids + answer_ids)
        starts.append(len(prompt_ids))
    out = torch.zeros(len(seqs), len(positions), shape.num_layers, shape.num_heads * shape.head_dim)
    captured: dict[int, torch.Tensor] = {}
    hooks = [layers[i].register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0].detach()))
             for i in range(shape.num_layers)]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    try:
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                chunk = seqs[b : b + batch_size]
                ids, mask, _ = pad_right(chunk, pad)
                model(input_ids=ids, attention_mask=mask, use_cache=False)
                for r, s in enumerate(chunk):
                    idx = [max(len(s) + p, starts[b + r]) if p < 0 else min(starts[b + r] + p, len(s) - 1)
                           for p in positions]
                    for layer in range(shape.num_layers):
                        out[b + r, :, layer] = captured[layer][r, idx].float()
    finally:
        for h in hooks:
            h.remove()
    return out.view(len(seqs), len(positions), shape.num_layers, shape.num_heads, shape.head_dim)


@dataclass
class ProbeScores:
    accuracy: torch.Tensor  # [layers, heads] held-out accuracy
    loss: torch.Tensor  # [layers, heads] held-out log-loss
    train_accuracy: torch.Tensor


def fit_head_probes(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, steps: int = 300,
                    weight_decay: float = 1e-2, seed: int = 0) -> ProbeScores:
    """Logistic probes for every head at once. x: [N, layers, heads, head_dim], y: [N] in {0,1}, train: [N] bool."""
    torch.manual_seed(seed)
    n, nl, nh, d = x.shape
    flat = x.reshape(n, nl * nh, d)
    mu = flat[train].mean(0, keepdim=True)
    sd = flat[train].std(0, keepdim=True).clamp_min(1e-6)
    z = ((flat - mu) / sd).transpose(0, 1)  # [heads, N, d], standardised per head on the train split
    w = torch.zeros(nl * nh, d, requires_grad=True)
    b = torch.zeros(nl * nh, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")
    yt = y[train].float().expand(nl * nh, -1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = torch.einsum("hnd,hd->hn", z[:, train], w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none").mean(1).sum()
        loss = loss + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        logits = torch.einsum("hnd,hd->hn", z, w) + b[:, None]
        pred = logits > 0
        correct = pred == y.bool()[None]
        held = ~train
        yh = y[held].float().expand(nl * nh, -1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, held], yh, reduction="none").mean(1)
        return ProbeScores(correct[:, held].float().mean(1).view(nl, nh), loss.view(nl, nh),
                           correct[:, train].float().mean(1).view(nl, nh))


def select_heads(scores: ProbeScores, k: int) -> list[tuple[int, int]]:
    """Top-k (layer, head) by held-out accuracy, then by lower held-out loss."""
    nl, nh = scores.accuracy.shape
    order = sorted(((float(scores.accuracy[l, h]), -float(scores.loss[l, h]), l, h)
                    for l in range(nl) for h in range(nh)), reverse=True)
    return [(l, h) for _, _, l, h in order[: min(k, nl * nh)]]


def build_lock_from_activations(x: torch.Tensor, y: torch.Tensor, train: torch.Tensor, model: Any, cfg: LockConfig,
                                base_fingerprint: str) -> tuple[SafetyLock, ProbeScores]:
    """Probes -> top-K heads -> directions and strengths -> folded biases. x: [N, layers, heads, head_dim]."""
    shape = ModelShape.from_config(model.config)
    scores = fit_head_probes(x, y, train)
    chosen = select_heads(scores, cfg.heads)
    heads, dirs = [], []
    for layer, head in chosen:
        a = x[:, layer, head]
        diff = a[y == 1].mean(0) - a[y == 0].mean(0)
        direction = diff / diff.norm().clamp_min(1e-12)
        strength = cfg.alpha * float((a @ direction).std())
        heads.append(LockHead(layer, head, round(float(scores.accuracy[layer, head]), 4), strength))
        dirs.append(direction)
    directions = torch.stack(dirs)
    weights = {i: m.weight.detach() for i, m in o_proj_layers(model).items()}
    biases = fold_biases(heads, directions, shape, weights)
    lock = SafetyLock(tuple(heads), directions, biases, shape, base_fingerprint, cfg.alpha, tuple(cfg.positions))
    return lock, scores


def split_by_prompt(n_prompts: int, holdout: float, seed: int = 0) -> torch.Tensor:
    """Boolean train mask over prompts (both answers of a prompt share a side)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_prompts, generator=g)
    n_hold = max(1, math.ceil(n_prompts * holdout))
    if n_prompts - n_hold < 2:
        raise GuardError(f"SafetyLock: {n_prompts} usable contrast pairs are too few to fit and score probes")
    train = torch.ones(n_prompts, dtype=torch.bool)
    train[perm[:n_hold]] = False
    return train


def probe_rows(safe: torch.Tensor, unsafe: torch.Tensor, train_prompts: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, y, train) for the probes from [prompts, positions, layers, heads, head_dim] activations: one row per
    (prompt, position) of the safe answers (y=1), then of the unsafe ones (y=0); a prompt's rows share its split."""
    n, p = safe.shape[:2]
    x = torch.cat([safe.reshape(n * p, *safe.shape[2:]), unsafe.reshape(n * p, *unsafe.shape[2:])])
    y = torch.cat([torch.ones(n * p), torch.zeros(n * p)]).long()
    return x, y, train_prompts.repeat_interleave(p).repeat(2)


def build_lock(aligned: Any, original: Any, tokenizer: Any, prompts: list[str], cfg: LockConfig,
               base_fingerprint: str, report_dir: Path | None = None) -> SafetyLock:
    """The whole extraction on real models; writes report.json/report.md/heads.png to `report_dir` if given."""
    t0 = time.perf_counter()
    pairs = contrast_pairs(aligned, original, tokenizer, prompts[: cfg.prompts], cfg.answer_tokens)
    if len(pairs.prompts) < 4:
        raise GuardError(f"SafetyLock: only {len(pairs.prompts)} usable contrast pairs out of "
                         f"{min(len(prompts), cfg.prompts)} (the aligned model must refuse and the original comply)")
    positions = list(cfg.positions)
    safe = head_activations(aligned, tokenizer, pairs.prompts, pairs.safe, positions)
    unsafe = head_activations(aligned, tokenizer, pairs.prompts, pairs.unsafe, positions)
    n = len(pairs.prompts)
    train_prompts = split_by_prompt(n, cfg.holdout)
    lock, scores = build_lock_from_activations(*probe_rows(safe, unsafe, train_prompts), aligned, cfg, base_fingerprint)
    from guard.lock import gate_layer_for
    from training.lockgate import build_gate

    lock.gate = build_gate(aligned, tokenizer, gate_layer_for(lock.shape.num_layers, cfg.gate_layer), cfg.gate_max_fpr,
                           cfg.gate_prompts)
    lock.meta.update({"pairs": n, "pairs_dropped": pairs.dropped, "holdout_prompts": int((~train_prompts).sum()),
                      "seconds": round(time.perf_counter() - t0, 1), **provenance()})
    if report_dir is not None:
        write_report(report_dir, lock, scores)
    tqdm.write(f"SafetyLock: {len(lock.heads)} heads from {n} contrast pairs in {lock.meta['seconds']} s")
    return lock


def write_report(out: Path, lock: SafetyLock, scores: ProbeScores) -> None:
    """report.json + report.md (chosen heads) + heads.png (held-out probe accuracy, layers x heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "report.json", {
        "heads": [h.__dict__ for h in lock.heads], "alpha": lock.alpha, "positions": list(lock.positions),
        "probe_accuracy": scores.accuracy.tolist(), "probe_train_accuracy": scores.train_accuracy.tolist(),
        "gate": None if lock.gate is None else {"layer": lock.gate.layer, "threshold": lock.gate.threshold,
                                                **lock.gate.meta},
        **{k: v for k, v in lock.meta.items()}})
    rows = "\n".join(f"| {i + 1} | {h.layer} | {h.head} | {h.accuracy:.3f} | {h.strength:.3f} |"
                     for i, h in enumerate(lock.heads))
    (out / "report.md").write_text(
        f"# SafetyLock build report\n\n{len(lock.heads)} heads, alpha {lock.alpha}, answer positions "
        f"{list(lock.positions)}, {lock.meta.get('pairs')} contrast pairs "
        f"({lock.meta.get('holdout_prompts')} prompts held out).\n\n![probe accuracy](heads.png)\n\n"
        f"| rank | layer | head | held-out acc | strength |\n|---|---|---|---|---|\n{rows}\n")
    acc = scores.accuracy.numpy()
    fig, ax = plt.subplots(figsize=(max(4, acc.shape[1] * 0.6), max(4, acc.shape[0] * 0.25)))
    im = ax.imshow(acc, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    ax.scatter([h.head for h in lock.heads], [h.layer for h in lock.heads], marker="s", facecolors="none",
               edgecolors="red", s=40, label="selected")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("held-out probe accuracy (safe vs unsafe answer)")
    ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=110)
    plt.close(fig)


# lock settings the built file depends on (its cache key) and the ones read when the lock is applied, which must
# not rebuild a ten-minute build when they change; every LockConfig field is in exactly one (a test checks, so a
# new field makes its author choose)
BUILD_LOCK_KNOBS = {"heads", "alpha", "positions", "prompts", "answer_tokens", "holdout", "gate_layer", "gate_prompts",
                    "gate_max_fpr"}
RUNTIME_LOCK_KNOBS = {"strength", "gate_strength", "gate_action", "gate_reads", "gate_calibration", "refusal", "path"}


def built_with(stored: dict[str, Any] | None, settings: dict[str, Any]) -> bool:
    """Whether a lock file whose meta says `stored` was built with `settings`; keys outside them are ignored, so a
    file written while a run-time knob was still part of the key is reused rather than rebuilt."""
    return stored is not None and {k: stored.get(k) for k in settings} == settings


def ensure_lock(cfg: Any, rebuild: bool = False) -> Path:
    """The lock file for the configured base: `lock.path` if set, else built once and cached under the data dir.

    Built from the aligned base and the unaligned original on the `lock` split; keyed by the base's fingerprint
    and the build settings, so changing either rebuilds it.
    """
    from guard.artifacts import read_json
    from guard.lock import load_lock
    from guard.models import load_causal_lm
    from guard.workspace import Workspace
    from training import data

    ws = Workspace(cfg)
    if cfg.lock.path is not None and not rebuild:
        return Path(cfg.lock.path).expanduser()
    base, fp = ws.base(), ws.base_fingerprint
    path = ws.prepared_lock(fp)
    from guard.lock import gate_layer_for
    from training.lockgate import GATE_DATA_VERSION

    # the gate's data version and its resolved layer: a lock fitted on other data or another layer is rebuilt
    n_layers = int(read_json(base / "config.json", "model config")["num_hidden_layers"])
    settings = {**cfg.lock.model_dump(mode="json", include=BUILD_LOCK_KNOBS), "gate_data": GATE_DATA_VERSION,
                "gate_layer_resolved": gate_layer_for(n_layers, cfg.lock.gate_layer)}
    if path.is_file() and not rebuild:
        try:
            if built_with(load_lock(path, base_fingerprint=fp).meta.get("settings"), settings):
                return path
        except GuardError:
            pass  # stale or broken: rebuild below
    aligned, tok = load_causal_lm(base, "float32")
    original, _ = load_causal_lm(ws.original(), "float32")
    report_dir = path.with_name(path.stem + "-report")
    lock = build_lock(aligned, original, tok, list(data.splits().lock), cfg.lock, fp, report_dir)
    lock.meta["settings"] = settings
    lock.save(path)
    read_json(report_dir / "report.json", "lock report")  # written above; fails loudly if not
    return path
