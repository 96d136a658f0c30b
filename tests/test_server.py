"""The OpenAI-compatible server: outputs equal the engine's greedy outputs, the exact SSE chunk structure (tool calls
from a scripted engine), limits and errors, metrics, disconnects, and the official `openai` client on a live server."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections import deque
from types import SimpleNamespace

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from fastapi.testclient import TestClient
from serve_fixtures import greedy_reply, write_tiny_chat_checkpoint

from qwen25.generation import SamplingParams
from qwen25.model import load_model
from qwen25.serve import cpu_kernels
from qwen25.serve.async_engine import AsyncEngine, TextTracker
from qwen25.generation import StepOutput
from qwen25.serve.openai_protocol import ChatDeltaStream, merge_deltas
from qwen25.serve.quant import Int8Linear
from qwen25.serve.server import ServerConfig, build_server, create_app, run_in_thread
from qwen25.tokenizer import Tokenizer, encode_chat

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, what is 2+2?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
SCRIPT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris", "format": "24h"}}\n</tool_call>')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def served(model_dir):
    """(TestClient, AsyncEngine, model, tokenizer) for the real engine on the tiny checkpoint."""
    app, engine = build_server(model_dir, max_batch=4, max_len=256, model_name="tiny", max_tokens_limit=200,
                               max_prompt_tokens=150)
    with TestClient(app) as client:
        yield client, engine, load_model(model_dir, dtype="fp32"), Tokenizer.from_dir(model_dir)


def greedy_text(served, prompt: list[int], n: int) -> tuple[str, list[int]]:
    """What the model generates greedily (generation.generate, no engine) and the text the server should send."""
    _, _, model, tok = served
    return greedy_reply(model, tok, prompt, n)


def sse(response) -> list:
    """The data lines of an event stream (JSON decoded, except [DONE])."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines), lines
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body})


# ---- outputs equal the engine's ----------------------------------------------------------------------------------
def test_chat_equals_greedy_generation(served):
    client, _, _, tok = served
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    text, ids = greedy_text(served, prompt, 12)
    body = chat(client, max_tokens=12, temperature=0).json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": text}
    assert body["choices"][0]["finish_reason"] == ("stop" if len(ids) < 12 else "length")
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                             "total_tokens": len(prompt) + len(ids)}


def test_streamed_chat_chunks(served):
    client, _, _, tok = served
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    text, ids = greedy_text(served, prompt, 10)
    with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 10,
                                                             "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[1:-1])
    *body, last, usage = chunks
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in body)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in body) == text
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(ids) == 10


def test_completions_batch_n_echo(served):
    client, _, _, tok = served
    prompts = ["The quick brown fox", "通义千问"]
    expected = [greedy_text(served, tok.encode(p), 6)[0] for p in prompts]
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompts, "max_tokens": 6, "n": 2,
                                                "temperature": 0}).json()
    assert [c["text"] for c in body["choices"]] == [expected[0]] * 2 + [expected[1]] * 2
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == sum(len(tok.encode(p)) for p in prompts)
    ids = tok.encode(prompts[0])
    echoed = client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 6, "echo": True,
                                                  "temperature": 0}).json()
    assert echoed["choices"][0]["text"] == prompts[0] + expected[0]


def test_sampling_seed_reproducible_and_n_differs(served):
    client = served[0]
    body = dict(max_tokens=8, temperature=1.0, top_p=0.9, seed=123, n=2)
    a, b = chat(client, **body).json(), chat(client, **body).json()
    texts = [c["message"]["content"] for c in a["choices"]]
    assert texts == [c["message"]["content"] for c in b["choices"]]
    assert texts[0] != texts[1]  # seed + i per choice


def test_stop_strings(served):
    client, _, _, tok = served
    prompt = tok.encode("Numbers: 0 1 12")
    text, ids = greedy_text(served, prompt, 20)
    stop = text[6:9]
    cut = text.index(stop)
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": "Numbers: 0 1 12", "max_tokens": 20,
                                                "stop": [stop, "never-there"], "temperature": 0}).json()
    choice = body["choices"][0]
    assert choice["text"] == text[:cut] and choice["finish_reason"] == "stop"
    # generation ended at the token that completed the stop string
    n = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k], skip_special_tokens=True))
    assert body["usage"]["completion_tokens"] == n
    with client.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "Numbers: 0 1 12", "stream": True,
                                                        "max_tokens": 20, "stop": stop, "temperature": 0}) as r:
        chunks = sse(r)[:-1]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:cut]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_text_tracker_holds_back_partial_stop_strings():
    tok = SimpleNamespace(decode_stream=lambda skip_special_tokens: SimpleNamespace(
        step=lambda t: "abcdefgh"[t], flush=lambda: ""))
    tracker, sent = TextTracker(tok, ["def", "xyz"]), []
    for t in range(8):
        stopped = tracker.add(t)
        sent.append(tracker.release())
        if stopped:
            break
    assert sent == ["a", "b", "c", "", "", ""] and tracker.release(final=True) == ""


