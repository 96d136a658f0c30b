"""The OpenAI API's request and response shapes: validation of requests, and the choices, chunks and deltas
sent back (chat with tool calls, completions, usage, errors).

Unknown request fields are ignored (clients send many optional ones); fields we cannot honour with a value that
matters (logprobs, penalties other than 0, echo with streaming) are refused with a 400 that names them.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..tokenizer.tool_calls import TOOL_CALL_END, ToolCall, ToolCallParser, partial_tag


class APIError(Exception):
    """An error sent to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    # Python's json reads Infinity and NaN: no number field accepts them (they overflow sampling)
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Lenient):
    include_usage: bool = False


class ContentPart(_Lenient):
    type: Literal["text"]  # this model reads text only: an image or audio part is refused, not dropped
    text: str


class FunctionCall(_Lenient):
    name: str = Field(min_length=1)
    arguments: str | dict[str, Any] = "{}"


class ToolCallSpec(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallSpec] | None = None
    tool_call_id: str | None = None
    name: str | None = None


class FunctionSpec(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionSpec


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # vLLM's extension; 0 = off
    repetition_penalty: float | None = Field(default=None, gt=0)  # vLLM's extension
    seed: int | None = Field(default=None, ge=-2**63, lt=2**63)  # int64, as OpenAI's
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logprobs: bool | int | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        return stops

    def unsupported(self) -> None:
        """Raise a 400 for settings this server does not implement."""
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported (only 0); use repetition_penalty", param=name)
        if self.logprobs:
            raise APIError(400, "logprobs are not supported", param="logprobs")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def unsupported(self) -> None:
        super().unsupported()
        if isinstance(self.tool_choice, dict) or self.tool_choice == "required":
            raise APIError(400, 'tool_choice must be "auto" or "none" (forcing a tool is not supported)',
                           param="tool_choice")

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def chat_messages(self) -> list[dict]:
        """Messages as render_chat takes them ("developer" is OpenAI's newer name for "system")."""
        out = []
        for m in self.messages:
            message = m.model_dump(exclude_none=True)
            if message["role"] == "developer":
                message["role"] = "system"
            out.append(message)
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix:
            raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")


MAX_JSON_DEPTH = 64  # a chat request nests 6-8 levels (tool schemas more); far deeper is an attack or a bug


def _check_json(value, depth: int = 0, where: str = "body") -> None:
    """Refuse what json.loads accepts but nothing downstream can use: nesting deeper than MAX_JSON_DEPTH, and
    strings with lone UTF-16 surrogates ("\\ud800"), which no tokenizer can encode."""
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"the request nests deeper than {MAX_JSON_DEPTH} levels (at {where})")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"{where}: the string holds a lone UTF-16 surrogate (invalid Unicode)",
                           param=where) from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_json(key, depth + 1, where)
            _check_json(item, depth + 1, f"{where}.{key}" if where != "body" else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, depth + 1, f"{where}.{i}")


