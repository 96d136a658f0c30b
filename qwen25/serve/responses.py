"""OpenAI's Responses API (/v1/responses) as a view of a chat completion: the subset agent frameworks use
(openai-agents' default model): input items (messages, function calls and their outputs), instructions, function
tools, tool_choice, text.format, max_output_tokens, streaming events. Nothing is stored: `previous_response_id`,
`conversation` and `store: true` are refused with a 400.

A request becomes a ChatCompletionRequest; the chat deltas that come back (ChatDeltaStream) become output items:
a `message` with `output_text`, and one `function_call` item per tool call.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import ConfigDict, Field

from .openai_protocol import APIError, ChatCompletionRequest, _Lenient, new_id


class ResponsesRequest(_Lenient):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = None
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    reasoning: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def unsupported(self) -> None:
        for name in ("previous_response_id", "conversation"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported: this server stores no responses (send the whole "
                                    f"conversation as input)", param=name)
        if self.store:
            raise APIError(400, "store: true is not supported: this server stores no responses", param="store")
        if self.reasoning and self.reasoning.get("effort") not in (None, "none", "minimal"):
            raise APIError(400, "reasoning is not supported by this model", param="reasoning")
        if any(i != "message.output_text.logprobs" for i in self.include or []):
            raise APIError(400, f"include {self.include} is not supported (only message.output_text.logprobs)",
                           param="include")
        for tool in self.tools or []:
            if tool.get("type") != "function":
                raise APIError(400, f"tool type {tool.get('type')!r} is not supported (only function)",
                               param="tools")

    def to_chat(self) -> ChatCompletionRequest:
        """The chat completion this response is (validated as one, so every chat rule applies)."""
        body: dict[str, Any] = {"model": self.model, "messages": self.messages(), "stream": self.stream,
                                **{k: v for k, v in (self.model_extra or {}).items()}}
        for name in ("temperature", "top_p", "parallel_tool_calls", "user"):
            if getattr(self, name) is not None:
                body[name] = getattr(self, name)
        if self.max_output_tokens is not None:
            body["max_tokens"] = self.max_output_tokens
        if self.tools:
            body["tools"] = [{"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                                if t.get(k) is not None}} for t in self.tools]
        if isinstance(self.tool_choice, dict):
            if self.tool_choice.get("type") != "function" or "name" not in self.tool_choice:
                raise APIError(400, "tool_choice: only a function ({\"type\": \"function\", \"name\": ...}) can be "
                                    "forced", param="tool_choice")
            body["tool_choice"] = {"type": "function", "function": {"name": self.tool_choice["name"]}}
        elif self.tool_choice is not None:
            body["tool_choice"] = self.tool_choice
        if self.top_logprobs is not None or "message.output_text.logprobs" in (self.include or []):
            body["logprobs"], body["top_logprobs"] = True, self.top_logprobs or 0
        fmt = (self.text or {}).get("format")
        if fmt and fmt.get("type") == "json_schema":
            body["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name", "response"), "schema": fmt.get("schema", {"type": "object"}),
                "strict": fmt.get("strict")}}
        elif fmt and fmt.get("type") in ("json_object", "text"):
            body["response_format"] = {"type": fmt["type"]}
        elif fmt:
            raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported", param="text")
        try:
            request = ChatCompletionRequest.model_validate(body)
        except Exception as e:  # pydantic's ValidationError: the same 400 a chat request would get
            raise APIError(400, f"invalid request: {e}") from None
        request.unsupported()
        return request

    def messages(self) -> list[dict]:
        """Input items as chat messages: consecutive function calls become one assistant turn's tool_calls."""
        out: list[dict] = [{"role": "system", "content": self.instructions}] if self.instructions else []
        items = [{"role": "user", "content": self.input}] if isinstance(self.input, str) else self.input
        for i, item in enumerate(items):
            kind = item.get("type", "message")
            if kind == "message":
                out.append({"role": item.get("role", "user"), "content": _text(item.get("content"), i)})
            elif kind == "function_call":
                call = {"id": item.get("call_id"), "type": "function",
                        "function": {"name": item["name"], "arguments": item.get("arguments", "{}")}}
                if out and out[-1]["role"] == "assistant" and "tool_calls" in out[-1]:
                    out[-1]["tool_calls"].append(call)
                else:
                    out.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                output = item.get("output", "")
                out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                            "content": output if isinstance(output, str) else _text(output, i)})
            elif kind == "reasoning":
                continue  # another model's reasoning summary: nothing this model can read
            else:
                raise APIError(400, f"input item {i} has type {kind!r} (supported: message, function_call, "
                                    f"function_call_output)", param=f"input.{i}.type")
        if not out:
            raise APIError(400, "input is empty", param="input")
        return out


