"""The OpenAI API's request and response shapes: validation of requests, and the choices, chunks and deltas
sent back (chat with tool calls, completions, usage, errors).

Every field OpenAI or vLLM documents for these endpoints is honoured, or refused with a 400 that names it when
its value would change the output (NOT_IMPLEMENTED); fields neither documents are ignored.
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


class JSONSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    def schema(self) -> dict | None:
        """The JSON schema the output must follow (None: free text)."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError(400, 'response_format of type "json_schema" needs a json_schema object',
                               param="response_format")
            return self.json_schema.schema_
        return None


MAX_STOP_STRINGS = 256  # OpenAI allows 4; vLLM sets no limit and lm-eval sends 5-6
MAX_TOP_LOGPROBS = 20

# Fields OpenAI or vLLM document that this server does not implement: accepted at the value that changes nothing
# (what a client sends as its default), refused with a 400 naming them otherwise. (Fields that change nothing here
# at any value are accepted: user, metadata, service_tier, prompt_cache_key, priority, request_id, and
# add_special_tokens, since Qwen's tokenizer adds none.)
NOT_IMPLEMENTED = {
    "best_of": 1, "use_beam_search": False, "length_penalty": 1.0, "include_stop_str_in_output": False,
    "skip_special_tokens": True, "spaces_between_special_tokens": True, "truncate_prompt_tokens": None,
    "allowed_token_ids": None, "bad_words": None, "prompt_logprobs": None, "return_tokens_as_token_ids": False,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "guided_decoding_backend": None, "guided_whitespace_pattern": None, "structured_outputs": None,
    "structural_tag": None, "chat_template": None, "chat_template_kwargs": None, "store": False,
    "return_token_ids": False, "logits_processors": None,
    "continue_final_message": False, "add_generation_prompt": True, "documents": None, "mm_processor_kwargs": None,
    "audio": None, "prediction": None, "web_search_options": None, "reasoning_effort": None, "verbosity": None,
    "functions": None, "function_call": None, "repetition_detection": None, "thinking_token_budget": None,
    "vllm_xargs": None, "kv_transfer_params": None,
}
# ... and values of fields that only some values of are implemented
NOT_IMPLEMENTED_VALUES = {"modalities": (["text"],)}


class SamplingFields(_Lenient):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)  # extra fields: checked against NOT_IMPLEMENTED
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
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)  # vLLM's extensions from here
    min_tokens: int = Field(default=0, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"a logit_bias value must be in [-100, 100], got {bias} for token {key}")
        return value

    def unsupported(self) -> None:
        """Raise a 400 for documented fields whose value this server does not implement."""
        extra = self.model_extra or {}
        for name, harmless in NOT_IMPLEMENTED.items():
            if name in extra and extra[name] is not None and extra[name] != harmless:
                raise APIError(400, f"{name} is not supported by this server (only {json.dumps(harmless)})",
                               param=name)
        for name, allowed in NOT_IMPLEMENTED_VALUES.items():
            if extra.get(name) is not None and extra[name] not in allowed:
                raise APIError(400, f"{name} {json.dumps(extra[name])} is not supported (only "
                                    f"{' or '.join(json.dumps(a) for a in allowed)})", param=name)

    @property
    def top_logprobs_count(self) -> int | None:
        """How many alternatives to report per generated token (None: no log-probabilities)."""
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class NamedFunction(_Lenient):
    name: str = Field(min_length=1)


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False  # vLLM's; only false

    def unsupported(self) -> None:
        super().unsupported()
        if self.echo:
            raise APIError(400, "echo is not supported for chat completions", param="echo")
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise APIError(400, "tool_choice forces a tool call, but the request has no tools", param="tool_choice")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in {
                t.function.name for t in self.tools}:
            raise APIError(400, f"tool_choice names the function {self.tool_choice.function.name!r}, which is not "
                                f"in tools", param="tool_choice")
        if self.parallel_tool_calls is False and self.parse_tools and self.tool_choice in (None, "auto"):
            raise APIError(400, 'parallel_tool_calls false is supported only with tool_choice "required" or a '
                                'named function', param="parallel_tool_calls")

    @property
    def parse_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def forced_tool(self) -> str | None:
        """"*" when some tool call is required, a function's name when that one is, else None."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return "*" if self.tool_choice == "required" and self.tools else None

    @property
    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

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
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    max_tokens: int | None = Field(default=None, ge=0)  # 0 with echo: score the prompt, generate nothing

    @property
    def top_logprobs_count(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    def unsupported(self) -> None:
        super().unsupported()
        if self.suffix is not None and self.echo:
            raise APIError(400, "echo with suffix is not supported (fill-in-the-middle returns the middle only)",
                           param="suffix")
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens 0 generates nothing: it needs echo (to score the prompt)",
                           param="max_tokens")


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a text prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[Tool] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True  # Qwen adds no special tokens either way

    def unsupported(self) -> None:
        pass


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> None:
        pass


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


# ---- log-probabilities ------------------------------------------------------------------------------------------
def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # JSON has no -Infinity (vLLM clamps the same way)


class LogprobFormatter:
    """Token log-probabilities in OpenAI's two wire formats: chat's `{"content": [{token, logprob, bytes,
    top_logprobs}]}` and the completions' `{tokens, token_logprobs, top_logprobs, text_offset}` (text_offset
    counts on from the text already sent)."""

    def __init__(self, tokenizer, offset: int = 0):
        self.tokenizer, self.offset = tokenizer, offset

    def _bytes(self, token: int) -> bytes:
        return self.tokenizer.decode_bytes([token])

    def _text(self, token: int) -> str:
        return self._bytes(token).decode("utf-8", errors="replace")

    def chat(self, entries) -> list[dict]:
        """[(token, (logprob, [(id, logprob)]))] -> chat's content entries."""
        def item(token: int, logprob: float) -> dict:
            return {"token": self._text(token), "logprob": _finite(logprob), "bytes": list(self._bytes(token))}
        return [{**item(token, lp), "top_logprobs": [item(i, v) for i, v in top]} for token, (lp, top) in entries]

    def completion(self, entries) -> dict:
        """[(token, (logprob, top) or None)] -> the completions' logprobs object (None: a first prompt token)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, scored in entries:
            text = self._text(token)
            out["tokens"].append(text)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
            if scored is None:
                out["token_logprobs"].append(None)
                out["top_logprobs"].append(None)
                continue
            logprob, top = scored
            out["token_logprobs"].append(_finite(logprob))
            alternatives = {self._text(i): _finite(v) for i, v in top}
            alternatives.setdefault(text, _finite(logprob))  # as vLLM: the token itself is listed too
            out["top_logprobs"].append(alternatives)
        return out


def merge_completion_logprobs(parts: list[dict]) -> dict | None:
    """The logprobs objects of a choice's chunks as one."""
    if not parts:
        return None
    return {key: [v for part in parts for v in part[key]] for key in parts[0]}
