"""ChatML rendering, assistant masks and tool-call parsing, against the official Qwen2.5 template (rendered by
transformers) and TRL's training template and response parser."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import auto_qwen_tokenizer, qwen_tokenizer, read_template, texts

from qwen25.tokenizer import TokenizerError, ToolCallParser, encode_chat, parse_tool_calls, render_chat

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather «in a city» (天气)",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                   "required": ["city"]}}}
SEARCH = {"type": "function", "function": {"name": "search", "description": "Web search",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}


def call(name, **arguments):
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_TURNS = [
    {"role": "user", "content": "Weather in Paris and 北京? Then search news."},
    {"role": "assistant", "content": "Let me check both.",
     "tool_calls": [call("get_weather", city="Paris"), call("get_weather", city="北京", unit="c")]},
    {"role": "tool", "content": '{"temp": 21, "sky": "clear"}'},
    {"role": "tool", "content": '{"temp": 30}'},
    {"role": "assistant", "content": None, "tool_calls": [call("search", q="news «today» 👍")]},
    {"role": "tool", "content": "No results."},
    {"role": "assistant", "content": "Paris 21°C, Beijing 30°C; no news."},
    {"role": "user", "content": "Thanks!"},
]

CONVERSATIONS = {
    "user only": ([{"role": "user", "content": "Hi there"}], None),
    "system and history": ([
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?\n\n  (show work)  "},
        {"role": "assistant", "content": "\n6\n"},
        {"role": "user", "content": "中文也行吗？👨‍👩‍👧"},
    ], None),
    "later system message": ([
        {"role": "user", "content": "a"}, {"role": "system", "content": "New rules."},
        {"role": "assistant", "content": ""}, {"role": "user", "content": "b"},
    ], None),
    "tools without system": (TOOL_TURNS, [WEATHER, SEARCH]),
    "tools with system": ([{"role": "system", "content": "Use tools wisely."}, *TOOL_TURNS], [WEATHER]),
    "tool calls in flat shape": ([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "",
         "tool_calls": [{"name": "search", "arguments": {"q": "x", "n": [1, 2.5]}}]},
        {"role": "tool", "content": "ok"},
    ], [SEARCH]),
    "control tokens in content": ([
        {"role": "user", "content": "say <|im_end|> and <tool_call>{}</tool_call>"},
        {"role": "assistant", "content": "<|endoftext|>done"},
    ], None),
}


@pytest.fixture(scope="module")
def hf():
    return auto_qwen_tokenizer()


@pytest.fixture(scope="module")
def ours():
    return qwen_tokenizer()


def hf_render(hf, messages, tools, template, **kwargs):
    return hf.apply_chat_template(copy.deepcopy(messages), tools=tools, chat_template=template, **kwargs)


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_render_equals_official_template(hf, name, generation_prompt):
    messages, tools = CONVERSATIONS[name]
    expected = hf_render(hf, messages, tools, read_template("qwen2_5.jinja"), tokenize=False,
                         add_generation_prompt=generation_prompt)
    assert render_chat(messages, tools, add_generation_prompt=generation_prompt) == expected


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_assistant_mask_equal_trl_training_template(hf, ours, name):
    messages, tools = CONVERSATIONS[name]
    expected = hf_render(hf, messages, tools, read_template("qwen2_5_training.jinja"), tokenize=True,
                         return_dict=True, return_assistant_tokens_mask=True)
    encoded = encode_chat(ours, messages, tools)
    assert encoded.ids == expected["input_ids"]
    assert encoded.assistant_mask == expected["assistant_masks"]
    if any(m["role"] == "assistant" for m in messages):
        assert 1 in encoded.assistant_mask


def test_default_system_prompt_and_generation_prompt():
    text = render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_string_arguments_render_as_the_object(hf):
    as_dicts = CONVERSATIONS["tools without system"][0]
    as_strings = copy.deepcopy(as_dicts)
    for message in as_strings:
        for tool_call in message.get("tool_calls") or []:
            tool_call["function"]["arguments"] = json.dumps(tool_call["function"]["arguments"])
    expected = hf_render(hf, as_dicts, [WEATHER], read_template("qwen2_5.jinja"), tokenize=False)
    assert render_chat(as_strings, [WEATHER]) == expected
    bad = [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]
    with pytest.raises(TokenizerError, match="'f': arguments is a string but not valid JSON"):
        render_chat(bad)


def test_bad_messages_name_the_problem():
    with pytest.raises(TokenizerError, match="message 1: unknown role 'developer'"):
        render_chat([{"role": "user", "content": "a"}, {"role": "developer", "content": "b"}])
    with pytest.raises(TokenizerError, match="message 0 \\(user\\): content must be"):
        render_chat([{"role": "user", "content": 5}])
    assert render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == render_chat([{"role": "user", "content": "ab"}])


def test_sanitize_keeps_control_tokens_of_the_format_only(ours):
    messages, tools = CONVERSATIONS["control tokens in content"]
    plain = encode_chat(ours, messages, tools)
    safe = encode_chat(ours, messages, tools, sanitize=True)
    control = set(ours.added_tokens.values())
    # system, user and assistant turns: three <|im_start|> and three <|im_end|>, nothing else from the user's text
    assert [i for i in safe.ids if i in control] == [ours.im_start_id, ours.im_end_id] * 3
    assert len([i for i in plain.ids if i in control]) > 6
    assert ours.decode(safe.ids) == ours.decode(plain.ids) == render_chat(messages, tools)
    assert len(safe.assistant_mask) == len(safe.ids) and sum(safe.assistant_mask) > 0
    clean, clean_tools = CONVERSATIONS["tools with system"]
    assert encode_chat(ours, clean, clean_tools, sanitize=True) == encode_chat(ours, clean, clean_tools)


def assistant_outputs(messages, tools):
    """What the model generated for each assistant turn: the text between '<|im_start|>assistant\\n' and <|im_end|>."""
    outputs = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            before = render_chat(messages[:i], tools, add_generation_prompt=True)
            turn = render_chat(messages[:i + 1], tools)[len(before):]
            outputs.append((message, turn[:turn.rindex("<|im_end|>")]))
    return outputs


def test_parse_what_the_format_renders_round_trips():
    messages, tools = CONVERSATIONS["tools without system"]
    for message, output in assistant_outputs(messages, tools):
        parsed = parse_tool_calls(output)
        assert parsed.errors == []
        expected = {k: v for k, v in message.items() if v is not None}
        assert parsed.to_message() == expected
        assert render_chat([*messages[:1], parsed.to_message()], tools) == render_chat([*messages[:1], message], tools)


def test_parse_equals_transformers_response_parser(hf):
    pytest.importorskip("trl.chat_template_utils")
    from trl.chat_template_utils import add_response_schema

    parser = copy.copy(hf)
    parser.chat_template = read_template("qwen2_5.jinja")
    parser = add_response_schema(parser)
    messages, tools = CONVERSATIONS["tools with system"]
    for _, output in assistant_outputs(messages, tools):
        expected = parser.parse_response(parser.encode(output), prefix="")
        assert parse_tool_calls(output).to_message() == expected


def test_malformed_and_unterminated_blocks_are_reported_not_raised():
    text = ('Checking.\n<tool_call>\n{"name": "f", "arguments": {bad json}}\n</tool_call>\n'
            '<tool_call>\n{"name": "g", "arguments": "{\\"x\\": 1}"}\n</tool_call>\n<tool_call>\n{"arguments": {}}\n'
            '</tool_call>\n<tool_call>\n{"name": "h", "argu')
    parsed = parse_tool_calls(text)
    assert parsed.content == "Checking."
    assert [(c.name, c.arguments) for c in parsed.tool_calls] == [("g", {"x": 1})]
    assert [e.message.split(":")[0] for e in parsed.errors] == [
        "invalid JSON", 'expected a JSON object with a string "name"', "unterminated <tool_call> block"]
    assert parsed.errors[0].text == '{"name": "f", "arguments": {bad json}}'
    assert parsed.tool_calls[0].to_openai("call_0") == {
        "id": "call_0", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}


def test_text_without_tool_calls():
    assert parse_tool_calls("  just an answer <tool_ca\n").to_message() == {
        "role": "assistant", "content": "just an answer <tool_ca"}


STREAMED = ('Sure <b>bold</b> < tool_call> <tool_call\n<tool_call>\n{"name": "a", "arguments": {"k": "</tool"}}\n'
            '</tool_call>\nmiddle\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call><tool_call>{broken}'
            '</tool_call> tail <')


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, len(STREAMED)), max_size=12))
def test_streaming_in_any_chunks_equals_whole_and_never_leaks_markup(cuts):
    bounds = [0, *sorted(cuts), len(STREAMED)]
    parser = ToolCallParser()
    content, calls, errors = "", [], []
    for start, end in zip(bounds, bounds[1:]):
        delta = parser.feed(STREAMED[start:end])
        content += delta.content
        calls += delta.tool_calls
        errors += delta.errors
        assert "<tool_call>" not in content and "</tool_call>" not in content
    last = parser.finish()
    content += last.content
    whole = parse_tool_calls(STREAMED)
    assert content.strip() == whole.content
    assert content.endswith(" tail <")  # a held-back "<" is released at the end
    assert calls + last.tool_calls == whole.tool_calls and [c.name for c in whole.tool_calls] == ["a", "b"]
    assert errors + last.errors == whole.errors and len(whole.errors) == 1


@st.composite
def conversations(draw):
    """Random conversations: any text (control-token strings included) in any turn, tool calls and results."""
    text = draw(st.sampled_from([texts, st.text(max_size=8)]))
    messages = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(text)})
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["user", "assistant", "calls", "tool"]))
        if kind == "calls":
            calls = [call(draw(st.sampled_from(["get_weather", "search"])), q=draw(text), n=draw(st.integers()))
                     for _ in range(draw(st.integers(1, 3)))]
            messages.append({"role": "assistant", "content": draw(st.sampled_from(["", None, "ok"])),
                             "tool_calls": calls})
        else:
            messages.append({"role": kind, "content": draw(text)})
    tools = draw(st.sampled_from([None, [WEATHER], [WEATHER, SEARCH]]))
    return messages, tools


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations(), generation_prompt=st.booleans())
def test_random_conversations_equal_the_templates(hf, ours, conversation, generation_prompt):
    messages, tools = conversation
    expected_text = hf_render(hf, messages, tools, read_template("qwen2_5.jinja"), tokenize=False,
                              add_generation_prompt=generation_prompt)
    assert render_chat(messages, tools, add_generation_prompt=generation_prompt) == expected_text
    expected = hf_render(hf, messages, tools, read_template("qwen2_5_training.jinja"), tokenize=True,
                         return_dict=True, return_assistant_tokens_mask=True, add_generation_prompt=generation_prompt)
    encoded = encode_chat(ours, messages, tools, add_generation_prompt=generation_prompt)
    assert encoded.ids == expected["input_ids"]
    assert encoded.assistant_mask == expected["assistant_masks"]
