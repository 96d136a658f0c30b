"""What third-party clients need from the server (issue 31): log-probabilities (generated and prompt tokens, chat and
completions, streaming and not) equal to the model's fp32 log-softmax; every OpenAI/vLLM sampling field honoured or
refused; grammar-constrained output (response_format, forced tool calls) on every request of a batch; the
tokenizer routes; OpenAI-shaped errors; lm-eval's local-completions equal to its hf backend."""

from __future__ import annotations

import json
import math
from typing import Literal

import jsonschema
import pytest
import torch
from fastapi.testclient import TestClient
from serve_fixtures import write_tiny_chat_checkpoint

from qwen25.generation import Engine, Request, SamplingParams, process_logits
from qwen25.generation.sampling import apply_min_p, apply_presence_frequency
from qwen25.model import load_model
from qwen25.serve.server import build_server, run_in_thread
from qwen25.tokenizer import Tokenizer, encode_chat

MESSAGES = [{"role": "user", "content": "Tell me about the weather."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                               "required": ["city", "days"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}}, "required": ["tz"]}}}]
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "age", "tags", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("compat"))


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir, dtype="fp32")


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer.from_dir(model_dir)


@pytest.fixture(scope="module")
def client(model_dir):
    # 1024 tokens: Qwen's tool instructions take ~600 of this tokenizer's 622-token vocabulary
    app, _ = build_server(model_dir, max_batch=4, max_len=1024, model_name="tiny", max_tokens_limit=200)
    with TestClient(app) as c:
        yield c


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) fp32 log-softmax of one forward over the whole sequence: row t predicts ids[t + 1]."""
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().log_softmax(-1)


# ---- the engine -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [None, 5])
def test_engine_logprobs_equal_one_forward(model, chunk):
    """Generated and prompt tokens' log-probabilities (and top-k) equal a single forward's log-softmax, whether the
    prompt is prefilled whole, in chunks, or together with another prompt in one forward."""
    engine = Engine(model, max_batch=2, max_len=64, prefill_chunk=chunk, vocab_limit=600)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 600, (n,), generator=gen).tolist() for n in (11, 7)]
    params = SamplingParams(temperature=1.0, seed=3, max_new_tokens=6, logprobs=3, prompt_logprobs=2)
    ids = [engine.submit(Request(p, params)) for p in prompts]
    outs = {i: [] for i in ids}
    prompt_lp = {}
    while engine.has_work():
        for out in engine.step():
            outs[out.request_id].append(out)
            if out.prompt_logprobs is not None:
                prompt_lp[out.request_id] = out.prompt_logprobs
    for rid, prompt in zip(ids, prompts):
        tokens = [o.token for o in outs[rid]]
        reference = full_logprobs(model, prompt + tokens)
        assert prompt_lp[rid][0] is None and len(prompt_lp[rid]) == len(prompt)
        for t in range(1, len(prompt)):
            logprob, top = prompt_lp[rid][t]
            assert logprob == pytest.approx(float(reference[t - 1, prompt[t]]), abs=1e-4)
            assert [i for i, _ in top] == reference[t - 1, :600].topk(2).indices.tolist()
        for k, out in enumerate(outs[rid]):
            logprob, top = out.logprob
            row = reference[len(prompt) - 1 + k]
            assert logprob == pytest.approx(float(row[out.token]), abs=1e-4)
            assert [v for _, v in top] == pytest.approx(row[:600].topk(3).values.tolist(), abs=1e-4)


def test_min_p_and_openai_penalties_are_the_documented_formulas():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 50, generator=gen) * 3
    probs = logits.softmax(-1)
    kept = torch.isfinite(apply_min_p(logits, 0.2))
    assert torch.equal(kept, probs >= 0.2 * probs.max())
    from transformers.generation.logits_process import MinPLogitsWarper
    assert torch.equal(kept, torch.isfinite(MinPLogitsWarper(0.2)(None, logits.clone())))
    generated = [3, 3, 7, 3, 9]
    out = apply_presence_frequency(logits, generated, presence=0.5, frequency=0.25)
    expected = logits.clone()
    for token, count in ((3, 3), (7, 1), (9, 1)):
        expected[0, token] -= 0.5 + 0.25 * count
    assert torch.allclose(out, expected)


def test_logit_bias_min_tokens_and_allowed_in_process_logits():
    logits = torch.zeros(1, 10)
    logits[0, 4] = 5.0
    params = SamplingParams(logit_bias={4: -100.0, 6: 2.0}, min_tokens=3, eos_token_ids=[6])
    out = process_logits(logits, params, generated=[1])
    assert out[0, 4] == -95.0 and out[0, 6] == float("-inf") and int(out.argmax()) != 4
    assert process_logits(logits, params, generated=[1, 2, 3])[0, 6] == 2.0  # min_tokens reached: eos allowed
    allowed = torch.zeros(10, dtype=torch.bool)
    allowed[[2, 8]] = True
    out = process_logits(logits, SamplingParams(), allowed=allowed)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [2, 8]


# ---- log-probabilities over HTTP ---------------------------------------------------------------------------------
def test_completion_echo_logprobs_as_lm_eval_asks(client, model, tokenizer):
    """lm-eval's log-likelihood request (echo, logprobs 1, max_tokens 1, temperature 0): the prompt tokens'
    log-probabilities and the generated one's, in the completions wire format."""
    prompt = tokenizer.encode("The weather in Paris is fine today")
    body = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1,
                                                "max_tokens": 1, "temperature": 0}).json()
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(prompt) + 1
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    generated = tokenizer.encode(lp["tokens"][-1])
    reference = full_logprobs(model, prompt)
    for t in range(1, len(prompt)):
        assert lp["token_logprobs"][t] == pytest.approx(float(reference[t - 1, prompt[t]]), abs=1e-4)
        best = int(reference[t - 1, :len(tokenizer)].argmax())
        assert max(lp["top_logprobs"][t].values()) == pytest.approx(float(reference[t - 1, best]), abs=1e-4)
    assert lp["token_logprobs"][-1] == pytest.approx(float(reference[-1].max()), abs=1e-4)
    assert body["choices"][0]["text"].startswith(tokenizer.decode(prompt)) and generated
    assert lp["text_offset"][:3] == [0, len(lp["tokens"][0]), len(lp["tokens"][0]) + len(lp["tokens"][1])]
    # max_tokens 0 with echo scores the prompt alone
    scored = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 0,
                                                  "max_tokens": 0}).json()
    assert scored["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"][:-1]
    assert scored["choices"][0]["text"] == tokenizer.decode(prompt) and scored["usage"]["completion_tokens"] == 0


