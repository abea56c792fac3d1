"""Users' fine-tuning data: JSONL of chat `messages` or `prompt`/`response` pairs, validated line by line.

Every error names the file and line, and nothing is trained or written until the whole file parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from guard.errors import GuardError

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatExample:
    messages: tuple[dict[str, str], ...]  # the chat before the trained answer
    answer: str


def _parse(obj: object, where: str) -> ChatExample:
    if not isinstance(obj, dict):
        raise GuardError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise GuardError(f"{where}: 'messages' must be a list of at least a user and an assistant message")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise GuardError(f"{where}: messages[{i}] needs a role in {ROLES} and a string content")
        if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
            raise GuardError(f"{where}: the last message must be a non-empty assistant answer (the trained turn)")
        if not any(m["role"] == "user" for m in msgs[:-1]):
            raise GuardError(f"{where}: no user message before the assistant answer")
        return ChatExample(tuple({"role": m["role"], "content": m["content"]} for m in msgs[:-1]), msgs[-1]["content"])
    if "prompt" in obj or "response" in obj:
        p, r = obj.get("prompt"), obj.get("response")
        if not isinstance(p, str) or not p.strip() or not isinstance(r, str) or not r.strip():
            raise GuardError(f"{where}: 'prompt' and 'response' must both be non-empty strings")
        return ChatExample(({"role": "user", "content": p},), r)
    raise GuardError(f"{where}: expected 'messages' or 'prompt'/'response' keys, found {sorted(obj)}")


def read_chat_jsonl(path: str | Path) -> list[ChatExample]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise GuardError(f"data file not found: {p}")
    out: list[ChatExample] = []
    try:
        lines = p.read_text().splitlines()
    except UnicodeDecodeError:
        raise GuardError(f"{p}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise GuardError(f"{p}:{n}: not valid JSON ({e.msg} at column {e.colno})") from None
        out.append(_parse(obj, f"{p}:{n}"))
    if not out:
        raise GuardError(f"{p}: no examples")
    return out


def write_chat_jsonl(path: Path, examples: list[ChatExample]) -> None:
    path.write_text("".join(json.dumps({"messages": [*e.messages, {"role": "assistant", "content": e.answer}]}) + "\n"
                            for e in examples))
