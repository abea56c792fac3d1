import json

import pytest

from guard.errors import GuardError
from training.userdata import read_chat_jsonl


def write(tmp_path, *rows):
    p = tmp_path / "data.jsonl"
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_both_formats(tmp_path):
    p = write(tmp_path, {"prompt": "hi", "response": "hello"},
              {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                            {"role": "assistant", "content": "a"}]})
    a, b = read_chat_jsonl(p)
    assert a.messages == ({"role": "user", "content": "hi"},) and a.answer == "hello"
    assert [m["role"] for m in b.messages] == ["system", "user"] and b.answer == "a"


@pytest.mark.parametrize("bad,msg", [
    ('{"prompt": "x", "response": ', r"data\.jsonl:2: not valid JSON"),
    ({"prompt": "x"}, r"data\.jsonl:2: 'prompt' and 'response' must both be non-empty"),
    ({"messages": [{"role": "user", "content": "u"}, {"role": "user", "content": "v"}]},
     r"data\.jsonl:2: the last message must be a non-empty assistant answer"),
    ({"messages": [{"role": "bot", "content": "u"}, {"role": "assistant", "content": "a"}]},
     r"data\.jsonl:2: messages\[0\] needs a role"),
    ({"text": "x"}, r"data\.jsonl:2: expected 'messages' or 'prompt'/'response' keys"),
    ([1, 2], r"data\.jsonl:2: expected a JSON object"),
])
def test_bad_line_is_named(tmp_path, bad, msg):
    p = write(tmp_path, {"prompt": "ok", "response": "fine"}, bad)
    with pytest.raises(GuardError, match=msg):
        read_chat_jsonl(p)


def test_missing_and_empty(tmp_path):
    with pytest.raises(GuardError, match="data file not found"):
        read_chat_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(GuardError, match="no examples"):
        read_chat_jsonl(tmp_path / "e.jsonl")