# ---- limits and errors --------------------------------------------------------------------------------------------
def test_errors_are_4xx_with_reasons_and_server_keeps_serving(served):
    client = served[0]
    cases = [
        (client.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": ['), 400, "not valid JSON"),
        (client.post("/v1/chat/completions", json=[1, 2]), 400, "JSON object"),
        (chat(client, model="gpt-4"), 404, "does not exist"),
        (chat(client, max_tokens=-3), 400, "max_tokens"),
        (chat(client, max_tokens=201), 400, "limit of 200"),
        (chat(client, temperature=5), 400, "temperature"),
        (chat(client, messages=[{"role": "wizard", "content": "x"}]), 400, "messages.0.role"),
        (chat(client, messages=[]), 400, "messages"),
        (chat(client, messages=[{"role": "user", "content": "word " * 400}]), 400, "more than the limit of 150"),
        (chat(client, max_tokens=200, messages=[{"role": "user", "content": "word " * 20}]), 400, "context is 256"),
        (chat(client, top_logprobs=2), 400, "top_logprobs needs logprobs"),
        (chat(client, best_of=3), 400, "best_of"),
        (chat(client, logit_bias={"9999": -100}), 400, "logit_bias names token 9999"),
        (chat(client, tool_choice="required"), 400, "no tools"),
        (client.post("/v1/completions", json={"model": "tiny", "prompt": [5, 10_000]}), 400, "vocabulary"),
        (client.post("/v1/completions", json={"model": "tiny"}), 400, "prompt"),
    ]
    for response, status, reason in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert reason in error["message"], error
    ok = chat(client, max_tokens=3)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    assert client.get("/health").json()["status"] == "ok"


def test_api_key_and_models(model_dir):
    sys.setswitchinterval(0.005)
    app, _ = build_server(model_dir, max_batch=1, max_len=64, api_key="sekret")
    # the engine gets the GIL back soon after each kernel call (5 ms cost a stream ~20% of its tokens)
    assert sys.getswitchinterval() == pytest.approx(2e-4)
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.post("/v1/chat/completions", json={"model": model_dir.name, "messages": MESSAGES})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        models = client.get("/v1/models", headers={"Authorization": "Bearer sekret"}).json()
        assert [m["id"] for m in models["data"]] == [model_dir.name]
        # every route is behind the key (issue 28: /openapi.json described the API to anyone)
        for path in ("/health", "/metrics", "/openapi.json", "/docs", "/nonexistent"):
            assert client.get(path).status_code == 401, path
        ok = {"Authorization": "Bearer sekret"}
        assert client.get("/health", headers=ok).status_code == 200
        assert client.get("/metrics", headers=ok).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer sekreT"}).status_code == 401


def test_metrics(served):
    """/metrics parses with the Prometheus client's own text parser, and its values move with the traffic."""
    parser = pytest.importorskip("prometheus_client.parser")
    client = served[0]
    generated = chat(client, max_tokens=4).json()["usage"]["completion_tokens"]  # 4, or fewer if it ends first
    families = {f.name: f for f in parser.text_string_to_metric_families(client.get("/metrics").text)}
    value = {s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families.values() for s in f.samples}
    assert value['qwen25_requests_total{"endpoint": "/v1/chat/completions", "status": "200"}'] >= 1
    assert value["qwen25_generation_tokens_total{}"] >= generated >= 1
    assert value["qwen25_generation_tokens_per_second{}"] > 0
    assert value["qwen25_requests_waiting{}"] == 0 and value["qwen25_requests_in_flight{}"] == 0
    assert families["qwen25_requests_waiting"].type == "gauge"
    assert families["qwen25_time_to_first_token_seconds"].type == "summary"
    assert value["qwen25_time_to_first_token_seconds_count{}"] >= 1
    assert value["qwen25_request_duration_seconds_sum{}"] > 0


# ---- tool calls, from a scripted engine -------------------------------------------------------------------------
class ScriptedEngine:
    """An Engine stand-in: every request generates `script` (then <|im_end|>), `delay` seconds a step; like the
    Engine it asks a request's should_stop after every token but an eos."""

    def __init__(self, script: list[int], delay: float = 0.0, max_len: int = 4096, fail_at_step: int | None = None):
        self.script, self.delay, self.max_len, self.fail_at_step, self.steps = script, delay, max_len, fail_at_step, 0
        self.waiting, self.running, self.cancelled, self.stats = deque(), {}, set(), {}
        self.cache = SimpleNamespace(lengths=torch.zeros(1))

    def submit(self, request):
        self.waiting.append(request)
        return request.id

    def cancel(self, request_id):
        self.cancelled.add(request_id)

    def has_work(self):
        return bool(self.waiting or self.running)

    def reset(self):
        self.waiting.clear()
        self.running.clear()

    def step(self):
        time.sleep(self.delay)
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("scripted failure")
        while self.waiting:
            request = self.waiting.popleft()
            self.running[request.id] = [request, 0]
        outs = []
        for rid, state in list(self.running.items()):
            request, i = state
            if rid in self.cancelled:
                del self.running[rid]
                outs.append(StepOutput(rid, None, "cancelled"))
                continue
            token = self.script[i % len(self.script)]
            state[1] += 1
            done = [self.script[j % len(self.script)] for j in range(state[1])]
            eos = token in request.params.eos_token_ids
            reason = ("stop" if eos or (request.should_stop is not None and request.should_stop(done)) else
                      "length" if state[1] >= request.params.max_new_tokens else None)
            if reason:
                del self.running[rid]
            outs.append(StepOutput(rid, token, reason))
        return outs


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


def scripted_app(tokenizer, text: str, delay: float = 0.0, fail_at_step: int | None = None, eos: bool = True,
                 **limits):
    """A server over a ScriptedEngine; eos=False repeats the text until max_tokens."""
    script = tokenizer.encode(text) + ([tokenizer.im_end_id] if eos else [])
    engine = AsyncEngine(ScriptedEngine(script, delay, fail_at_step=fail_at_step), tokenizer)
    config = ServerConfig(model_name="tiny", defaults=SamplingParams(), **limits)
    return create_app(engine, tokenizer, config), engine


def test_streamed_tool_calls_exact_structure(tokenizer):
    app, _ = scripted_app(tokenizer, SCRIPT)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json={"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "stream": True}) as r:
            events = sse(r)
        whole = chat(client, tools=TOOLS).json()
    assert events[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in events[:-1]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    content = [d["content"] for d in deltas[1:] if "content" in d]
    assert "".join(content) == "Let me check." and not any("<" in c or "tool_call" in c for c in content)
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(c) == 1 for c in calls)
    pieces = [c[0] for c in calls]
    indices = [p["index"] for p in pieces]
    assert indices == sorted(indices) and set(indices) == {0, 1}
    for index, name, arguments in ((0, "get_weather", {"city": "Paris"}),
                                   (1, "get_time", {"tz": "Europe/Paris", "format": "24h"})):
        head, *fragments = [p for p in pieces if p["index"] == index]  # id, type and name first; then arguments
        assert head["id"].startswith("call") and head["type"] == "function" and head["function"]["arguments"] == ""
        assert head["function"]["name"] == name
        assert all("id" not in f and "name" not in f["function"] for f in fragments)
        assert len(fragments) > 1  # streamed as the model writes them, one token's text at a time
        assert json.loads("".join(f["function"]["arguments"] for f in fragments)) == arguments
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and deltas[-1] == {}
    message = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls" and message["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"tz": "Europe/Paris", "format": "24h"})]


