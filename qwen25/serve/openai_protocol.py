"""The OpenAI API's request and response shapes: validation of requests, and the choices, chunks and deltas
sent back (chat with tool calls, completions, usage, errors).

Unknown request fields are ignored (clients send many optional ones); fields we cannot honour with a value that
matters (logprobs, penalties other than 0, echo with streaming) are refused with a 400 that names them.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..tokenizer.tool_calls import ToolCallParser


class APIError(Exception):
    """An error sent to the client as {"error": {...}} with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
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
    seed: int | None = None
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


def parse_request(model: type[BaseModel], raw: bytes):
    """Parse and validate a JSON body; a 400 that says what is wrong otherwise."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
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
    deltas (per call: id, type and name first, then the arguments) and never appear in content; content is the
    text outside the blocks with the surrounding whitespace stripped, as parse_tool_calls gives it. A block that
    cannot be parsed stays in content as the model wrote it, so no output is lost."""

    def __init__(self, parse_tools: bool):
        self.parser = ToolCallParser() if parse_tools else None
        self.calls = 0
        self._held = ""  # whitespace that is content only if more content follows
        self._started = False

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
        content = parsed.content + "".join(_raw_block(err.text) for err in parsed.errors)
        deltas = [{"content": piece} for piece in [self._content(content)] if piece]
        for call in parsed.tool_calls:
            head = {"index": self.calls, "id": new_id("call"), "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            arguments = json.dumps(call.arguments, ensure_ascii=False)
            tail = {"index": self.calls, "function": {"arguments": arguments}}
            deltas += [{"tool_calls": [head]}, {"tool_calls": [tail]}]
            self.calls += 1
        return deltas

    def _content(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body


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