def test_streamed_completion_with_echo_and_logprobs_adds_up(client, tokenizer):
    body = {"model": "tiny", "prompt": ["The weather in Paris", "Hello"], "echo": True, "logprobs": 2,
            "max_tokens": 5, "temperature": 0, "n": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    for choice in whole:
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        assert [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]] == choice["logprobs"]["tokens"]
        offsets = [t for c in mine if c["logprobs"] for t in c["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"] and mine[-1]["finish_reason"] == choice["finish_reason"]
    assert whole[0]["text"].startswith("The weather in Paris") and whole[2]["text"].startswith("Hello")


def test_chat_logprobs_streamed_and_not(client, model, tokenizer):
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert len(content) >= 1 and all(len(c["top_logprobs"]) == 3 for c in content)
    prompt = encode_chat(tokenizer, MESSAGES, add_generation_prompt=True).ids
    by_bytes = {tokenizer.decode_bytes([i]): i for i in range(len(tokenizer))}
    tokens = [by_bytes[bytes(c["bytes"])] for c in content]
    reference = full_logprobs(model, prompt + tokens)
    for k, (entry, token) in enumerate(zip(content, tokens)):
        assert entry["logprob"] == pytest.approx(float(reference[len(prompt) - 1 + k, token]), abs=1e-4)
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(float(reference[len(prompt) - 1 + k].max()),
                                                                    abs=1e-4)
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    streamed = [c for chunk in chunks for choice in chunk["choices"] if choice["logprobs"]
                for c in choice["logprobs"]["content"]]
    assert [c["token"] for c in streamed] == [c["token"] for c in content]  # (the prompt now comes from the prefix
    assert [c["logprob"] for c in streamed] == pytest.approx([c["logprob"] for c in content], abs=1e-4)  # cache)


# ---- sampling fields --------------------------------------------------------------------------------------------
def test_sampling_fields_are_honoured(client, tokenizer):
    def complete(**fields):
        return client.post("/v1/completions", json={"model": "tiny", "prompt": "The weather", "max_tokens": 6,
                                                    "temperature": 0, "logprobs": 0, **fields}).json()

    plain = complete()
    first = tokenizer.encode(plain["choices"][0]["logprobs"]["tokens"][0])[0]
    banned = complete(logit_bias={str(first): -100})
    assert tokenizer.encode(banned["choices"][0]["logprobs"]["tokens"][0])[0] != first
    # stop_token_ids: the greedy second token stops the sequence (and is not in the text)
    second = plain["choices"][0]["logprobs"]["tokens"][1]
    stopped = complete(stop_token_ids=[tokenizer.encode(second)[0]])
    assert stopped["choices"][0]["finish_reason"] == "stop" and stopped["usage"]["completion_tokens"] == 2
    # a frequency penalty changes a greedy continuation that repeats itself; a stop list longer than OpenAI's 4
    long = complete(max_tokens=40)
    penalised = complete(max_tokens=40, frequency_penalty=2.0, presence_penalty=2.0)
    assert long["choices"][0]["text"] != penalised["choices"][0]["text"]
    six = complete(max_tokens=40, stop=["zz1", "zz2", "zz3", "zz4", "zz5", "zz6"])
    assert six["choices"][0]["text"] == long["choices"][0]["text"]
    # min_tokens holds back eos; ignore_eos runs to max_tokens
    chat = {"model": "tiny", "messages": MESSAGES, "temperature": 0, "max_tokens": 30}
    eos_banned = client.post("/v1/chat/completions", json={**chat, "ignore_eos": True, "min_tokens": 30}).json()
    assert eos_banned["usage"]["completion_tokens"] == 30 and eos_banned["choices"][0]["finish_reason"] == "length"
    assert complete(min_p=1.0)["choices"][0]["text"] == plain["choices"][0]["text"]  # min_p 1: greedy


@pytest.mark.parametrize("field, value", [("best_of", 2), ("use_beam_search", True), ("guided_json", {}),
                                          ("prompt_logprobs", 1), ("modalities", ["audio"]), ("functions", [{}]),
                                          ("include_stop_str_in_output", True), ("reasoning_effort", "high")])
def test_documented_fields_we_do_not_implement_are_refused(client, field, value):
    r = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    harmless = {"best_of": 1, "use_beam_search": False, "modalities": ["text"], "include_stop_str_in_output": False}
    if field in harmless:
        ok = client.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2,
                                                       field: harmless[field]})
        assert ok.status_code == 200, ok.text