# A call whose arguments hold braces, an escaped quote and a "</tool" inside a string; an empty call; a malformed
# block (content); a block with "arguments" before "name" (cannot stream: decided when it ends); trailing text.
CALLS_TEXT = ('Sure.\n<tool_call>\n{"name": "write_file", "arguments": {"path": "a.py", "text": "x = {\\"k\\": [1]}'
              ' # }</tool"}}\n</tool_call>\n<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\n<tool_call>\n'
              '{"name": "c", "arguments": {oops}}\n</tool_call>\n<tool_call>{"arguments": {"q": 1}, "name": "d"}'
              '</tool_call> end')


def stream_deltas(text: str, cuts: list[int]) -> list[list[dict]]:
    stream = ChatDeltaStream(parse_tools=True)
    bounds = [0, *sorted(cuts), len(text)]
    return [stream.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])] + [stream.finish()]


def without_ids(message: dict) -> dict:
    return {**message, "tool_calls": [{**c, "id": None} for c in message.get("tool_calls", [])]}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(0, len(CALLS_TEXT)), max_size=40))
def test_tool_call_deltas_in_any_chunking_add_up_to_the_whole(cuts):
    whole = merge_deltas([d for batch in stream_deltas(CALLS_TEXT, []) for d in batch])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] == [
        ("write_file", {"path": "a.py", "text": 'x = {"k": [1]} # }</tool'}), ("b", {}), ("d", {"q": 1})]
    assert whole["content"] == 'Sure.\n\n\n<tool_call>\n{"name": "c", "arguments": {oops}}\n</tool_call>\n end'
    deltas = [d for batch in stream_deltas(CALLS_TEXT, cuts) for d in batch]
    assert without_ids(merge_deltas(deltas)) == without_ids(whole)
    seen = set()
    for delta in deltas:
        for piece in delta.get("tool_calls", []):  # the head (id, name) before any argument fragment
            assert ("id" in piece) == (piece["index"] not in seen)
            seen.add(piece["index"])


