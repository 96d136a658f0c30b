"""The OpenAI-compatible HTTP server: a thin FastAPI layer over one AsyncEngine (continuous batching).

Endpoints: POST /v1/chat/completions and /v1/completions (JSON or server-sent events), GET /v1/models,
POST /tokenize and /detokenize, GET /tokenizer_info (vLLM's, which lm-eval's remote tokenizer reads), /health and
/metrics (Prometheus text). `qwen25 serve --model DIR` runs it with uvicorn on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import sys
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import generation
from ..generation import Engine, SamplingParams, TextTracker
from ..generation.grammar import GrammarError, Grammars
from ..model import load_model
from ..tokenizer import Tokenizer, TokenizerError, encode_chat, official_chat_template
from .async_engine import AsyncEngine
from .openai_protocol import (
    APIError,
    ChatCompletionRequest,
    ChatDeltaStream,
    CompletionRequest,
    DetokenizeRequest,
    LogprobFormatter,
    TokenizeRequest,
    envelope,
    finish_reason,
    merge_completion_logprobs,
    merge_deltas,
    new_id,
    parse_request,
    usage,
)
from .quant import prepare_for_decode
from .responses import ResponseBuilder, ResponsesRequest, sse_event

log = logging.getLogger("qwen25.serve")


@dataclass
class ServerConfig:
    """What the server allows and how it names the model. Defaults are the checkpoint's generation settings."""

    model_name: str
    defaults: SamplingParams
    api_key: str | None = None  # every route needs `Authorization: Bearer KEY` when set
    max_prompt_tokens: int | None = None  # None: what fits the engine's context
    max_tokens_limit: int = 4096
    max_concurrent: int = 64  # sequences (prompts x n) in flight, over all requests
    max_body_bytes: int = 16 * 2**20  # a longer body gets a 413 before it is read whole
    chat_template: str | None = None  # what /tokenizer_info reports (None: Qwen2.5's official template)


