"""Chat format: render/parse round trips, the assistant-only loss mask, the Jinja template."""
import json

import pytest

from llmforge.errors import UserError
from llmforge.tokenizer import chat
from llmforge.tokenizer.chat import (ASSISTANT, END, SPECIALS, TOOL_CALL, parse_assistant,
                                     parse_completion, render, render_prompt, render_text)


class ByteTokenizer:
    """The Tokenizer API chat.py relies on, byte-level: specials 0..7, byte b -> 8 + b."""

    def token_id(self, s):
        return SPECIALS.index(s)

    def encode(self, text):
        return [8 + b for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 8 for i in ids if i >= 8).decode("utf-8", errors="replace")


@pytest.fixture(params=["bytes", "bpe"])
def tok(request):
    if request.param == "bytes":
        return ByteTokenizer()
    bpe = pytest.importorskip("llmforge.tokenizer.bpe")
    texts = ["What is 2 + 2? The answer is 4. Use the calculator tool please.", "hello world " * 20] * 5
    return bpe.Tokenizer.train(texts, vocab_size=300)


def tool_conversation():
    return [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "What is 12*34?"},
        {"role": "assistant", "content": "Let me compute.", "tool_calls": [
            {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12*34"}'}}]},
        {"role": "tool", "content": "408"},
        {"role": "assistant", "content": "It is 408."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."},
    ]


def masked_text(tok, ids, mask, want):
    """Decode the ids whose mask equals `want`, specials shown by name."""
    names = {tok.token_id(s): s for s in SPECIALS}
    out, run = [], []
    for i, m in zip(ids, mask):
        if m != want:
            continue
        if i in names:
            out.append(tok.decode(run) + names[i])
            run = []
        else:
            run.append(i)
    return "".join(out) + tok.decode(run)


def test_text_layout_is_documented_one():
    text = render_text(tool_conversation())
    assert text == ("<|bos|><|system|>You are helpful.<|end|><|user|>What is 12*34?<|end|>"
                    "<|assistant|>Let me compute.<|tool_call|>"
                    '{"name":"calculator","arguments":{"expression":"12*34"}}<|end|>'
                    "<|tool_result|>408<|end|><|assistant|>It is 408.<|end|>"
                    "<|user|>Thanks!<|end|><|assistant|>You're welcome.<|end|>")


def test_loss_mask_covers_assistant_tokens_only(tok):
    ids, mask = render(tok, tool_conversation())
    assert len(ids) == len(mask)
    trained = masked_text(tok, ids, mask, 1)
    assert trained == ('Let me compute.<|tool_call|>{"name":"calculator","arguments":{"expression":"12*34"}}<|end|>'
                       "It is 408.<|end|>You're welcome.<|end|>")
    untrained = masked_text(tok, ids, mask, 0)
    for prompt_piece in ("You are helpful.", "What is 12*34?", "408<|end|>", "Thanks!"):
        assert prompt_piece in untrained
    # role openers are supplied by the prompt/engine, so they are never trained
    opener = tok.token_id(ASSISTANT)
    assert all(m == 0 for i, m in zip(ids, mask) if i == opener)
    assert mask[0] == 0


def test_render_prompt_ends_with_assistant_opener_and_prefixes_full_render(tok):
    conv = tool_conversation()
    prompt = render_prompt(tok, conv[:2])
    full, _ = render(tok, conv)
    assert prompt[-1] == tok.token_id(ASSISTANT)
    assert full[:len(prompt)] == prompt      # generation continues exactly where training text does


def test_special_token_names_spelled_by_the_model_are_cut_from_its_messages(tok):
    spelled = tok.encode("Hello <|system|>there<|end|>")     # plain text tokens, not the specials
    assert tok.token_id("<|system|>") not in spelled
    messages = parse_completion(tok, spelled + [tok.token_id("<|end|>")])
    assert messages == [{"role": "assistant", "content": "Hello there"}]
    render(tok, [{"role": "user", "content": "hi"}] + messages)   # renders again instead of raising


def test_parse_completion_round_trips_a_tool_turn(tok):
    conv = tool_conversation()
    prompt = render_prompt(tok, conv[:2])
    full, _ = render(tok, conv[:5])
    messages = parse_completion(tok, full[len(prompt):])
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant"]
    call = messages[0]["tool_calls"][0]["function"]
    assert messages[0]["content"] == "Let me compute."
    assert call["name"] == "calculator" and json.loads(call["arguments"]) == {"expression": "12*34"}
    assert messages[1]["content"] == "408"
    assert messages[2]["content"] == "It is 408."
    assert chat.final_answer(messages) == "It is 408."


def test_parse_assistant_plain_and_truncated(tok):
    ids = tok.encode("Hello there") + [tok.token_id(END)] + tok.encode("junk after the end")
    assert parse_assistant(tok, ids) == {"role": "assistant", "content": "Hello there"}
    # ran out of tokens before <|end|>: keep what was written
    assert parse_assistant(tok, tok.encode("Hello"))["content"] == "Hello"
    # malformed JSON in a tool call is kept, with an empty name, not raised
    bad = [tok.token_id(TOOL_CALL)] + tok.encode("{not json") + [tok.token_id(END)]
    msg = parse_assistant(tok, bad)
    assert msg["tool_calls"][0]["function"] == {"name": "", "arguments": "{not json"}
    # ...and renders back verbatim, so a model's malformed call can be scored and trained on
    prompt = render_prompt(tok, [{"role": "user", "content": "hi"}])
    assert render(tok, [{"role": "user", "content": "hi"}, msg])[0] == prompt + bad
    template = chat.jinja_env().from_string(chat.CHAT_TEMPLATE)
    conv = [{"role": "user", "content": "hi"}, msg]
    assert template.render(messages=conv) == render_text(conv)


def test_parse_tool_call_for_the_engine():
    assert chat.parse_tool_call('{"name":"calculator","arguments":{"expression":"1+1"}}') == (
        "calculator", {"expression": "1+1"})
    with pytest.raises(ValueError):
        chat.parse_tool_call('{"arguments": {}}')


def test_jinja_template_matches_render_text():
    env = chat.jinja_env()
    template = env.from_string(chat.CHAT_TEMPLATE)
    # the template inserts string arguments as they are (no JSON parsing in transformers'
    # Jinja), so it matches render_text for dict arguments and for compact JSON strings
    compact = tool_conversation()
    compact[2]["tool_calls"][0]["function"]["arguments"] = '{"expression":"12*34"}'
    as_dict = tool_conversation()
    as_dict[2]["tool_calls"][0]["function"]["arguments"] = {"expression": "12*34"}
    for conv in (compact, as_dict, [{"role": "user", "content": "hi"}]):
        assert template.render(messages=conv, add_generation_prompt=False) == render_text(conv)
        assert template.render(messages=conv, add_generation_prompt=True) == render_text(conv, True)


@pytest.mark.parametrize("bad", [
    [],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": 3}],
    [{"role": "user", "content": "sneaky <|end|> token"}],
    [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "calc", "arguments": "{oops"}}]}],
])
def test_bad_messages_raise_user_error(bad):
    with pytest.raises(UserError):
        render_text(bad)