def test_tool_call_arguments_stream_before_the_block_ends():
    per_char = stream_deltas(CALLS_TEXT, list(range(len(CALLS_TEXT))))
    end = CALLS_TEXT.index("</tool_call>")
    early = [p for batch in per_char[:end] for d in batch for p in d.get("tool_calls", [])]
    assert early[0]["function"]["name"] == "write_file"
    assert "".join(p["function"]["arguments"] for p in early[1:]) == (
        '{"path": "a.py", "text": "x = {\\"k\\": [1]} # }</tool"}')  # complete before </tool_call> arrives
    assert len(early) > 40  # a fragment per character written


def test_tool_markup_is_content_without_tools_or_when_malformed(tokenizer):
    app, _ = scripted_app(tokenizer, SCRIPT)
    with TestClient(app) as client:
        plain = chat(client).json()["choices"][0]
        none = chat(client, tools=TOOLS, tool_choice="none").json()["choices"][0]
    assert plain["message"]["content"] == SCRIPT and plain["finish_reason"] == "stop"
    assert none["message"]["content"] == SCRIPT
    bad = 'Hi <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>'
    app, _ = scripted_app(tokenizer, bad)
    with TestClient(app) as client:
        choice = chat(client, tools=TOOLS).json()["choices"][0]
    assert choice["message"]["content"] == 'Hi <tool_call>\n{"name": "f", "arguments": {oops}\n</tool_call>'
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"


def test_streamed_choices_each_open_and_close(tokenizer):
    app, _ = scripted_app(tokenizer, "Paris is sunny.")
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "n": 3,
                                                                 "stream": True}) as r:
            chunks = sse(r)[:-1]
    for i in range(3):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""} and mine[-1]["finish_reason"] == "stop"
        assert "".join(c["delta"].get("content", "") for c in mine) == "Paris is sunny."
        assert all(c["finish_reason"] is None for c in mine[:-1])


def test_engine_failure_is_a_500_and_the_server_recovers(tokenizer):
    app, engine = scripted_app(tokenizer, "Paris is sunny.", fail_at_step=2)
    with TestClient(app) as client:
        failed = chat(client)
        assert failed.status_code == 500 and "scripted failure" in failed.json()["error"]["message"]
        ok = chat(client)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Paris is sunny."
        assert engine.counters["errors"] == 1 and 'status="500"' in client.get("/metrics").text


