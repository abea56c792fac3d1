"""Anchor prompt sets: a few harmful *requests* whose hidden states stand for the model's safety behaviour.

The bundled set (`anchor_sets/default.jsonl`) is the `anchors` split of the harmful-prompt pool made by
`training/data.py` (AdvBench requests, never answers); a test keeps the two in step and proves the split
never overlaps the alignment, attack or evaluation prompts. Rendering goes through the model's own chat
template with the generation prompt appended, exactly as a chat-completions request is rendered, so that
training (SBR), the offline reference cache and the live probe all see the same token ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from guard.artifacts import sha256_text
from guard.errors import GuardError


@dataclass(frozen=True)
class AnchorSet:
    name: str
    prompts: tuple[str, ...]
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        if not self.prompts:
            raise GuardError(f"anchor set '{self.name}' is empty")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise GuardError(f"anchor set '{self.name}': prompt {i} is empty or not a string")

    @property
    def hash(self) -> str:
        """Content hash: the same prompts and system prompt give the same hash whatever the set is called."""
        return sha256_text("anchors/v1", self.system_prompt or "<template-default>", *self.prompts)

    def messages(self, prompt: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt is not None else []
        return msgs + [{"role": "user", "content": prompt}]

    def render(self, tokenizer: Any) -> list[list[int]]:
        """Token ids of every anchor, chat-templated with the generation prompt appended."""
        return [render_chat(tokenizer, self.messages(p)) for p in self.prompts]

    def __len__(self) -> int:
        return len(self.prompts)


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise GuardError("the tokenizer has no chat template; safety-guard needs a chat model")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def bundled_sets() -> list[str]:
    root = resources.files("guard") / "anchor_sets"
    return sorted(p.name.removesuffix(".jsonl") for p in root.iterdir() if p.name.endswith(".jsonl"))


def read_prompts_jsonl(path: Path) -> list[str]:
    """Prompts from a JSONL file of {"prompt": ...} objects; names the bad line on error."""
    prompts: list[str] = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GuardError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise GuardError(f"{path}:{n}: expected an object with a non-empty string 'prompt'")
        prompts.append(obj["prompt"])
    return prompts


def load_anchor_set(name_or_path: str = "default", k: int | None = None, system_prompt: str | None = None) -> AnchorSet:
    """A bundled set by name or a JSONL file by path; the first `k` prompts (all when None)."""
    if name_or_path in bundled_sets():
        path = Path(str(resources.files("guard") / "anchor_sets" / f"{name_or_path}.jsonl"))
        name = name_or_path
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise GuardError(
                f"anchor set '{name_or_path}' is neither a bundled set ({', '.join(bundled_sets())}) nor a file"
            )
        name = path.stem
    prompts = read_prompts_jsonl(path)
    if k is not None:
        if k > len(prompts):
            raise GuardError(f"anchor set '{name}' has {len(prompts)} prompts, fewer than the k={k} asked for")
        prompts = prompts[:k]
    return AnchorSet(name=name, prompts=tuple(prompts), system_prompt=system_prompt)


def from_config(cfg: Any) -> AnchorSet:
    """The probe anchors a GuardConfig names (its `anchors` section): what vet, the gate and the gauge read."""
    a = cfg.anchors
    return load_anchor_set(a.set, a.k, a.system_prompt)


def shared_prompts(a: str, b: str) -> list[str]:
    """Prompts two anchor sets (bundled names or paths) have in common, whitespace- and case-insensitively.
    A set that cannot be read yet (a path that does not exist) shares nothing here; loading it fails later."""
    def norm(p: str) -> str:
        return " ".join(p.lower().split())

    try:
        pa, pb = load_anchor_set(a).prompts, load_anchor_set(b).prompts
    except GuardError:
        return []
    other = {norm(p) for p in pb}
    return [p for p in pa if norm(p) in other]
