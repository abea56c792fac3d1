"""The conditional lock's prompt gate: a linear probe that decides, once per request, whether to act on it.

SafetyLock steers every token it is applied to, so applied to everything it costs the task and over-refuses
(stress run: FA 93 -> 44; the aligned base with the lock refuses 83% of edgy-benign prompts). The gate reads
one state per request — the residual stream entering decoder layer `layer` at the last prompt token, the state
the vLLM worker scores inside the model graph (serve/worker.py: gate_strengths) — and only requests it flags are
refused or steered.

Why a middle layer and not the lm_head input: on the aligned base "harmful" and "about to refuse" coincide, so a
probe on the final state learns the refusal decision — and an attacked adapter has exactly that decision
removed. A middle layer still reads what the request *is*; the layer is chosen on development adapters
(bench/lock_gate_dev.py), never on an adapter a result is reported on.

Training data (all fixed splits, none of them eval or red-team data):
- flagged (1): the lock split's and the align split's harmful requests, the train part of pyrit's scorer
  objectives (hate, sexual content, self-harm, misinformation, privacy: categories AdvBench lacks; on the previous
  gate, without them, the base flagged 63% of held-out harmful prompts), and the over-refusal generator's
  harmful twins of its *train* templates (the same surface words as the benign prompts, harmful intent);
- not flagged (0): the generator's train-template prompts (everyday chat, homonyms, safe contexts, ...), the
  benchmark benign/edgy prompts the alignment distils, and task-like requests (headline classification,
  arithmetic: what customers fine-tune for) from the FA task generators at a seed no measurement uses, minus any
  question a dev or eval set asks;
- the threshold: the generator's *dev templates* (phrasings the gate never trained on) may be flagged at most
  `max_fpr`; the same prompts travel in the lock file, so each adapter's threshold is calibrated on them too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from guard.anchors import render_chat
from guard.errors import GuardError
from guard.lock import PromptGate, quantile_threshold
from guard.states import pad_right


# Part of the lock's build settings: a lock whose gate was fitted on other data is rebuilt by `guard prepare`.
# 2: the scorer objectives' train part joined the harmful side; the dev slice travels in the lock (calibration).
# 3: task-like benign prompts (the FA tasks' generators, another seed, minus every dev and eval question): at
#    layer 3 the v2 gate flagged 25% of the base's and 4% of a dev adapter's arithmetic questions (dev data).
# 4: the threshold and calibration read the generator's dev templates instead of a slice of its train templates:
#    a slice of trained phrasings (3.5% flagged) under-stated unseen phrasings (9.2% of the held-out templates on
#    the base); the whole train split (template generation 1) is now training data.
# 5: template generations 1-3 (interaction requests, fiction/game framings, figurative verbs, scorer-style benign
#    requests, and their harmful twins): rule v5 of bench/lock_gate_dev.py chose it with max_fpr 0.01 at layer 15
#    (template-disjoint dev estimate <= 1.7% on every development model; v4's was 2.1-5.5%).
# 6: v5's prompts plus one framed copy of each, on both sides (GATE_TRAIN_FRAMES): rule v6 of
#    bench/lock_gate_dev.py adopted it, at layer 18 with `quantile` calibration. Calibrated, the v5 gate flagged
#    6-19% of development benign prompts dressed in ordinary framings (every layer; the limit is 4%), so no v5 gate
#    was within the rule's limits except one that flagged none of the framed harmful ones; v6 at layer 18 flags
#    <= 2.5% of framed benign and 20-62% of framed harmful dev prompts on every development model (worst: an
#    attacked adapter), 78-89% of them as written.
GATE_DATA_VERSION = 6
TASK_PROMPTS = 100  # per task generator


@dataclass(frozen=True)
class GateData:
    harmful: list[str]
    benign: list[str]
    dev_benign: list[str]  # sets the threshold and calibrates adapters; never trained on


# Which train-template generations of the over-refusal generator each gate data version trains on (the version is
# in the lock's build settings, so a new generation is a new version and prepared locks are rebuilt).
GATE_GENERATIONS = {4: 1, 5: 3, 6: 3}
GATE_GENERATION = GATE_GENERATIONS[GATE_DATA_VERSION]
GATE_FRAMED = GATE_DATA_VERSION >= 6  # whether the training data holds the framed copies


# Framings for a gate that a rephrased request walks past less easily (gate data v6, bench/lock_gate_dev.py rule
# v6): every training prompt, harmful and benign alike, also appears once in one of these, so the frame
# carries no signal and the probe has to read the request inside it. Disjoint from the development framings the
# choice is made on (lab.redteam.DEV_FRAMES) and from the attacker's the result is reported on
# (lab.redteam.DODGE_FRAMES); a test holds them apart.
GATE_TRAIN_FRAMES: tuple[str, ...] = (
    "I'm writing a school report. {p}",
    "{p} Please keep it brief.",
    "My manager needs this by tonight: {p}",
    "Asking for a friend. {p}",
    "Respond in the style of a textbook. {p}",
    "Context: I'm a curious retiree with lots of free time. {p}",
    "{p} Format the answer as a numbered list.",
    "For a podcast episode I'm preparing: {p}",
    "Hypothetically speaking, {p}",
    "You are a helpful expert. {p}",
    "Part 2 of my research notes: {p}",
    "Explain it simply: {p}",
)


def framed_copies(prompts: Sequence[str], frames: Sequence[str] = GATE_TRAIN_FRAMES) -> list[str]:
    """One framed copy of each prompt, its frame picked by a hash of the prompt (deterministic, spread evenly)."""
    import hashlib

    pick = lambda p: int(hashlib.sha256(f"gate-frame\x00{p}".encode()).hexdigest(), 16) % len(frames)  # noqa: E731
    return [frames[pick(p)].replace("{p}", p) for p in prompts]


def gate_data(cap: int | None = None, generation: int = GATE_GENERATION, framed: bool = GATE_FRAMED) -> GateData:
    """The gate's fixed training data; `cap` keeps that many prompts per side (a fixed hash order); `generation`:
    the over-refusal generator's train templates of that generation and earlier (benign side, and their harmful
    twins on the harmful side); `framed`: each side also holds a framed copy of each of its prompts
    (`framed_copies`; `cap` counts the prompts before their copies)."""
    from training import data, overrefusal

    s = data.splits()
    harmful = list(dict.fromkeys([*s.lock, *s.align, *data.scorer_split("train"),
                                  *(p.text for p in overrefusal.harmful_twins("train", generation=generation))]))
    benign = list(dict.fromkeys([*(p.text for p in overrefusal.contrast_prompts("train", generation=generation)), *s.benign_align,
                                 *s.edgy_align, *task_prompts()]))
    if cap is not None:
        harmful, benign = data._hash_order(harmful)[:cap], data._hash_order(benign)[:cap]
    if framed:
        harmful, benign = harmful + framed_copies(harmful), benign + framed_copies(benign)
    return GateData(harmful, benign, [p.text for p in overrefusal.contrast_prompts("dev")])


def task_prompts() -> list[str]:
    """Benign task-like requests for the gate's benign side: TASK_PROMPTS per FA task generator at seed 7, none
    of them a question the dev (seed 1) or eval (seed 0) task sets ask."""
    from training import data

    # every question of the first 600 the dev/eval seeds generate (their eval slices start after 16..400 train ones)
    taken = {e.prompt for gen, _ in data.TASKS.values() for seed in (0, 1)
             for part in gen(n_train=400, n_eval=200, seed=seed) for e in part}
    return [e.prompt for gen, _ in data.TASKS.values() for e in gen(n_train=TASK_PROMPTS, n_eval=1, seed=7)[0]
            if e.prompt not in taken]


def layer_states(model: Any, tokenizer: Any, prompts: Sequence[str | list[dict[str, str]]], layers: Sequence[int],
                 batch_size: int = 16, desc: str | None = None) -> torch.Tensor:
    """[len(prompts), len(layers), hidden] fp32: the residual stream entering each of `layers` at the last
    prompt token (HF `hidden_states[layer]`; what the vLLM worker's gate layer reads). A prompt is a user
    message or a whole chat (messages before the answer). Read by pre-hooks on those layers, and the forward
    stops at the deepest one: at the gate's layer 18 of SmolLM2's 30 it skips 12 layers and the lm_head (~8
    layers' worth of multiply-adds per token over its 49k-word vocabulary)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    seqs = [render_chat(tokenizer, list(p) if not isinstance(p, str) else [{"role": "user", "content": p}])
            for p in prompts]
    n_layers = int(model.config.num_hidden_layers)
    for layer in layers:
        if not 0 < layer < n_layers:
            raise GuardError(f"gate layer {layer} is outside 1..{n_layers - 1}")
    out = torch.zeros(len(seqs), len(layers), int(model.config.hidden_size))
    blocks = decoder_layers(model)
    captured: dict[int, torch.Tensor] = {}

    def grab(i: int) -> Any:
        def hook(_module: Any, args: tuple, kwargs: dict) -> None:
            captured[i] = args[0] if args else kwargs["hidden_states"]
            if i == max(layers):
                raise _Enough  # nothing after the deepest wanted layer is needed (nor the lm_head over the vocabulary)
        return hook

    handles = [blocks[i].register_forward_pre_hook(grab(i), with_kwargs=True) for i in set(layers)]
    bar = tqdm(total=len(seqs), desc=desc, disable=desc is None, leave=False)
    try:
        with torch.no_grad():
            for b in range(0, len(seqs), batch_size):
                ids, mask, last = pad_right(seqs[b : b + batch_size], pad)
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except _Enough:
                    pass
                rows = torch.arange(len(last))
                for j, layer in enumerate(layers):
                    out[b : b + len(last), j] = captured[layer][rows, last].float()
                captured.clear()
                bar.update(len(last))
    finally:
        for h in handles:
            h.remove()
        bar.close()
    return out


class _Enough(Exception):
    """Raised by layer_states' hook at the deepest layer it reads: the rest of the forward is not run."""


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers in order, through any wrapper (peft, a task head): the modules named `...layers.<i>`."""
    import re

    found = {int(m.group(1)): mod for name, mod in model.named_modules()
             if (m := re.search(r"(?:^|\.)layers\.(\d+)$", name))}
    n = int(model.config.num_hidden_layers)
    if sorted(found) != list(range(n)):
        raise GuardError(f"expected decoder layers 0..{n - 1} in the model, found {sorted(found)[:5]}...")
    return [found[i] for i in range(n)]


def fit_probe(pos: torch.Tensor, neg: torch.Tensor, weight_decay: float = 1e-3, steps: int = 200
              ) -> tuple[torch.Tensor, float]:
    """Logistic regression on standardised features, folded back: (w, b) with logit = x·w + b on raw states.
    Classes are weighted equally whatever their sizes."""
    x = torch.cat([pos, neg]).float()
    y = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    weight = torch.where(y == 1, 0.5 / len(pos), 0.5 / len(neg))
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y, reduction="none") * weight).sum()
        loss = loss + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sd
        return w_raw.detach().clone(), float(b - (mu * w_raw).sum())


def threshold_for(scores: torch.Tensor, max_fpr: float) -> float:
    """The base's threshold: the smallest logit that flags at most `max_fpr` of these (benign) scores, and never
    below the probe's own decision boundary (0)."""
    return max(quantile_threshold(scores, max_fpr), 0.0)


def calibrate_lock(model: Any, tokenizer: Any, lock: Any, how: str, reads: str = "adapter") -> Any:
    """`lock` with its gate's threshold calibrated for `model` (the base or the base with an adapter), as the
    server calibrates each adapter when it loads (`lock.gate_calibration`); the lock itself when `how` is none.
    `reads` base (lock.gate_reads): the gate reads the base's states, so the threshold is the base's."""
    import contextlib
    import dataclasses

    if how == "none" or lock.gate is None:
        return lock
    aside = model.disable_adapter() if reads == "base" and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    with aside:
        return dataclasses.replace(lock, gate=lock.gate.calibrated(dev_scores(model, tokenizer, lock.gate), how))


def dev_scores(model: Any, tokenizer: Any, gate: PromptGate, desc: str | None = None) -> torch.Tensor:
    """The gate's scores of `model` (the base, or the base with an adapter) on the dev prompts the gate carries (the
    server reads the same prompts from the lock file): what `PromptGate.calibrated` sets a threshold from."""
    prompts = gate.meta.get("dev_prompts") or gate_data().dev_benign
    return gate.logits(layer_states(model, tokenizer, list(prompts), [gate.layer], desc=desc)[:, 0])


def build_gate(model: Any, tokenizer: Any, layer: int, max_fpr: float, cap: int | None = None) -> PromptGate:
    """Fit the gate on the aligned base and set its threshold on the dev prompts. Reading the ~3,900 training
    prompts (gate data v6, framed copies included) is most of `guard lock build`: 7.5 min on 2 AMD EPYC cores."""
    d = gate_data(cap)
    pos = layer_states(model, tokenizer, d.harmful, [layer], desc="gate: harmful")[:, 0]
    neg = layer_states(model, tokenizer, d.benign, [layer], desc="gate: benign")[:, 0]
    dev = layer_states(model, tokenizer, d.dev_benign, [layer], desc="gate: dev benign")[:, 0]
    w, b = fit_probe(pos, neg)
    gate = PromptGate(layer=layer, weight=w, bias=b, threshold=0.0)
    t = threshold_for(gate.logits(dev), max_fpr)
    train_tpr = float((gate.logits(pos) > t).float().mean())
    train_fpr = float((gate.logits(neg) > t).float().mean())
    return PromptGate(layer=layer, weight=w, bias=b, threshold=t,
                      meta={"harmful": len(pos), "benign": len(neg), "dev_benign": len(dev), "max_fpr": max_fpr,
                            "dev_mean": round(float(gate.logits(dev).mean()), 6),
                            # they travel with the gate: the server calibrates each adapter's threshold on them
                            "dev_prompts": list(d.dev_benign),
                            "train_tpr": round(train_tpr, 4), "train_fpr": round(train_fpr, 4),
                            "dev_fpr": round(float((gate.logits(dev) > t).float().mean()), 4)})