def test_concurrency_limit_and_disconnect_cancels(tokenizer):
    app, engine = scripted_app(tokenizer, "one two three", delay=0.01, eos=False, max_concurrent=1)
    server, url = run_in_thread(app)
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            body = {"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 2000}
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
                busy = client.post("/v1/chat/completions", json={**body, "stream": False})
                assert busy.status_code == 429 and "busy" in busy.json()["error"]["message"]
            deadline = time.monotonic() + 10  # the stream was closed after one chunk: the engine must stop it
            while engine.counters["cancelled"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.counters["cancelled"] == 1 and not engine.engine.has_work()
            assert engine.counters["generated_tokens"] < 1000
            with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
                client.post("/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
            deadline = time.monotonic() + 10
            while engine.counters["cancelled"] < 2 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.counters["cancelled"] == 2 and not engine.engine.has_work()
            ok = client.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
            assert 'status="499"' in client.get("/metrics").text
    finally:
        server.should_exit = True
        server.thread.join(10)


# ---- the official openai client against a live server -----------------------------------------------------------
def test_openai_client_live(served, model_dir, tokenizer):
    openai = pytest.importorskip("openai")
    _, _, _, tok = served
    app, engine = build_server(model_dir, max_batch=3, max_len=256, model_name="tiny", api_key="k")
    server, url = run_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
        text, ids = greedy_text(served, prompt, 9)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0)
        assert reply.choices[0].message.content == text and reply.usage.completion_tokens == len(ids)
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=9, temperature=0,
                                                stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == len(ids)

        # concurrent clients (more than the engine's 3 slots) each get their single-request greedy output
        prompts = [f"Question {i}: how many legs has a cat?" for i in range(5)]
        expected = [greedy_text(served, tok.encode(p), 7)[0] for p in prompts]
        got = [None] * len(prompts)

        def ask(i):
            got[i] = client.completions.create(model="tiny", prompt=prompts[i], max_tokens=7, temperature=0).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == expected

        # a cancelled stream: closing it early stops generation in the engine
        before = engine.counters["cancelled"]
        stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 10
        while engine.counters["cancelled"] == before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.counters["cancelled"] == before + 1

        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=MESSAGES)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=-1)
        assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
    finally:
        server.should_exit = True
        server.thread.join(10)

    # a tool-call round trip through the client (scripted model output)
    app, _ = scripted_app(tokenizer, SCRIPT)
    server, url = run_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS)
        calls = reply.choices[0].message.tool_calls
        assert reply.choices[0].finish_reason == "tool_calls" and [c.function.name for c in calls] == [
            "get_weather", "get_time"]
        streamed: dict[int, dict] = {}
        for chunk in client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, stream=True):
            for call in chunk.choices[0].delta.tool_calls or []:
                entry = streamed.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
        assert streamed == {i: {"name": c.function.name, "arguments": c.function.arguments} for i, c in enumerate(calls)}
        history = MESSAGES + [reply.choices[0].message.model_dump(exclude_none=True)] + [
            {"role": "tool", "tool_call_id": c.id, "content": json.dumps({"ok": i})} for i, c in enumerate(calls)]
        again = client.chat.completions.create(model="tiny", messages=history, tools=TOOLS)
        assert again.choices[0].finish_reason == "tool_calls"
    finally:
        server.should_exit = True
        server.thread.join(10)