# ---- constrained decoding -----------------------------------------------------------------------------------------
def test_response_format_json_schema_on_every_request_of_a_batch(client):
    """Random weights, sampling at temperature 1: every choice is JSON valid under the schema."""
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 1.0, "seed": 1, "n": 4, "max_tokens": 120,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}}
    choices = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert len(choices) == 4
    for choice in choices:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    objects = client.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}}).json()
    assert all(isinstance(json.loads(c["message"]["content"]), dict) for c in objects["choices"]
               if c["finish_reason"] == "stop")
    bad = client.post("/v1/chat/completions", json={**body, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "response_format"


def test_forced_tool_calls(client):
    body = {"model": "tiny", "messages": MESSAGES, "tools": TOOLS, "temperature": 1.0, "seed": 2, "n": 3,
            "max_tokens": 120}
    named = client.post("/v1/chat/completions", json={
        **body, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}).json()
    for choice in named["choices"]:
        calls = choice["message"]["tool_calls"]
        assert choice["finish_reason"] == "tool_calls" and len(calls) == 1
        assert calls[0]["function"]["name"] == "get_weather"
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), TOOLS[0]["function"]["parameters"])
    required = client.post("/v1/chat/completions", json={**body, "tool_choice": "required"}).json()
    for choice in required["choices"]:
        calls = choice["message"]["tool_calls"]
        assert calls and all(c["function"]["name"] in ("get_weather", "get_time") for c in calls)
    missing = client.post("/v1/chat/completions", json={**body, "tool_choice": {
        "type": "function", "function": {"name": "nope"}}})
    assert missing.status_code == 400 and "nope" in missing.json()["error"]["message"]


