"""Parse Qwen2.5's tool calls out of model output, whole or while it streams.

The model writes each call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`. Text outside the
blocks is content. `ToolCallParser` takes the output in pieces (as a server receives it) and never lets block
markup leak into content: a tail that may be the start of `<tool_call>` is held back until it is decided.
A block whose JSON is malformed is reported as a `ToolCallError`, never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass
class ToolCall:
    """A parsed call: the function name and its arguments (a JSON object)."""
    name: str
    arguments: dict[str, Any]
    raw: str = field(default="", compare=False, repr=False)  # the block's text as written (streaming uses it)

    def to_message_call(self) -> dict:
        """The OpenAI shape render_chat takes in an assistant message's tool_calls."""
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def to_openai(self, call_id: str | None = None) -> dict:
        """The OpenAI API response shape (arguments as a JSON string)."""
        call = {"type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}
        return {"id": call_id, **call} if call_id is not None else call


@dataclass
class ToolCallError:
    """A <tool_call> block that could not be parsed: its raw text and why."""
    text: str
    message: str
    raw: str = field(default="", compare=False, repr=False)


@dataclass
class ParsedOutput:
    """Content text, tool calls and malformed blocks (for a whole output, or what one feed() completed)."""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    parts: list[str | ToolCall | ToolCallError] = field(default_factory=list)  # all of the above, in order

    def add_text(self, text: str) -> None:
        if text:
            self.content += text
            self.parts.append(text)

    def to_message(self) -> dict:
        """An assistant message for the chat history (what render_chat takes); like transformers' parser, it has
        no "content" when that is empty and there are tool calls."""
        message: dict[str, Any] = {"role": "assistant"}
        if self.content or not self.tool_calls:
            message["content"] = self.content
        if self.tool_calls:
            message["tool_calls"] = [call.to_message_call() for call in self.tool_calls]
        return message


def parse_tool_call_json(text: str) -> ToolCall | ToolCallError:
    """One block's inside: {"name": str, "arguments": object or JSON string of one}."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        return ToolCallError(text, f"invalid JSON: {e}")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return ToolCallError(text, 'expected a JSON object with a string "name"')
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            return ToolCallError(text, f"arguments is a string but not valid JSON: {e}")
    if not isinstance(arguments, dict):
        return ToolCallError(text, f"arguments must be a JSON object, got {type(arguments).__name__}")
    return ToolCall(data["name"], arguments)


def partial_tag(text: str, tag: str = TOOL_CALL_START) -> int:
    """Length of the longest tail of text that is a proper prefix of tag (it might become one)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Incremental parser: feed() output text as it comes; each call returns the content and the complete tool
    calls it settled. finish() settles the rest (an unterminated block becomes an error)."""

    def __init__(self):
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> ParsedOutput:
        out = ParsedOutput()
        self._buffer += text
        while True:
            if self._in_call:
                end = self._buffer.find(TOOL_CALL_END)
                if end < 0:
                    return out
                block = self._buffer[:end]
                self._buffer = self._buffer[end + len(TOOL_CALL_END):]
                self._in_call = False
                parsed = parse_tool_call_json(block.strip())
                parsed.raw = block
                (out.tool_calls if isinstance(parsed, ToolCall) else out.errors).append(parsed)
                out.parts.append(parsed)
            else:
                start = self._buffer.find(TOOL_CALL_START)
                if start < 0:
                    keep = partial_tag(self._buffer)
                    out.add_text(self._buffer[:len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return out
                out.add_text(self._buffer[:start])
                self._buffer = self._buffer[start + len(TOOL_CALL_START):]
                self._in_call = True

    @property
    def open_block(self) -> str | None:
        """The text of the <tool_call> block being written (without the start tag), or None outside a block."""
        return self._buffer if self._in_call else None

    def finish(self) -> ParsedOutput:
        out = ParsedOutput()
        if self._in_call:
            out.errors.append(ToolCallError(TOOL_CALL_START + self._buffer, "unterminated <tool_call> block",
                                            self._buffer))
            out.parts.append(out.errors[-1])
        else:
            out.add_text(self._buffer)
        self._buffer, self._in_call = "", False
        return out


def parse_tool_calls(text: str) -> ParsedOutput:
    """Split a whole model output into content and tool calls. Content is the text outside the blocks with
    surrounding whitespace stripped (the newline before a block is format, not content), as transformers'
    response parser for this format gives it."""
    parser = ToolCallParser()
    result = ParsedOutput()
    for part in (parser.feed(text), parser.finish()):
        result.content += part.content
        result.tool_calls += part.tool_calls
        result.errors += part.errors
        result.parts += part.parts
    result.content = result.content.strip()
    return result