def _text(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") not in ("input_text", "output_text", "text"):
            raise APIError(400, f"input item {index}: content of type {part.get('type')!r} is not supported "
                                f"(text only)", param=f"input.{index}.content")
        parts.append(part.get("text", ""))
    return "".join(parts)


class ResponseBuilder:
    """Chat deltas -> Responses output items, and the streaming events that build them."""

    def __init__(self, req: ResponsesRequest):
        self.req, self.id, self.created = req, new_id("resp"), int(time.time())
        self.items: list[dict] = []
        self.open: dict | None = None  # the item being written
        self.sequence = 0

    def event(self, kind: str, **fields) -> dict:
        self.sequence += 1
        return {"type": kind, "sequence_number": self.sequence - 1, **fields}

    def start(self) -> list[dict]:
        shell = self.response("in_progress", 0, 0)
        return [self.event("response.created", response=shell), self.event("response.in_progress", response=shell)]

    def feed(self, deltas: list[dict], logprobs: list[dict] | None = None) -> list[dict]:
        events = []
        for delta in deltas:
            if delta.get("content"):
                if self.open is None or self.open["type"] != "message":
                    events += self._close()
                    events += self._open({"type": "message", "id": new_id("msg"), "status": "in_progress",
                                          "role": "assistant", "content": []})
                    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                    self.open["content"].append(part)
                    events.append(self.event("response.content_part.added", item_id=self.open["id"],
                                             output_index=len(self.items), content_index=0, part=dict(part)))
                part = self.open["content"][0]
                part["text"] += delta["content"]
                part["logprobs"] += logprobs or []
                events.append(self.event("response.output_text.delta", item_id=self.open["id"],
                                         output_index=len(self.items), content_index=0, delta=delta["content"],
                                         logprobs=logprobs or []))
                logprobs = None
            for piece in delta.get("tool_calls", []):
                function = piece.get("function", {})
                if "id" in piece:  # a new call
                    events += self._close()
                    events += self._open({"type": "function_call", "id": new_id("fc"), "call_id": piece["id"],
                                          "name": function.get("name", ""), "arguments": "",
                                          "status": "in_progress"})
                if function.get("arguments"):
                    self.open["arguments"] += function["arguments"]
                    events.append(self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                                             output_index=len(self.items), delta=function["arguments"]))
        return events

    def _open(self, item: dict) -> list[dict]:
        self.open = item
        return [self.event("response.output_item.added", output_index=len(self.items), item=dict(item, content=[])
                           if item["type"] == "message" else dict(item))]

    def _close(self) -> list[dict]:
        if self.open is None:
            return []
        item, index, events = self.open, len(self.items), []
        item["status"] = "completed"
        if item["type"] == "message":
            part = item["content"][0]
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=part["text"], logprobs=part["logprobs"]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"],
                                     output_index=index, arguments=item["arguments"], name=item["name"]))
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.items.append(item)
        self.open = None
        return events

    def finish(self, reason: str, prompt_tokens: int, tokens: int) -> list[dict]:
        """The closing events; the last carries the whole response."""
        events = self._close()
        status = "incomplete" if reason == "length" else "completed"
        final = self.response(status, prompt_tokens, tokens)
        return events + [self.event(f"response.{status}", response=final)]

    def response(self, status: str, prompt_tokens: int, tokens: int) -> dict:
        r = self.req
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "model": r.model,
            "output": list(self.items), "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": r.instructions, "max_output_tokens": r.max_output_tokens, "metadata": r.metadata or {},
            "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
            "temperature": r.temperature, "top_p": r.top_p, "tool_choice": r.tool_choice or "auto",
            "tools": r.tools or [], "text": r.text or {"format": {"type": "text"}}, "truncation": "disabled",
            "reasoning": None, "store": False, "user": r.user,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": tokens, "total_tokens": prompt_tokens + tokens,
                      "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens_details": {"reasoning_tokens": 0}},
        }


def sse_event(event: dict) -> str:
    """One server-sent event as OpenAI streams Responses events (named by type)."""
    return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"