def test_openai_sdk_parse_and_logit_bias(model_dir, tokenizer):
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")

    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=8)
        age: int = pydantic.Field(ge=0, le=99)

    app, _ = build_server(model_dir, max_batch=2, max_len=256, model_name="tiny")
    server, url = run_in_thread(app)
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
        done = parse(model="tiny", messages=MESSAGES, response_format=Person, max_tokens=80, temperature=1.0,
                     seed=4)
        person = done.choices[0].message.parsed
        assert isinstance(person, Person) and 0 <= person.age <= 99
        first = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=1, temperature=0,
                                               logprobs=True)
        token = first.choices[0].logprobs.content[0]
        banned = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=1, temperature=0, logprobs=True,
            logit_bias={str(tokenizer.encode(token.token)[0]): -100})
        assert banned.choices[0].logprobs.content[0].token != token.token
        with pytest.raises(openai.NotFoundError):
            client.get("/no/such/route", cast_to=object)
        assert client.models.retrieve("tiny").id == "tiny"
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.models.retrieve("gpt-4")
    finally:
        server.should_exit = True
        server.thread.join(timeout=30)


# ---- routes -------------------------------------------------------------------------------------------------------
def test_tokenizer_routes_and_openai_shaped_errors(client, tokenizer):
    ids = client.post("/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert ids["tokens"] == tokenizer.encode("Hello world") and ids["count"] == len(ids["tokens"])
    chat_ids = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    assert chat_ids == encode_chat(tokenizer, MESSAGES, add_generation_prompt=True).ids
    assert client.post("/detokenize", json={"tokens": ids["tokens"]}).json() == {"prompt": "Hello world"}
    assert client.post("/detokenize", json={"tokens": [10 ** 6]}).status_code == 400
    info = client.get("/tokenizer_info").json()
    assert info["eos_token"] == tokenizer.decode([tokenizer.eos_id]) and info["model_max_length"] == 1024
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # lm-eval renders chats with it (remote tokenizer)
    template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(info["chat_template"])
    assert template.render(messages=MESSAGES, add_generation_prompt=True) == tokenizer.decode(chat_ids)
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("DELETE", "/v1/models", 405)):
        r = client.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) >= {"message", "type", "param", "code"}, r.text