class Metrics:
    """Counters for /metrics (Prometheus text format), kept on the event loop's thread."""

    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.prompt_tokens = self.in_flight = 0
        self.ttft_sum = self.ttft_count = self.latency_sum = self.latency_count = 0.0

    def finished(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1
        if seconds is not None:
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self, engine: AsyncEngine) -> str:
        c, stats = engine.counters, engine.stats
        lines = ["# HELP qwen25_requests_total HTTP requests by endpoint and status.",
                 "# TYPE qwen25_requests_total counter"]
        lines += [f'qwen25_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                  for (e, s), n in sorted(self.requests.items())]
        values = [
            ("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.", self.prompt_tokens),
            ("generation_tokens_total", "counter", "Tokens generated.", c["generated_tokens"]),
            ("generation_tokens_per_second", "gauge", "Tokens generated per second, last 10 s.",
             round(engine.throughput.rate(), 3)),
            ("requests_running", "gauge", "Sequences in the engine's batch.", engine.running),
            ("requests_waiting", "gauge", "Sequences queued for a batch slot (queue length).", engine.queue_length),
            ("requests_in_flight", "gauge", "HTTP generation requests being served.", self.in_flight),
            ("sequences_finished_total", "counter", "Sequences that finished (stop or length).", c["finished"]),
            ("sequences_cancelled_total", "counter", "Sequences cancelled (client gone).", c["cancelled"]),
            ("sequences_failed_total", "counter", "Sequences that ended with an error.", c["errors"]),
            ("engine_steps_total", "counter", "Engine steps (prefill and/or one decode for the batch).", c["steps"]),
            ("prefix_cache_reused_tokens_total", "counter", "Prompt tokens served from the prefix cache.",
             stats.get("reused_tokens", 0)),
            ("spec_decode_draft_tokens_total", "counter", "Prompt-lookup draft tokens verified.",
             stats.get("draft_tokens", 0)),
            ("spec_decode_accepted_tokens_total", "counter", "Draft tokens accepted (each one decode step saved).",
             stats.get("accepted_draft_tokens", 0)),
        ]
        for name, kind, text, value in values:
            lines += [f"# HELP qwen25_{name} {text}", f"# TYPE qwen25_{name} {kind}", f"qwen25_{name} {value}"]
        for name, text, total, count in [
                ("time_to_first_token_seconds", "Time from request to its first token.", self.ttft_sum,
                 self.ttft_count),
                ("request_duration_seconds", "Duration of generation requests.", self.latency_sum, self.latency_count)]:
            lines += [f"# HELP qwen25_{name} {text}", f"# TYPE qwen25_{name} summary",
                      f"qwen25_{name}_sum {round(total, 6)}", f"qwen25_{name}_count {int(count)}"]
        return "\n".join(lines) + "\n"


def create_app(engine: AsyncEngine, tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI application; the engine thread starts with the app and stops with it."""
    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="qwen25", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(_Gate, api_key=config.api_key, max_body_bytes=config.max_body_bytes)
    metrics = Metrics()
    max_len = engine.max_len
    stop_ids = sorted(set(config.defaults.eos_token_ids) | _chat_stop_ids(tokenizer))
    slots = {"used": 0}  # sequences admitted and not yet finished (changed on the event loop only)
    grammars: list[Grammars] = []  # made on the first constrained request
    # the template of what the server renders (qwen25/tokenizer/chat.py: byte-identical to Qwen2.5's official one)
    chatml = hasattr(tokenizer, "vocab") and tokenizer.vocab.is_chatml()
    chat_template = config.chat_template or (official_chat_template() if chatml else None)
    # Tokenising a long prompt takes a while: done off the event loop (one thread: the tokenizer is shared).
    tokenize = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qwen25-tokenize")

    @app.exception_handler(APIError)
    async def _api_error(request: Request, error: APIError):
        if not getattr(error, "counted", False):
            metrics.finished(request.url.path, error.status)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException):  # unknown routes and methods
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(error.status_code, error.detail)
        return await _api_error(request, APIError(error.status_code, message, code={404: "not_found"}.get(
            error.status_code)))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception):  # a bug must still answer in JSON, never plain text
        log.exception("unexpected error on %s", request.url.path)
        metrics.finished(request.url.path, 500)
        return JSONResponse(APIError(500, f"internal error: {type(error).__name__}", "server_error").body(),
                            status_code=500)

    async def read_body(request: Request) -> bytes:
        """The body, read in pieces and refused (413) past max_body_bytes: never held whole when too long."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise APIError(413, f"the request body is larger than this server's limit of "
                                    f"{config.max_body_bytes} bytes", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def off_loop(fn, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenize, fn, *args)

    def check_model(name: str) -> None:
        if name != config.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")

    def token_ids(ids, field: str) -> list[int]:
        vocab = engine.vocab_size if ids else 0
        for token in ids:
            if not 0 <= int(token) < vocab:
                raise APIError(400, f"{field} names token {token}, outside the vocabulary [0, {vocab})", param=field)
        return [int(t) for t in ids]

    def sampling(req, prompt_len: int, max_tokens: int | None, prompt_field: str) -> SamplingParams:
        """The request's settings over the checkpoint's defaults, after the limits."""
        limit = config.max_prompt_tokens or max_len - 1
        if prompt_len > limit:
            raise APIError(400, f"the prompt has {prompt_len} tokens, more than the limit of {limit}",
                           param=prompt_field, code="context_length_exceeded")
        if max_tokens is not None and max_tokens > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, more than this server's limit of "
                                f"{config.max_tokens_limit}", param="max_tokens")
        room = max_len - prompt_len
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"this model's context is {max_len} tokens, but {prompt_len} prompt tokens + "
                                f"{max_tokens} max_tokens exceed it", param="max_tokens",
                           code="context_length_exceeded")
        max_new = min(max_tokens or config.max_tokens_limit, room) if max_tokens != 0 else 1  # 0: scoring (echo)
        if req.min_tokens > max_new:
            raise APIError(400, f"min_tokens {req.min_tokens} is more than max_tokens {max_new}", param="min_tokens")
        bias = dict(zip(token_ids(req.logit_bias or {}, "logit_bias"), (req.logit_bias or {}).values()))
        extra_stops = token_ids(req.stop_token_ids or [], "stop_token_ids")
        d = config.defaults
        top = req.top_logprobs_count
        return SamplingParams(
            temperature=req.temperature if req.temperature is not None else d.temperature,
            top_p=req.top_p if req.top_p is not None else d.top_p,
            top_k=req.top_k if req.top_k is not None else d.top_k,
            repetition_penalty=req.repetition_penalty if req.repetition_penalty is not None else d.repetition_penalty,
            min_p=req.min_p if req.min_p is not None else d.min_p,
            presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
            logit_bias=bias, min_tokens=req.min_tokens, max_new_tokens=max_new, seed=req.seed,
            eos_token_ids=sorted(set(extra_stops) | (set() if req.ignore_eos else set(stop_ids))), logprobs=top,
            prompt_logprobs=top if getattr(req, "echo", False) and top is not None else None)

    def constraint_for(req):
        """A function that makes each choice's grammar, or None: a forced tool call (tool_choice required or
        named; response_format then has nothing to apply to), else the response_format schema, or either a tool
        call or that schema when tools are offered."""
        forced = getattr(req, "forced_tool", None)
        schema = req.response_format.schema() if req.response_format else None
        if forced is None and schema is None:
            return None
        offered = getattr(req, "parse_tools", False)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if forced or offered else None
        if not grammars:
            grammars.append(Grammars(tokenizer, engine.vocab_size, stop_ids))
        grammar = grammars[0]
        if forced is not None:
            make = lambda: grammar.tool_calls(tools, None if forced == "*" else forced)  # noqa: E731
        elif tools:
            make = lambda: grammar.tool_calls(tools, or_schema=schema)  # noqa: E731
        else:
            make = lambda: grammar.json_schema(schema)  # noqa: E731
        try:
            make()  # compiles now: a schema llguidance refuses is a 400 before anything runs
        except GrammarError as e:
            param = "tools" if forced is not None else "response_format"
            raise APIError(400, f"{param}: {e}", param=param) from None
        return make

    def choices_for(req, prompt: list[int], params: SamplingParams, constraint=None) -> list[generation.Request]:
        out = []
        for i in range(req.n):  # n choices differ by seed (seed + i; unseeded ones draw their own)
            seed = None if params.seed is None else params.seed + i
            out.append(generation.Request(list(prompt), dataclasses.replace(params, seed=seed),
                                          should_stop=TextTracker(tokenizer, req.stop),
                                          constraint=constraint() if constraint else None))
        return out

    def check_size(sequences: int) -> None:
        if sequences > config.max_concurrent:
            raise APIError(400, f"the request asks for {sequences} sequences (prompts x n), more than this server "
                                f"runs at once ({config.max_concurrent})", param="n")

    def admit(sequences: int):
        """Reserve `sequences` of the server's max_concurrent at once (no await between the check and the count,
        so a burst cannot slip past it); returns the release, which the request's event stream calls when done."""
        check_size(sequences)
        if slots["used"] + sequences > config.max_concurrent:
            raise APIError(429, f"the server is busy: {slots['used']} sequences in flight (limit "
                                f"{config.max_concurrent}); retry later", "rate_limit_error")
        slots["used"] += sequences
        released = []

        def release() -> None:
            if not released:
                released.append(True)
                slots["used"] -= sequences
        return release

    @app.get("/health")
    async def health():
        if not engine.alive:
            return JSONResponse({"status": "engine thread stopped"}, status_code=503)
        return {"status": "ok", "running": engine.running, "waiting": engine.queue_length}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(engine), media_type="text/plain; version=0.0.4")

    @app.get("/tokenizer_info")
    async def tokenizer_info():
        return {"tokenizer_class": "Qwen2TokenizerFast", "eos_token": _token_or_none(tokenizer, "eos_id"),
                "bos_token": None, "pad_token": _token_or_none(tokenizer, "pad_id"),
                "chat_template": chat_template, "model_max_length": max_len, "vocab_size": len(tokenizer)}

    @app.post("/tokenize")
    async def tokenize_route(request: Request):
        body = await off_loop(parse_request, TokenizeRequest, await read_body(request))
        if body.messages is not None:
            try:
                ids = await off_loop(lambda: encode_chat(tokenizer, [m.model_dump(exclude_none=True)
                                                                     for m in body.messages],
                                                         [t.model_dump(exclude_none=True) for t in body.tools]
                                                         if body.tools else None,
                                                         add_generation_prompt=body.add_generation_prompt,
                                                         sanitize=True).ids)
            except TokenizerError as e:
                raise APIError(400, f"invalid messages: {e}", param="messages") from None
        elif body.prompt is not None:
            ids = await off_loop(tokenizer.encode, body.prompt)
        else:
            raise APIError(400, "tokenize needs a prompt or messages", param="prompt")
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize_route(request: Request):
        body = await off_loop(parse_request, DetokenizeRequest, await read_body(request))
        return {"prompt": tokenizer.decode(token_ids(body.tokens, "tokens"))}

    def model_card() -> dict:
        return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "qwen25", "max_model_len": max_len}

    @app.get("/v1/models")
    async def models(request: Request):
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):  # the openai SDK's client.models.retrieve
        check_model(name)
        return model_card()

    async def start_chat(req: ChatCompletionRequest, request: Request):
        """Submit a chat request: (prompt, per-choice delta streams, the engine's events, log-prob formatter)."""
        check_model(req.model)
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            encoded = await off_loop(lambda: encode_chat(tokenizer, req.chat_messages(), tools,
                                                         add_generation_prompt=True, sanitize=True))
        except TokenizerError as e:
            raise APIError(400, f"invalid messages: {e}", param="messages") from None
        prompt = encoded.ids
        params = sampling(req, len(prompt), req.max_completion_tokens or req.max_tokens, "messages")
        constraint = await off_loop(constraint_for, req)
        release = admit(req.n)
        streams = [ChatDeltaStream(req.parse_tools) for _ in range(req.n)]
        requests = choices_for(req, prompt, params, constraint)
        events = _tracked(engine.stream(requests), metrics, request.url.path, len(prompt), release)
        return prompt, streams, events, LogprobFormatter(tokenizer) if params.logprobs is not None else None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await off_loop(parse_request, ChatCompletionRequest, await read_body(request))
        prompt, streams, events, logprobs = await start_chat(req, request)
        rid, created = new_id("chatcmpl"), int(time.time())
        if req.stream:
            return _sse(request, _chat_chunks(events, streams, rid, created, req, len(prompt), logprobs))
        scored: list[list] = [[] for _ in range(req.n)]

        def feed(i: int, event) -> list:
            scored[i] += event.logprobs
            return streams[i].feed(event.text)
        deltas, reasons, tokens = await _collect(request, events, req.n, feed, lambda i: streams[i].finish())
        choices = [{"index": i, "message": merge_deltas(deltas[i]),
                    "logprobs": {"content": logprobs.chat(scored[i]), "refusal": None} if logprobs else None,
                    "finish_reason": finish_reason(reasons[i], streams[i].calls)} for i in range(req.n)]
        return envelope(rid, "chat.completion", req.model, created, choices=choices, usage=usage(len(prompt), tokens))

    @app.post("/v1/responses")
    async def responses(request: Request):
        req: ResponsesRequest = await off_loop(parse_request, ResponsesRequest, await read_body(request))
        chat = req.to_chat()
        prompt, streams, events, logprobs = await start_chat(chat, request)
        builder, stream = ResponseBuilder(req), streams[0]

        async def build():
            yield builder.start()
            reason, tokens = "stop", 0
            async for event in events:
                scored = logprobs.chat(event.logprobs) if logprobs and event.logprobs else None
                yield builder.feed(stream.feed(event.text), scored)
                tokens = event.tokens
                if event.finish_reason:
                    reason = event.finish_reason
                    yield builder.feed(stream.finish())
            yield builder.finish(reason, len(prompt), tokens)

        if req.stream:
            async def body():
                try:
                    async for batch in build():
                        for event in batch:
                            yield sse_event(event)
                except APIError as e:  # the headers are gone: an error event, as OpenAI sends
                    yield sse_event(builder.event("error", code=e.code, message=e.message, param=e.param))
            return StreamingResponse(body(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        final = None

        async def run():
            nonlocal final
            async for batch in build():
                final = batch[-1]["response"] if batch and "response" in batch[-1] else final
        await _collect_task(request, run())
        return final

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await off_loop(parse_request, CompletionRequest, await read_body(request))
        check_model(req.model)
        count = len(req.prompt) if isinstance(req.prompt, list) and not isinstance(req.prompt[0], int) else 1
        check_size(count * req.n)  # before tokenising thousands of prompts
        prompts = await off_loop(_completion_prompts, req.prompt, tokenizer)
        if req.suffix is not None:
            prompts = await off_loop(_fill_in_the_middle, prompts, req.suffix, tokenizer)
        constraint = await off_loop(constraint_for, req)
        requests, texts, owners = [], [], []
        for prompt in prompts:
            # OpenAI's default max_tokens for completions is 16
            params = sampling(req, len(prompt), 16 if req.max_tokens is None else req.max_tokens, "prompt")
            requests += choices_for(req, prompt, params, constraint)
            texts += [tokenizer.decode(prompt) if req.echo else ""] * req.n
            owners += [prompt] * req.n
        release = admit(len(requests))
        rid, created = new_id("cmpl"), int(time.time())
        prompt_tokens = sum(map(len, prompts))
        events = _tracked(engine.stream(requests), metrics, request.url.path, prompt_tokens, release)
        scoring = req.max_tokens == 0  # echo of the prompt's log-probabilities only: the one token run is dropped
        formatters = [LogprobFormatter(tokenizer) if req.logprobs is not None else None for _ in requests]
        if req.stream:
            return _sse(request, _completion_chunks(events, rid, created, req, prompt_tokens, formatters, owners,
                                                    texts, scoring))
        parts: list[list] = [[] for _ in requests]

        def feed(i: int, event) -> list:
            text, logprobs = _completion_piece(event, owners[i], formatters[i], scoring)
            if logprobs:
                parts[i].append(logprobs)
            return [text]
        pieces, reasons, tokens = await _collect(request, events, len(requests), feed, lambda i: [])
        choices = [{"index": i, "text": texts[i] + "".join(pieces[i]), "logprobs": merge_completion_logprobs(parts[i]),
                    "finish_reason": "length" if scoring else finish_reason(reasons[i], 0)}
                   for i in range(len(requests))]
        return envelope(rid, "text_completion", req.model, created, choices=choices,
                        usage=usage(prompt_tokens, 0 if scoring else tokens))

    return app


class _Gate:
    """Pure ASGI middleware in front of every route: the API key (compared in constant time) and the body-size
    limit by Content-Length, before any handler runs or any body byte is read."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return await _send_error(send, APIError(401, "missing or wrong API key (send the header Authorization: "
                                                         "Bearer KEY)", "authentication_error", code="invalid_api_key"))
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_error(send, APIError(413, f"the request body is larger than this server's limit of "
                                                         f"{self.max_body_bytes} bytes", code="request_too_large"))
        return await self.app(scope, receive, send)


async def _send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _token_or_none(tokenizer, name: str) -> str | None:
    try:
        return tokenizer.decode([getattr(tokenizer, name)])
    except TokenizerError:
        return None


def _chat_stop_ids(tokenizer) -> set[int]:
    """<|im_end|> and <|endoftext|>: a chat turn ends with either."""
    ids = set()
    for name in ("im_end_id", "endoftext_id"):
        try:
            ids.add(getattr(tokenizer, name))
        except TokenizerError:
            pass
    return ids


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    if isinstance(prompt, str):
        return [tokenizer.encode(prompt)]
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _fill_in_the_middle(prompts: list[list[int]], suffix: str, tokenizer) -> list[list[int]]:
    """Qwen2.5(-Coder)'s fill-in-the-middle prompt: <|fim_prefix|>PROMPT<|fim_suffix|>SUFFIX<|fim_middle|>; the model
    writes the middle (`suffix` of /v1/completions)."""
    try:
        ids = [tokenizer.token_to_id(t) for t in ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")]
    except (TokenizerError, KeyError, ValueError):
        raise APIError(400, "suffix (fill-in-the-middle) needs Qwen's <|fim_*|> tokens, which this tokenizer lacks",
                       param="suffix") from None
    tail = [ids[1]] + tokenizer.encode(suffix) + [ids[2]]
    return [[ids[0]] + p + tail for p in prompts]


def _tracked(events, metrics: Metrics, endpoint: str, prompt_tokens: int, release):
    """The engine's events, counted in the metrics (in flight, first-token time, duration, status); `release`
    frees the request's admission when it ends, or when the stream is dropped before it ever ran."""
    tracked = _tracked_events(events, metrics, endpoint, prompt_tokens, release)
    weakref.finalize(tracked, release)
    return tracked


async def _tracked_events(events, metrics: Metrics, endpoint: str, prompt_tokens: int, release):
    start, first, status = time.perf_counter(), True, 200
    metrics.in_flight += 1
    metrics.prompt_tokens += prompt_tokens
    try:
        async for event in events:
            if event.error:
                status = event.status
                error = APIError(status, event.error, "server_error" if status >= 500 else "invalid_request_error")
                error.counted = True  # counted here, in the finally below
                raise error
            if first and event.tokens:
                metrics.ttft_sum += time.perf_counter() - start
                metrics.ttft_count += 1
                first = False
            yield event
    except asyncio.CancelledError:
        status = 499  # nginx's "client closed request"
        raise
    finally:
        release()
        await events.aclose()
        metrics.in_flight -= 1
        if status != 200:
            metrics.finished(endpoint, status)
        else:
            metrics.finished(endpoint, 200, time.perf_counter() - start)


async def _collect(request: Request, events, n: int, feed, finish):
    """Run a non-streaming request to the end; cancelled if the client disconnects meanwhile."""
    parts: list[list] = [[] for _ in range(n)]
    reasons, tokens = ["stop"] * n, [0] * n

    async def run():
        async for event in events:
            parts[event.index] += feed(event.index, event)
            tokens[event.index] = event.tokens
            if event.finish_reason:
                parts[event.index] += finish(event.index)
                reasons[event.index] = event.finish_reason

    await _collect_task(request, run())
    return parts, reasons, sum(tokens)


async def _collect_task(request: Request, work) -> None:
    """Await `work` (a coroutine); cancel it if the client disconnects meanwhile."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=0.5)
        if not task.done() and await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
    task.result()


def _sse(request: Request, chunks) -> StreamingResponse:
    async def body():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _chat_chunks(events, streams: list[ChatDeltaStream], rid, created, req, prompt_tokens: int,
                       logprobs: LogprobFormatter | None = None):
    """Chat chunks: the role first, content/tool-call deltas, finish_reason last (per choice), then usage. The
    log-probabilities of the tokens behind an event ride on its first chunk."""
    def chunk(index: int, delta: dict, reason: str | None = None, scored=None) -> dict:
        entries = {"content": logprobs.chat(scored), "refusal": None} if scored else None
        return envelope(rid, "chat.completion.chunk", req.model, created,
                        choices=[{"index": index, "delta": delta, "logprobs": entries, "finish_reason": reason}])

    for i in range(req.n):
        yield chunk(i, {"role": "assistant", "content": ""})
    tokens = [0] * req.n
    try:
        async for event in events:
            tokens[event.index] = event.tokens
            scored = event.logprobs if logprobs else None
            deltas = streams[event.index].feed(event.text)
            if scored and not deltas:
                deltas = [{}]
            for delta in deltas:
                yield chunk(event.index, delta, scored=scored)
                scored = None
            if event.finish_reason:
                for delta in streams[event.index].finish():
                    yield chunk(event.index, delta)
                yield chunk(event.index, {}, finish_reason(event.finish_reason, streams[event.index].calls))
    except APIError as e:  # the headers are gone: report the error in the stream, as OpenAI does
        yield e.body()
        return
    if req.include_usage:
        yield envelope(rid, "chat.completion.chunk", req.model, created, choices=[],
                       usage=usage(prompt_tokens, sum(tokens)))


def _completion_piece(event, prompt: list[int], formatter, scoring: bool) -> tuple[str, dict | None]:
    """The text and the logprobs object (None: none asked for, or none yet) one engine event adds to a completion
    choice: the prompt's log-probabilities on its first event, then the generated tokens' (scoring, max_tokens 0:
    the prompt's only, the one token run dropped)."""
    entries, text = ([], "") if scoring else (event.logprobs, event.text)
    if event.prompt_logprobs is not None:
        entries = list(zip(prompt, event.prompt_logprobs)) + entries
    return text, formatter.completion(entries) if formatter is not None and entries else None


async def _completion_chunks(events, rid, created, req, prompt_tokens: int, formatters: list, owners: list,
                             echoes: list[str], scoring: bool):
    """Completion chunks: a choice's first chunk starts with its echoed prompt (and the prompt's log-probabilities);
    with max_tokens 0 (scoring) the one token run is dropped."""
    def chunk(index: int, text: str, reason: str | None = None, logprobs=None) -> dict:
        return envelope(rid, "text_completion", req.model, created,
                        choices=[{"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}])

    tokens: dict[int, int] = {}
    started: set[int] = set()
    try:
        async for event in events:
            i = event.index
            tokens[i] = 0 if scoring else event.tokens
            text, logprobs = _completion_piece(event, owners[i], formatters[i], scoring)
            if i not in started:
                started.add(i)
                text = echoes[i] + text
            if text or event.finish_reason or logprobs:
                reason = ("length" if scoring else finish_reason(event.finish_reason, 0)) if event.finish_reason \
                    else None
                yield chunk(i, text, reason, logprobs)
    except APIError as e:
        yield e.body()
        return
    if req.include_usage:
        yield envelope(rid, "text_completion", req.model, created, choices=[],
                       usage=usage(prompt_tokens, sum(tokens.values())))


# ---- building and running --------------------------------------------------------------------------------------
GIL_SWITCH_INTERVAL = 2e-4  # seconds


def build_server(model_dir: str | Path, *, max_batch: int = 8, max_len: int | None = None, int8: bool = False, int4: bool = False,
                 w8a8: bool = False, dtype: str = "auto", threads: int | None = None, model_name: str | None = None,
                 prefill_chunk: int | None = 512, kernels: bool = True, engine_thread: bool = True,
                 prompt_lookup: int = 0, kv_int8: bool = False, sparse_prefill=None, decode_share: float = 0.5,
                 **limits) -> tuple[FastAPI, AsyncEngine]:
    """Load a checkpoint directory (weights + tokenizer files) and build the app around a fresh engine.

    engine_thread=False: the engine does not start a thread of its own; the caller drives it with engine.run()
    (`qwen25 serve` does, on the main thread, where the model was loaded: see AsyncEngine). sparse_prefill: a
    model.sparse.SparsePrefill for long prompts (None: dense attention). decode_share: the share of time running
    streams keep while a prompt is read beside them (Engine)."""
    import torch


    if threads:
        torch.set_num_threads(threads)
    # The engine and the HTTP thread share the GIL: after a kernel call (which releases it) the engine waits for it
    # up to Python's switch interval (5 ms by default) while the HTTP thread runs. 0.2 ms: a 0.5B stream 25 -> 31
    # tok/s, 16 streams 37 -> 41 (benchmarks/serve.py). A process-wide setting: this process serves.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_model(model_dir, dtype=dtype)
    log.info("model: %s", prepare_for_decode(model, int8=int8, w8a8=w8a8, int4=int4, kernels=kernels))
    model.sparse_prefill = sparse_prefill
    engine = AsyncEngine(Engine(model, max_batch=max_batch, max_len=max_len, vocab_limit=len(tokenizer),
                                 prefill_chunk=prefill_chunk, prompt_lookup=prompt_lookup, kv_int8=kv_int8,
                                 decode_share=decode_share), tokenizer,
                         own_thread=engine_thread)
    defaults = SamplingParams.from_checkpoint(model_dir, eos_token_ids=model.config.eos_token_ids)
    config = ServerConfig(model_name=model_name or Path(model_dir).resolve().name, defaults=defaults, **limits)
    return create_app(engine, tokenizer, config), engine


def run_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0):
    """Start uvicorn on a background thread (tests, benchmarks); returns (server, base_url). Stop it with
    `server.should_exit = True`."""
    import socket
    import threading

    import uvicorn

    if port == 0:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    server.thread = thread
    return server, f"http://{host}:{port}"