def test_serve_command_defaults_to_loopback():
    from qwen25.cli import build_parser

    args = build_parser().parse_args(["serve", "--model", "some/dir", "--max-batch", "4", "--int8"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.int8) == ("127.0.0.1", 8000, None, 4, True)
    assert callable(args.func)
    chat_args = build_parser().parse_args(["chat", "--model", "d", "--system", "Be brief.", "--no-sample"])
    assert chat_args.system == "Be brief." and chat_args.sample is False and callable(chat_args.func)
    assert args.decode_share == 0.5
    assert build_parser().parse_args(["serve", "--model", "d", "--decode-share", "0"]).decode_share == 0
    with pytest.raises(SystemExit):  # a share of 1 would never read a long prompt beside a stream
        build_parser().parse_args(["serve", "--model", "d", "--decode-share", "1"])


def test_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """The key need not be on the command line, where every user's `ps` reads it (issue 28)."""
    from qwen25.cli import build_parser
    from qwen25.serve.cli import api_key_from

    parse = build_parser().parse_args
    (tmp_path / "key").write_text("from-file\n")
    monkeypatch.setenv("QWEN25_API_KEY", "from-env")
    assert api_key_from(parse(["serve", "--model", "d", "--api-key-file", str(tmp_path / "key")])) == "from-file"
    assert api_key_from(parse(["serve", "--model", "d"])) == "from-env"
    monkeypatch.delenv("QWEN25_API_KEY")
    assert api_key_from(parse(["serve", "--model", "d"])) is None
    assert api_key_from(parse(["serve", "--model", "d", "--api-key", "k"])) == "k"  # still works, with a warning
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(SystemExit, match="is empty"):
        api_key_from(parse(["serve", "--model", "d", "--api-key-file", str(tmp_path / "empty")]))


@pytest.mark.skipif(not cpu_kernels.available(), reason="--w8a8 needs the compiled kernels (AVX-512)")
def test_w8a8_server_replies_as_its_model_generates(model_dir):
    """`serve --dtype bf16 --w8a8`: the model is quantized (int8 weights and decode activations) and the server's
    greedy reply is what that model generates."""
    app, engine = build_server(model_dir, max_batch=2, max_len=128, model_name="tiny", dtype="bf16", w8a8=True)
    model = engine.engine.model
    assert all(m.act_int8 for m in model.modules() if isinstance(m, Int8Linear))
    tok = Tokenizer.from_dir(model_dir)
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    text, _ = greedy_reply(model, tok, prompt, 10)
    with TestClient(app) as client:
        body = chat(client, max_tokens=10, temperature=0).json()
    assert body["choices"][0]["message"]["content"] == text


def test_engine_driven_from_the_calling_thread(model_dir):
    """engine_thread=False (what `qwen25 serve` does): no engine thread starts with the app; the caller's run()
    serves requests until stop(), and requests then still open end with an error."""
    app, engine = build_server(model_dir, max_batch=2, max_len=128, model_name="tiny", engine_thread=False)
    tok = Tokenizer.from_dir(model_dir)
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    text, _ = greedy_reply(load_model(model_dir, dtype="fp32"), tok, prompt, 8)
    replies = []

    def client():
        try:
            with TestClient(app) as client:
                assert engine._thread in (None, threading.main_thread())  # the app started no thread of its own
                replies.append(chat(client, max_tokens=8, temperature=0).json())
        finally:
            engine.stop()

    thread = threading.Thread(target=client)
    thread.start()
    engine.run()  # returns once the client thread has stopped it
    thread.join()
    assert replies[0]["choices"][0]["message"]["content"] == text
    with pytest.raises(RuntimeError, match="own thread"):
        build_server(model_dir, max_batch=1, max_len=64)[1].run()


def test_serve_command_runs_and_stops_on_sigterm(model_dir):
    """`qwen25 serve` end to end: the engine on the main thread, uvicorn on another; SIGTERM shuts both down."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "qwen25.cli", "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-len", "128", "--served-model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "tiny", "messages": MESSAGES, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# ---- hardening (issue 28): no client can break the server or another client ---------------------------------------
HOSTILE = [
    # (why, raw body, status, words of the message)
    ("content part text not a string", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     400, "messages.0.content"),
    ("an image part (this model reads text)", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content"),
    ("tool call function not an object", {"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": "get_weather"}]},
        {"role": "user", "content": "hi"}]}, 400, "tool_calls"),
    ("seed above 2^64", {"seed": 2**70}, 400, "seed"),
    ("negative seed below int64", {"seed": -2**64}, 400, "seed"),
]


@pytest.mark.parametrize("why,body,status,words", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_malformed_requests_get_a_json_4xx(served, why, body, status, words):
    client = served[0]
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and words in r.json()["error"]["message"], r.json()
    assert chat(client, max_tokens=2).status_code == 200  # and the next request is served


@pytest.mark.parametrize("raw,words", [
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800 lone"}]}', "surrogate"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}',
     "repetition_penalty"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100 + b"]" * 100 + b"}",
     "nests deeper"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 100000 + b"]" * 100000
     + b"}", "nests"),
])
def test_invalid_json_values_get_a_json_400(served, raw, words):
    client = served[0]
    for _ in range(2):  # twice on one connection: the first must not break the next
        r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert chat(client, max_tokens=2).status_code == 200


def test_extreme_sampling_values_are_honoured(served):
    """A temperature so small that logits / T overflows samples the argmax (the limit T -> 0), never NaN; an
    extreme repetition penalty runs too."""
    client, _, _, tok = served
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    text, _ = greedy_text(served, prompt, 8)
    for temperature in (1e-30, 1e-45):
        r = chat(client, max_tokens=8, temperature=temperature, seed=3)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
    assert chat(client, max_tokens=8, temperature=0.7, repetition_penalty=1e30, seed=1).status_code == 200


def test_a_failing_request_fails_alone(model_dir, monkeypatch):
    """Sampling that raises for one request ends that request with its reason; the others in the same batch
    finish with their greedy outputs."""
    import qwen25.generation.engine as engine_module
    from qwen25.generation import Engine, Request

    real = engine_module.next_token

    def broken_for_seed_666(logits, params, *args, **kwargs):
        if params.seed == 666:
            raise RuntimeError("probability tensor contains nan")
        return real(logits, params, *args, **kwargs)

    monkeypatch.setattr(engine_module, "next_token", broken_for_seed_666)
    model, tok = load_model(model_dir, dtype="fp32"), Tokenizer.from_dir(model_dir)
    engine = Engine(model, max_batch=4, max_len=128)
    prompt = encode_chat(tok, MESSAGES, add_generation_prompt=True).ids
    good = SamplingParams(max_new_tokens=6)
    ids = [engine.submit(Request(list(prompt), good)), engine.submit(Request(list(prompt), SamplingParams(temperature=0.5, seed=666, max_new_tokens=6))), engine.submit(Request(list(prompt), good))]
    tokens, errors = {i: [] for i in ids}, {}
    while engine.has_work():
        for out in engine.step():
            if out.token is not None:
                tokens[out.request_id].append(out.token)
            if out.finish_reason == "error":
                errors[out.request_id] = out.error
    assert errors == {ids[1]: "RuntimeError: probability tensor contains nan"}
    expected = greedy_reply(model, tok, prompt, 6)[1]
    assert tokens[ids[0]] == tokens[ids[2]] == expected and tokens[ids[1]] == []


def test_admission_holds_under_a_burst(tokenizer):
    """40 simultaneous streams with --max-concurrent 4: exactly 4 admitted, the rest 429 (it was 35 of 40)."""
    app, engine = scripted_app(tokenizer, "one two three", delay=0.01, eos=False, max_concurrent=4)
    server, url = run_in_thread(app)
    statuses, opened, done = [], threading.Barrier(41), threading.Event()

    def client_thread():
        with httpx.Client(base_url=url, timeout=30) as client:
            body = {"model": "tiny", "messages": MESSAGES, "stream": True, "max_tokens": 3000}
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                statuses.append(r.status_code)
                lines = r.iter_lines()  # kept: a dropped iterator closes the response (a disconnect)
                if r.status_code == 200:
                    next(lines)
                opened.wait()
                done.wait(30)

    try:
        threads = [threading.Thread(target=client_thread) for _ in range(40)]
        for t in threads:
            t.start()
        opened.wait()
        assert sorted(statuses).count(200) == 4 and statuses.count(429) == 36, statuses
        done.set()
        for t in threads:
            t.join(30)
        with httpx.Client(base_url=url, timeout=30) as client:
            deadline = time.monotonic() + 10  # every slot comes back once the streams are closed
            while engine.engine.has_work() and time.monotonic() < deadline:
                time.sleep(0.05)
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b", "c"], "n": 2,
                                                     "max_tokens": 2})
            assert r.status_code == 400 and "6 sequences" in r.json()["error"]["message"]
            r = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
            assert r.status_code == 200 and len(r.json()["choices"]) == 4
    finally:
        done.set()
        server.should_exit = True
        server.thread.join(10)


def test_oversized_bodies_are_refused_before_they_are_read(tokenizer):
    app, _ = scripted_app(tokenizer, "ok", max_body_bytes=10_000)
    server, url = run_in_thread(app)
    try:
        with httpx.Client(base_url=url, timeout=30) as client:
            big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x" * 20_000}]})
            r = client.post("/v1/chat/completions", content=big, headers={"content-type": "application/json"})
            assert r.status_code == 413 and "limit of 10000 bytes" in r.json()["error"]["message"]

            def chunks():  # no Content-Length: counted while read, refused at the limit
                for _ in range(100):
                    yield b"x" * 1000
            r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
            assert r.status_code == 413
            assert client.get("/health").status_code == 200
    finally:
        server.should_exit = True
        server.thread.join(10)


def test_shutdown_ends_open_streams_with_a_server_error(tokenizer):
    app, engine = scripted_app(tokenizer, "one two three", delay=0.01, eos=False)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES,
                                                                 "stream": True, "max_tokens": 3000}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            threading.Thread(target=engine.stop).start()  # what SIGTERM does
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    error = events[-1]["error"]
    assert error["type"] == "server_error" and "shutting down" in error["message"], error