# ---- lm-eval's local-completions equals its hf backend -----------------------------------------------------------
def test_lm_eval_local_completions_equals_hf_backend(tmp_path, monkeypatch):
    """A multiple-choice task, a perplexity task and a generate_until task with 6 stop strings, through
    `local-completions` against the server (lm-eval's remote tokenizer: /tokenizer_info, /tokenize) and through
    lm-eval's own `hf` backend on the same exported checkpoint: the same log-likelihoods, perplexities and
    generations."""
    pytest.importorskip("lm_eval")
    from qwen25.export import export_model

    model_dir = tmp_path / "exported"  # what `qwen25 export` writes is what both backends load
    export_model(write_tiny_chat_checkpoint(tmp_path / "model", vocab_size=622), model_dir, dtype="fp32")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    rows = {"mc": [{"q": f"Is it {w} today?", "choices": [" yes", " no", " maybe"], "answer": i % 3}
                   for i, w in enumerate(["sunny", "rainy", "cold", "warm"])],
            "ppl": [{"text": t} for t in ("The weather in Paris is fine.", "Hello world, what is 2+2?")],
            "gen": [{"q": q, "a": "x"} for q in ("The weather", "Hello")]}
    for name, items in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    data = lambda name: (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / name}.jsonl\n"  # noqa: E731
                         "test_split: test\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "c_mc.yaml").write_text("task: c_mc\n" + data("mc") + "output_type: multiple_choice\n"
                                     "doc_to_text: \"{{q}}\"\ndoc_to_choice: \"{{choices}}\"\ndoc_to_target: answer\n"
                                     "metric_list:\n  - metric: acc\n")
    (tasks / "c_ppl.yaml").write_text("task: c_ppl\n" + data("ppl") + "output_type: loglikelihood_rolling\n"
                                      "doc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                                      "metric_list:\n  - metric: word_perplexity\n")
    (tasks / "c_gen.yaml").write_text("task: c_gen\n" + data("gen") + "output_type: generate_until\n"
                                      "doc_to_text: \"{{q}}\"\ndoc_to_target: \"{{a}}\"\ngeneration_kwargs:\n"
                                      "  until: [\"zq1\", \"zq2\", \"zq3\", \"zq4\", \"zq5\", \".\"]\n"
                                      "  max_gen_toks: 8\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    names = ["c_mc", "c_ppl", "c_gen"]
    hf = simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32,device=cpu", tasks=names,
                         task_manager=manager, log_samples=True, batch_size=1)
    app, _ = build_server(model_dir, max_batch=2, max_len=256, model_name="tiny")
    server, url = run_in_thread(app)
    try:
        ours = simple_evaluate(model="local-completions", model_args=f"model=tiny,base_url={url}/v1/completions,"
                               "tokenizer_backend=auto,tokenized_requests=True", tasks=names, task_manager=manager,
                               log_samples=True)
    finally:
        server.should_exit = True
        server.thread.join(timeout=30)
    for task in names:
        a = sorted(hf["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        assert len(a) == len(b) == len(rows[task[2:]])
        for x, y in zip(a, b):
            if task == "c_gen":
                assert x["resps"] == y["resps"], (x["resps"], y["resps"])
                continue
            for rx, ry in zip(x["resps"], y["resps"]):
                vx, vy = (rx[0][0], ry[0][0]) if task == "c_mc" else (rx[0], ry[0])
                assert vx == pytest.approx(vy, abs=1e-4), (task, rx, ry)
    assert math.isclose(hf["results"]["c_ppl"]["word_perplexity,none"],
                        ours["results"]["c_ppl"]["word_perplexity,none"], rel_tol=1e-4)


# ---- the Responses API ---------------------------------------------------------------------------------------------
def test_responses_api_with_the_openai_sdk(model_dir):
    """client.responses.create, plain and streamed (the events add up to the final response), a forced function
    call, and a second turn that sends the call and its output back as input items."""
    openai = pytest.importorskip("openai")
    app, _ = build_server(model_dir, max_batch=2, max_len=1024, model_name="tiny")
    server, url = run_in_thread(app)
    tools = [{"type": "function", "name": f["function"]["name"], "description": f["function"].get("description"),
              "parameters": f["function"]["parameters"], "strict": True} for f in TOOLS]
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
        plain = client.responses.create(model="tiny", input="Hello there", instructions="Be brief.",
                                        max_output_tokens=6, temperature=0)
        assert plain.status == "incomplete" and plain.usage.output_tokens == 6 and plain.output_text
        events = list(client.responses.create(model="tiny", input="Hello there", instructions="Be brief.",
                                              max_output_tokens=6, temperature=0, stream=True))
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        final = events[-1].response  # response.incomplete: max_output_tokens ran out
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert events[-1].type == "response.incomplete" and "".join(deltas) == final.output_text == plain.output_text
        called = client.responses.create(model="tiny", input="Weather in Paris?", tools=tools, max_output_tokens=80,
                                         tool_choice={"type": "function", "name": "get_weather"}, temperature=0)
        call = next(item for item in called.output if item.type == "function_call")
        assert call.name == "get_weather" and called.status == "completed"
        jsonschema.validate(json.loads(call.arguments), TOOLS[0]["function"]["parameters"])
        follow = client.responses.create(model="tiny", tools=tools, max_output_tokens=5, temperature=0, input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}])
        assert follow.usage.input_tokens > called.usage.input_tokens
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            client.responses.create(model="tiny", input="x", previous_response_id=called.id)
    finally:
        server.should_exit = True
        server.thread.join(timeout=30)


def test_openai_agents_tool_loop(model_dir):
    """openai-agents with its default (Responses) model and a structured final output: the first turn must call
    the tool (tool_choice required), the agent runs it and sends its output back, and a later turn answers with
    JSON of the output type (the grammar lets the model call a tool or answer in the schema)."""
    agents = pytest.importorskip("agents", reason="pip install openai-agents")
    openai = pytest.importorskip("openai")
    pydantic = pytest.importorskip("pydantic")

    class Answer(pydantic.BaseModel):
        sunny: bool
        summary: str = pydantic.Field(max_length=12)

    app, _ = build_server(model_dir, max_batch=2, max_len=2048, model_name="tiny")
    server, url = run_in_thread(app)
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:  # bounded: a random model fills a free string to the
        """Weather in a city."""  # token limit
        calls.append(city)
        return "sunny"

    # A random model prefers <tool_call> to an answer on every turn: once the tool has run, an opening brace (of
    # the JSON answer) is made more likely (the first turn's grammar allows only a call, whatever the bias).
    tokenizer = Tokenizer.from_dir(model_dir)
    bias = {str(tokenizer.encode(text)[0]): 20 for text in ("{", '{"')}
    try:
        agents.set_tracing_disabled(True)
        def make_agent():  # an async client belongs to one event loop
            client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="k", max_retries=0)
            settings = agents.ModelSettings(tool_choice="required", max_tokens=120, temperature=0,
                                            extra_body={"logit_bias": bias})
            return agents.Agent(name="weather", instructions="Answer briefly.", tools=[get_weather], output_type=Answer,
                                model=agents.OpenAIResponsesModel(model="tiny", openai_client=client),
                                model_settings=settings)
        result = agents.Runner.run_sync(make_agent(), "Weather in Paris?", max_turns=8)
        assert calls and isinstance(result.final_output, Answer)

        async def streamed_run():
            streamed = agents.Runner.run_streamed(make_agent(), "Weather in Rome?", max_turns=8)
            return streamed, [event.type async for event in streamed.stream_events()]
        import asyncio
        streamed, kinds = asyncio.run(streamed_run())
        assert "raw_response_event" in kinds and isinstance(streamed.final_output, Answer) and len(calls) >= 2
    finally:
        server.should_exit = True
        server.thread.join(timeout=30)


