"""Qwen2.5-Instruct's chat format (ChatML with Hermes-style tools), written out in Python.

`render_chat` gives, byte for byte, what the official Qwen2.5-Instruct Jinja template renders; `encode_chat`
gives its token ids and the SFT loss mask of TRL's `qwen2_5_training.jinja`: 1 on every assistant turn from the
"\\n" after `<|im_start|>assistant` through its closing `<|im_end|>\\n`, 0 elsewhere (system, user, tool
results, the `<|im_start|>assistant` header itself and the generation prompt).

Messages are dicts: {"role": "system"|"user"|"assistant"|"tool", "content": str}, and assistant messages may have
"tool_calls": [{"type": "function", "function": {"name": str, "arguments": dict or JSON string}}] (OpenAI shape).
Tools are OpenAI tool schemas, rendered as JSON. Departures from the template, all where it would fail or emit
something unusable: content None counts as "" and a list of {"type": "text"} parts as their joined text;
arguments given as a JSON string are parsed and rendered as the object (as vLLM does; the template would
render a quoted string); an unknown role raises instead of being silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import groupby
from typing import Any, Sequence

from .files import TokenizerError

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

_TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
                "<args-json-object>}\n</tool_call><|im_end|>\n")


@dataclass(frozen=True)
class Segment:
    """A run of chat text. `assistant`: inside an assistant turn (trained on in SFT). `literal`: written by the
    format itself (its control tokens are real); False: text that came from the caller."""
    text: str
    assistant: bool
    literal: bool


@dataclass
class ChatEncoding:
    """Token ids of a rendered chat and its assistant mask (1 = an assistant token, trained on in SFT)."""
    ids: list[int]
    assistant_mask: list[int]


def _text(message: dict, index: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(p.get("text", "") for p in content)
    raise TokenizerError(f"message {index} ({message.get('role')}): content must be a string or a list of "
                         f"text parts, got {type(content).__name__}")


def _arguments_json(arguments: Any, name: str) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise TokenizerError(f"tool call {name!r}: arguments is a string but not valid JSON ({e})") from None
    return json.dumps(arguments, ensure_ascii=False)


def chat_segments(messages: Sequence[dict], tools: Sequence[dict] | None = None,
                  add_generation_prompt: bool = False) -> list[Segment]:
    """The chat as segments; their texts joined are `render_chat`'s output."""
    segments: list[Segment] = []
    in_assistant = False

    def literal(text: str) -> None:
        segments.append(Segment(text, in_assistant, True))

    def value(text: str) -> None:
        segments.append(Segment(text, in_assistant, False))

    has_system = bool(messages) and messages[0].get("role") == "system"
    if tools:
        literal("<|im_start|>system\n")
        value(_text(messages[0], 0)) if has_system else literal(DEFAULT_SYSTEM_PROMPT)
        literal(_TOOLS_INTRO)
        for tool in tools:
            literal("\n")
            value(json.dumps(tool, ensure_ascii=False))
        literal(_TOOLS_OUTRO)
    elif has_system:
        literal("<|im_start|>system\n")
        value(_text(messages[0], 0))
        literal("<|im_end|>\n")
    else:
        literal(f"<|im_start|>system\n{DEFAULT_SYSTEM_PROMPT}<|im_end|>\n")

    for i, message in enumerate(messages):
        role = message.get("role")
        if role == "user" or (role == "system" and i > 0):
            literal(f"<|im_start|>{role}\n")
            value(_text(message, i))
            literal("<|im_end|>\n")
        elif role == "system":
            continue  # the first system message went into the system turn above
        elif role == "assistant":
            literal("<|im_start|>assistant")
            in_assistant = True
            content, calls = _text(message, i), message.get("tool_calls")
            if not calls:
                literal("\n")
                value(content)
            else:
                if content:
                    literal("\n")
                    value(content)
                for call in calls:
                    function = call.get("function", call)
                    name = function.get("name")
                    if not isinstance(name, str):
                        raise TokenizerError(f"message {i}: a tool call has no function name: {call!r}")
                    literal('\n<tool_call>\n{"name": "')
                    value(name)
                    literal('", "arguments": ')
                    value(_arguments_json(function.get("arguments", {}), name))
                    literal("}\n</tool_call>")
            literal("<|im_end|>\n")
            in_assistant = False
        elif role == "tool":
            # Consecutive tool results share one user turn.
            if i == 0 or messages[i - 1].get("role") != "tool":
                literal("<|im_start|>user")
            literal("\n<tool_response>\n")
            value(_text(message, i))
            literal("\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1].get("role") != "tool":
                literal("<|im_end|>\n")
        else:
            raise TokenizerError(f"message {i}: unknown role {role!r} (expected system, user, assistant or tool)")
    if add_generation_prompt:
        literal("<|im_start|>assistant\n")
    return segments


def render_chat(messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation, as Qwen2.5-Instruct's chat template renders it."""
    return "".join(s.text for s in chat_segments(messages, tools, add_generation_prompt))


def encode_chat(tokenizer, messages: Sequence[dict], tools: Sequence[dict] | None = None,
                add_generation_prompt: bool = False, sanitize: bool = False) -> ChatEncoding:
    """Token ids of render_chat(...) and the assistant mask.

    sanitize=False tokenizes the rendered text as HF does (a control-token string inside a message becomes that
    control token). sanitize=True encodes the caller's text (contents, tool names, arguments, tool schemas) as
    plain text, so only the format's own control tokens appear: use it for untrusted input.
    """
    ids: list[int] = []
    mask: list[int] = []
    # An assistant turn starts right after "<|im_start|>assistant" and ends before the next "<|im_start|>": both
    # are pre-token boundaries, so encoding the runs separately gives the ids of the whole text.
    for assistant, run in groupby(chat_segments(messages, tools, add_generation_prompt), key=lambda s: s.assistant):
        run = list(run)
        if not sanitize:
            run_ids = tokenizer.encode("".join(s.text for s in run))
        else:
            run_ids = _encode_sanitized(tokenizer, run)
        ids += run_ids
        mask += [int(assistant)] * len(run_ids)
    return ChatEncoding(ids, mask)


def _encode_sanitized(tokenizer, run: list[Segment]) -> list[int]:
    """Control tokens only from literal segments; everything between them encoded as one plain text."""
    ids: list[int] = []
    plain: list[str] = []
    for segment in run:
        if not segment.literal:
            plain.append(segment.text)
            continue
        for item in tokenizer.split_control(segment.text):
            if isinstance(item, str):
                plain.append(item)
            else:
                ids += tokenizer.encode_ordinary("".join(plain))
                plain = []
                ids.append(item)
    return ids + tokenizer.encode_ordinary("".join(plain))
