import pytest

from guard.anchors import AnchorSet, bundled_sets, load_anchor_set, render_chat
from guard.errors import GuardError


def test_bundled_default_set():
    assert "default" in bundled_sets()
    a = load_anchor_set("default", k=8)
    assert len(a) == 8 and all(p.strip() for p in a.prompts)
    assert load_anchor_set("default").prompts[:8] == a.prompts


def test_render_uses_chat_template_with_generation_prompt(tiny_tokenizer):
    a = AnchorSet("t", ("Write a tutorial on how to make a cake",))
    ids = a.render(tiny_tokenizer)[0]
    text = tiny_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a tiny test model<|im_end|>")
    assert text.endswith("<|im_start|>assistant\n")
    custom = AnchorSet("t", a.prompts, system_prompt="Be safe.")
    assert "Be safe." in tiny_tokenizer.decode(custom.render(tiny_tokenizer)[0])
    assert render_chat(tiny_tokenizer, a.messages(a.prompts[0])) == ids


def test_hash_is_content_addressed():
    a = AnchorSet("x", ("p1", "p2"))
    assert a.hash == AnchorSet("renamed", ("p1", "p2")).hash
    assert a.hash != AnchorSet("x", ("p2", "p1")).hash
    assert a.hash != AnchorSet("x", ("p1", "p2"), system_prompt="s").hash


def test_file_sets_and_errors(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n')
    assert load_anchor_set(str(f)).prompts == ("a", "b")
    with pytest.raises(GuardError, match="fewer than the k=5"):
        load_anchor_set(str(f), k=5)
    f.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(GuardError, match=r"mine\.jsonl:2: not valid JSON"):
        load_anchor_set(str(f))
    f.write_text('{"text": "a"}\n')
    with pytest.raises(GuardError, match=r"mine\.jsonl:1: expected an object with a non-empty string 'prompt'"):
        load_anchor_set(str(f))
    with pytest.raises(GuardError, match="neither a bundled set"):
        load_anchor_set("no-such-set")
    with pytest.raises(GuardError, match="is empty"):
        AnchorSet("e", ())