def test_prompt_lookup_serving_gives_the_same_text(model_dir, client):
    """`qwen25 serve --prompt-lookup 4`: greedy answers equal the plain server's; /metrics counts the drafts."""
    app, _ = build_server(model_dir, max_batch=4, max_len=1024, model_name="tiny", prompt_lookup=4)
    body = {"model": "tiny", "prompt": "the weather the weather the weather in Paris", "max_tokens": 40,
            "temperature": 0, "n": 1, "logprobs": 1}
    with TestClient(app) as fast:
        got = fast.post("/v1/completions", json=body).json()["choices"][0]
        metrics = fast.get("/metrics").text
    expected = client.post("/v1/completions", json=body).json()["choices"][0]
    assert got["text"] == expected["text"] and got["logprobs"]["tokens"] == expected["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(expected["logprobs"]["token_logprobs"], abs=1e-4)
    drafted = [line for line in metrics.splitlines() if line.startswith("qwen25_spec_decode_draft_tokens_total")]
    assert drafted and float(drafted[0].split()[-1]) > 0


def test_completion_suffix_is_fill_in_the_middle(client, tokenizer):
    """suffix: the prompt becomes Qwen's <|fim_prefix|>PROMPT<|fim_suffix|>SUFFIX<|fim_middle|> and the model writes
    the middle: the same answer as sending that layout as token ids."""
    body = {"model": "tiny", "prompt": "def add(a, b):\n    return", "suffix": "\n\nprint(add(1, 2))\n",
            "max_tokens": 8, "temperature": 0}
    fim = client.post("/v1/completions", json=body).json()
    ids = ([tokenizer.token_to_id("<|fim_prefix|>")] + tokenizer.encode(body["prompt"]) +
           [tokenizer.token_to_id("<|fim_suffix|>")] + tokenizer.encode(body["suffix"]) +
           [tokenizer.token_to_id("<|fim_middle|>")])
    plain = client.post("/v1/completions", json={**body, "prompt": ids, "suffix": None}).json()
    assert fim["usage"]["prompt_tokens"] == len(ids) and fim["choices"][0]["text"] == plain["choices"][0]["text"]
    refused = client.post("/v1/completions", json={**body, "echo": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "suffix"