def parse_request(model: type[BaseModel], raw: bytes):
    """Parse and validate a JSON body; a 400 that says what is wrong otherwise."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests too deeply to parse") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _check_json(data)
    try:
        request = model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        raise APIError(400, f"invalid request: {reasons}", param=where or None) from None
    request.unsupported()
    return request


# ---- responses ---------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def envelope(rid: str, obj: str, model: str, created: int | None = None, **fields) -> dict:
    """The fields every response and chunk has: id, object, created, model."""
    return {"id": rid, "object": obj, "created": created or int(time.time()), "model": model, **fields}


class ChatDeltaStream:
    """One chat choice's output text -> OpenAI deltas. With tools, `<tool_call>` blocks become `tool_calls`
    deltas and never appear in content; content is the text outside the blocks with the surrounding whitespace
    stripped, as parse_tool_calls gives it.

    A call streams while the model writes it: once the block reads `{"name": "...", "arguments": {` and the
    arguments so far are a valid JSON prefix, one delta carries index, id, type and name, and the arguments
    follow in fragments, exactly as the model writes them, up to the brace that closes them. A block that is
    malformed before that point (or whose arguments are not an object) is decided when it ends: a valid one
    becomes a call then, an invalid one stays in content as the model wrote it, so no output is lost. A block
    that goes wrong after its call began streaming cannot be taken back (as with any streaming server): the
    call keeps the arguments as written."""

    def __init__(self, parse_tools: bool):
        self.parser = ToolCallParser() if parse_tools else None
        self.calls = 0
        self._held = ""  # whitespace that is content only if more content follows
        self._started = False
        self._live: dict | None = None  # the call streaming now: {"index", "sent"} (argument characters sent)

    def feed(self, text: str) -> list[dict]:
        """Deltas for a piece of output text."""
        if self.parser is None:
            return [{"content": text}] if text else []
        return self._deltas(self.parser.feed(text))

    def finish(self) -> list[dict]:
        """Deltas for whatever the parser still held (an unterminated block goes to content)."""
        if self.parser is None:
            return []
        return self._deltas(self.parser.finish())

    def _deltas(self, parsed) -> list[dict]:
        deltas = []
        for part in parsed.parts:
            if isinstance(part, str):
                deltas += self._content(part)
            elif self._live is not None:  # the first block to end is the one streaming: send the rest
                deltas += self._rest(part.raw)
                self._live = None
            elif isinstance(part, ToolCall):
                deltas += self._call(part.name, json.dumps(part.arguments, ensure_ascii=False))
            else:
                deltas += self._content(_raw_block(part.text))
        if self.parser.open_block is not None:
            deltas += self._stream(self.parser.open_block)
        return deltas

    def _call(self, name: str, arguments: str | None) -> list[dict]:
        """The head delta (index, id, type, name) and, when given, the arguments in one fragment."""
        head = {"index": self.calls, "id": new_id("call"), "type": "function",
                "function": {"name": name, "arguments": ""}}
        self.calls += 1
        return [{"tool_calls": [head]}] + ([self._arguments(arguments)] if arguments else [])

    def _arguments(self, fragment: str) -> dict:
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": fragment}}]}

    def _stream(self, block: str) -> list[dict]:
        """Deltas for the open block: the call's head once its name and a valid start of arguments are known,
        then the argument text written since the last delta."""
        deltas = []
        if self._live is None:
            match = _CALL_HEAD.match(block)
            if not match:
                return []
            arguments = _argument_prefix(block[match.end():])
            if not _valid_prefix(arguments):
                return []
            deltas += self._call(json.loads(match.group(1)), None)
            self._live = {"start": match.end(), "sent": 0}
        return deltas + self._rest(block)

    def _rest(self, block: str) -> list[dict]:
        """The live call's argument text written since its last delta."""
        arguments = _argument_prefix(block[self._live["start"]:])
        if len(arguments) <= self._live["sent"]:
            return []
        fragment, self._live["sent"] = arguments[self._live["sent"]:], len(arguments)
        return [self._arguments(fragment)]

    def _content(self, text: str) -> list[dict]:
        """A content delta, without the output's leading whitespace and holding back trailing whitespace (content
        only if more content follows)."""
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return [{"content": body}] if body else []


# A block's start when its call can stream: the name (a complete JSON string), then an object of arguments.
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\{)')


def _argument_prefix(text: str) -> str:
    """The arguments object's text so far: up to its closing brace once written; before that, all of it but a
    tail that may be the start of </tool_call> (which would end the block, not belong to the arguments)."""
    depth, in_string, escaped = 0, False, False
    for i, char in enumerate(text):
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return text[:i + 1]
    return text[:len(text) - partial_tag(text, TOOL_CALL_END)]


def _valid_prefix(arguments: str) -> bool:
    """The arguments are past their opening brace and, so far, a prefix of valid JSON."""
    from pydantic_core import from_json

    if len(arguments.rstrip()) < 2:
        return False
    try:
        from_json(arguments, allow_partial=True)
    except ValueError:
        return False
    return True


def _raw_block(text: str) -> str:
    return text if text.startswith("<tool_call>") else f"<tool_call>\n{text}\n</tool_call>"


def merge_deltas(deltas: list[dict]) -> dict:
    """The assistant message that a list of deltas adds up to (non-streaming responses use this, so a
    streamed and a non-streamed answer are the same by construction)."""
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            call["id"] = piece.get("id", call["id"])
            function = piece.get("function", {})
            call["function"]["name"] += function.get("name", "")
            call["function"]["arguments"] += function.get("arguments", "")
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    return message


def finish_reason(engine_reason: str, tool_calls: int) -> str:
    """OpenAI's finish_reason: "tool_calls" when the model stopped after calling tools."""
    if engine_reason == "stop" and tool_calls:
        return "tool_calls"
    return engine_reason if engine_reason in ("stop", "length") else "stop"
