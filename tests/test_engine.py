"""The continuous-batching engine: equal to one-at-a-time generation, joins/leaves, prefix reuse, cancel."""

from __future__ import annotations

import pytest
import torch

from qwen25.generation import Engine, Request, SamplingParams, generate
from qwen25.model import load_model


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from conftest import random_hf_model

    path = tmp_path_factory.mktemp("engine")
    random_hf_model(seed=21, hidden_size=96, num_attention_heads=12, num_key_value_heads=2).save_pretrained(path)
    return load_model(path, dtype="fp32")


def _prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 320, (int(torch.randint(3, 40, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_batched_greedy_equals_single_requests(model):
    prompts = _prompts(7)
    params = [SamplingParams(max_new_tokens=int(n)) for n in (5, 17, 9, 30, 2, 12, 20)]
    engine = Engine(model, max_batch=3, max_len=128)  # fewer slots than requests: they queue and join
    got = engine.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, got):
        assert out == generate(model, [prompt], p)[0]
    assert engine.stats["decode_steps"] < sum(p.max_new_tokens for p in params)  # steps were shared


def test_prompts_arriving_together_prefill_in_one_forward(model):
    """Several prompts admitted in one step (different lengths, one continuing a cached prefix) are prefilled in a
    single right-padded forward, and every output equals one-at-a-time generation."""
    shared = _prompts(1, seed=9)[0] + _prompts(1, seed=10)[0]  # long enough for whole prefix-cache blocks
    prompts = [shared + [5, 6, 7]] + _prompts(4, seed=11)
    params = SamplingParams(max_new_tokens=6)
    engine = Engine(model, max_batch=5, max_len=160)
    engine.generate([shared + [9]], params)  # fills the prefix cache
    forwards = engine.stats["prefill_forwards"]
    got = engine.generate(prompts, params)
    assert engine.stats["prefill_forwards"] == forwards + 1 and engine.stats["reused_tokens"] > 0
    for prompt, out in zip(prompts, got):
        assert out == generate(model, [prompt], params)[0]


def test_requests_join_between_steps(model):
    prompts = _prompts(3, seed=1)
    params = SamplingParams(max_new_tokens=10)
    engine = Engine(model, max_batch=4, max_len=128)
    outs = {}
    first = engine.submit(Request(prompts[0], params))
    for step in range(30):
        if step == 3:
            engine.submit(Request(prompts[1], params, id="late"))
        if step == 6:
            engine.submit(Request(prompts[2], params, id="later"))
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out.token)
    for rid, prompt in zip([first, "late", "later"], prompts):
        assert outs[rid] == generate(model, [prompt], params)[0]
    assert not engine.has_work()


def test_prefix_reuse_gives_same_output_with_less_prefill(model):
    system = _prompts(1, seed=2)[0] * 3  # a shared "system prompt" of several blocks
    a, b = system + [5, 6, 7], system + [9, 10]
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(model, max_batch=2, max_len=256, prefix_block=8)
    out_a = engine.generate([a], params)[0]
    before = engine.stats["prefill_tokens"]
    out_b = engine.generate([b], params)[0]
    assert engine.stats["reused_tokens"] >= 8 * (len(system) // 8)
    assert engine.stats["prefill_tokens"] - before <= len(b) - 8 * (len(system) // 8)
    assert out_a == generate(model, [a], params)[0]
    assert out_b == generate(model, [b], params)[0]


def test_chunked_prefill_equals_whole_prompts_and_keeps_streams_flowing(model):
    """Long prompts prefilled 7 tokens per step (with prefix reuse on, chunks crossing its blocks) give the same
    greedy tokens; a running request gets a token every step while a long prompt is being read."""
    prompts = _prompts(5, seed=4) + [_prompts(1, seed=5)[0] * 3]
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(model, max_batch=3, max_len=256, prefill_chunk=7, prefix_block=8)
    got = engine.generate(prompts, params)
    for prompt, out in zip(prompts, got):
        assert out == generate(model, [prompt], params)[0]
    assert engine.stats["prefill_tokens"] + engine.stats["reused_tokens"] == sum(map(len, prompts))

    engine = Engine(model, max_batch=2, max_len=256, prefill_chunk=7, prefix_capacity_blocks=0)
    running = engine.submit(Request(prompts[0][:5], SamplingParams(max_new_tokens=40)))
    engine.step()
    long_prompt = prompts[-1]
    late = engine.submit(Request(long_prompt, params))
    steps_to_first_token = None
    for step in range(1, 40):
        outputs = {out.request_id: out for out in engine.step()}
        assert running in outputs  # never stalled by the long prefill
        if late in outputs and steps_to_first_token is None:
            steps_to_first_token = step
    assert steps_to_first_token == -(-len(long_prompt) // 7)  # one chunk per step
    with pytest.raises(ValueError, match="prefill_chunk"):
        Engine(model, prefill_chunk=0)


def test_cancel_and_stop_sequences(model):
    prompt = _prompts(1, seed=3)[0]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=12))[0]
    engine = Engine(model, max_batch=2, max_len=128)
    rid = engine.submit(Request(prompt, SamplingParams(max_new_tokens=12)))
    keep = engine.submit(Request(prompt, SamplingParams(max_new_tokens=12), stop_sequences=[free[3:5]]))
    outs = {rid: [], keep: []}
    reasons = {}
    for i in range(20):
        if i == 2:
            engine.cancel(rid)
        for out in engine.step():
            if out.token is not None:
                outs[out.request_id].append(out.token)
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        if not engine.has_work():
            break
    assert reasons == {rid: "cancelled", keep: "stop"}
    assert outs[rid] == free[:2] and outs[keep] == free[:5]


def test_sampling_settings_are_per_request(model):
    prompt = _prompts(1, seed=4)[0]
    sampled = SamplingParams(temperature=1.0, top_k=20, max_new_tokens=10, seed=7)
    greedy = SamplingParams(max_new_tokens=10)
    penalised = SamplingParams(max_new_tokens=10, repetition_penalty=1.3)
    other = _prompts(1, seed=5)[0]
    engine = Engine(model, max_batch=4, max_len=128)  # greedy rows are picked together, per repetition penalty
    a, b, c, d = engine.generate([prompt, prompt, prompt, other], [sampled, greedy, penalised, penalised])
    assert b == generate(model, [prompt], greedy)[0]
    assert c == generate(model, [prompt], penalised)[0] and d == generate(model, [other], penalised)[0]
    assert c != b  # the penalty changed the greedy choice somewhere
    assert a == Engine(model, max_batch=1, max_len=128).generate([prompt], sampled)[0]  # same seed, same tokens


def test_bad_requests(model):
    engine = Engine(model, max_batch=1, max_len=16)
    with pytest.raises(ValueError, match="does not fit"):
        engine.submit(Request(list(range(20)), SamplingParams()))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.submit(Request([1, 10_000], SamplingParams()))
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.submit(Request([1], SamplingParams(max_new_tokens=0)))
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=100))[0]
    assert len(out) == 16 - 3  # stopped by the cache length, not by max_new_tokens


# ---- prompt-lookup speculation -------------------------------------------------------------------------------------
def test_prompt_lookup_speculation_equals_greedy_in_a_mixed_batch(model):
    """Drafts from the prompt and the output so far, verified in one forward: token for token plain greedy, for
    many prompts (some quoting themselves, so drafts are accepted), sharing a batch with requests that cannot
    speculate (sampled, penalised) and with stop sequences and length limits cutting drafts short."""
    prompts = []
    for i, prompt in enumerate(_prompts(24, seed=4)):
        prompts.append(prompt + prompt[:max(3, len(prompt) // 2)] if i % 2 else prompt)  # half quote themselves
    params = []
    for i, prompt in enumerate(prompts):
        if i % 6 == 5:
            params.append(SamplingParams(temperature=0.9, seed=i, max_new_tokens=12))  # drafts, sampled
        elif i % 6 == 4:
            params.append(SamplingParams(repetition_penalty=1.3, max_new_tokens=15))  # never drafts
        else:
            params.append(SamplingParams(max_new_tokens=int(5 + 7 * (i % 4)), eos_token_ids=[7]))
    plain = Engine(model, max_batch=5, max_len=160)
    fast = Engine(model, max_batch=5, max_len=160, prompt_lookup=4)
    expected, got = plain.generate(prompts, params), fast.generate(prompts, params)
    sampled = [i for i, p in enumerate(params) if not p.greedy]  # speculate too, drawing their own randomness
    assert [g for i, g in enumerate(got) if i not in sampled] == [e for i, e in enumerate(expected) if i not in sampled]
    assert all(len(got[i]) == params[i].max_new_tokens for i in sampled)
    assert fast.stats["accepted_draft_tokens"] > 0 and fast.stats["draft_tokens"] > fast.stats["accepted_draft_tokens"]
    assert fast.stats["decode_steps"] + fast.stats["speculative_steps"] > 0
    # with a stop sequence and near the end of the cache
    stop = [[int(expected[1][3]), int(expected[1][4])]] if len(expected[1]) > 4 else []
    for engine in (plain, fast):
        ids = [engine.submit(Request(prompts[1], SamplingParams(max_new_tokens=40), stop_sequences=stop))]
        out = {i: [] for i in ids}
        while engine.has_work():
            for o in engine.step():
                out[o.request_id].append(o.token)
        engine.result = out[ids[0]]
    assert fast.result == plain.result


def test_ngram_lookup_drafts_what_followed_the_last_occurrence():
    from qwen25.generation.engine import NgramLookup

    lookup = NgramLookup([1, 2, 3, 4, 5, 9, 2, 3])
    assert lookup.draft(3) == [4, 5, 9]  # "2 3" occurred before, followed by 4 5 9
    lookup.extend([7])
    assert lookup.draft(3) == []  # "3 7" and "7" never occurred before
    lookup.result(drafted=3, accepted=0)
    lookup.extend([1, 2, 3])
    assert lookup.draft(2) == []  # backing off after a miss: one step without a draft
    assert lookup.draft(2) == [4, 5]  # the longest n-gram first: "1 2 3" occurred at the start (the most recent
    # earlier "2 3" is followed by 7 1)
    loop = NgramLookup([5, 6, 8, 6, 8, 6, 8])
    assert loop.draft(5) == [6, 8, 6, 8, 6]  # "6 8" two tokens back: the loop goes on


def test_sampling_with_speculation_keeps_the_distribution(tmp_path):
    """Sampled requests verify lookup drafts too: over 4,000 requests of 3 tokens the joint frequencies of the
    tokens match the model's exact distribution (chi-square), with drafts both accepted and rejected."""
    scipy_stats = pytest.importorskip("scipy.stats")
    from conftest import random_hf_model

    random_hf_model(seed=3, vocab_size=12, hidden_size=32, num_attention_heads=4,
                    num_key_value_heads=2).save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype="fp32")
    # the first token t follows "1": "1 t" occurred before for t in 2..10, so the second token has a draft ("1")
    prompt = [1, 2, 1, 3, 1, 4, 1, 5, 1, 6, 1, 7, 1, 8, 1, 9, 1, 10, 1]
    engine = Engine(model, max_batch=64, max_len=24, prompt_lookup=2)
    torch.manual_seed(0)
    triples = engine.generate([prompt] * 4000, SamplingParams(temperature=1.0, max_new_tokens=3))
    assert 0 < engine.stats["accepted_draft_tokens"] < engine.stats["draft_tokens"]
    with torch.no_grad():  # the exact joint distribution of the three tokens
        p1 = model(torch.tensor([prompt]))[0, -1].softmax(-1)
        p2 = model(torch.tensor([prompt + [a] for a in range(12)]))[:, -1].softmax(-1)
        p3 = model(torch.tensor([prompt + [a, b] for a in range(12) for b in range(12)]))[:, -1].softmax(-1)
    joint = p1[:, None, None] * p2[:, :, None] * p3.view(12, 12, 12)
    observed = torch.zeros(12, 12, 12)
    for a, b, c in triples:
        observed[a, b, c] += 1
    # (first, second) and (second, third): each cell's expected count is large enough for the chi-square test
    for exact, seen in ((joint.sum(2), observed.sum(2)), (joint.sum(0), observed.sum(0))):
        expected, seen = (exact * len(triples)).flatten().double(), seen.flatten().double()
        common = expected >= 5  # pool the rare cells
        obs = torch.cat([seen[common], seen[~common].sum()[None]])
        exp = torch.cat([expected[common], expected[~common].sum()[None]])
        assert scipy_stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_int8_kv_cache_in_the_engine_with_prefix_reuse(model):
    """An int8 KV cache through the engine: blocks reused from the prefix cache (values and scales) give exactly
    what prefilling them again gives, and greedy tokens mostly agree with the full-precision cache."""
    shared = _prompts(1, seed=11)[0] * 3
    prompts = [shared + p for p in _prompts(4, seed=12)]
    params = SamplingParams(max_new_tokens=10)
    reused = Engine(model, max_batch=2, max_len=256, kv_int8=True, prefix_block=8)
    fresh = Engine(model, max_batch=2, max_len=256, kv_int8=True, prefix_capacity_blocks=0)
    got = reused.generate(prompts, params)
    assert reused.stats["reused_tokens"] > 0 and got == fresh.generate(prompts, params)
    full = Engine(model, max_batch=2, max_len=256).generate(prompts, params)
    agree = sum(a == b for x, y in zip(got, full) for a, b in zip(x, y)) / sum(map(len, full))
    assert agree >= 0.8, agree


def test_small_prefill_chunks_carry_the_decode_rows_in_one_forward(model):
    """With a prefill chunk of 4 tokens, each step beside a running request is one forward (the decode row rides in
    the prefill's, padded to its width), and every token equals one-at-a-time generation."""
    calls = []
    original = model.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    prompts = [_prompts(1, seed=21)[0][:5], _prompts(1, seed=22)[0] * 2]
    params = [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=6)]
    engine = Engine(model, max_batch=2, max_len=256, prefill_chunk=4, prefix_capacity_blocks=0)
    first = engine.submit(Request(prompts[0], params[0]))
    engine.step()
    second = engine.submit(Request(prompts[1], params[1]))
    out = {first: [], second: []}
    model.forward = counted
    try:
        steps = 0
        while engine.has_work():
            before = len(calls)
            for o in engine.step():
                out[o.request_id].append(o.token)
            steps += 1
            if engine.running and len(engine.running) == 2:
                assert len(calls) - before == 1
    finally:
        del model.forward
    assert out[first] == generate(model, [prompts[0]], params[0])[0]  # (5 prompt tokens: no token in the first step)
    assert out[second] == generate(model, [prompts[1]], params[1])[0]


def test_decode_share_keeps_a_streams_tokens_beside_a_long_prompt(model, monkeypatch):
    """On a fake clock (a forward costs 0.1 s + 0.02 s a token): with decode_share 0.5 a running request keeps at
    least about half its solo token rate while a long prompt is read beside it, no gap between its tokens is much
    longer than prefill_stall, and every token equals one-at-a-time generation; with decode_share 0 (prefill
    whenever a prompt waits) it keeps far less. A short prompt arriving with the long one is read first."""
    import types

    import qwen25.generation.engine as engine_module

    clock = [0.0]
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    original = model.forward

    def timed(ids, *args, **kwargs):
        clock[0] += 0.1 + 0.02 * ids.numel()
        return original(ids, *args, **kwargs)

    long_prompt = torch.randint(0, 320, (300,), generator=torch.Generator().manual_seed(31)).tolist()
    short_prompt = _prompts(1, seed=32)[0][:5]
    params = {"long": SamplingParams(max_new_tokens=3), "short": SamplingParams(max_new_tokens=200)}
    solo_step = 0.1 + 0.02  # a decode step of the short request alone (the long prompt's row is left out of it)
    shares = {}
    model.forward = timed
    try:
        for share in (0.0, 0.5):
            engine = Engine(model, max_batch=2, max_len=512, prefill_chunk=64, prefix_capacity_blocks=0,
                            decode_share=share, prefill_stall=0.5)
            if share:  # both at once, the long one first (slot 0, mid-prefill beside the stream)
                long = engine.submit(Request(long_prompt, params["long"]))
                short = engine.submit(Request(short_prompt, params["short"]))
            else:  # oldest prompt first: the short one must already run when the long one comes
                short = engine.submit(Request(short_prompt, params["short"]))
                engine.step()
                long = engine.submit(Request(long_prompt, params["long"]))
            out, times, read = {long: [], short: [None] * (not share)}, [], False
            while engine.has_work():
                for o in engine.step():
                    out[o.request_id].append(o.token)
                    if o.request_id == short and not read:
                        times.append(clock[0])
                    read = read or o.request_id == long  # the long prompt's first token: it has been read
                assert out[short]  # with decode_share the short prompt goes first: a token in the first step
            out[short] = out[short][not share:]
            assert len(out[short]) == 200 - (not share) and len(times) >= 4
            assert out[long] == generate(model, [long_prompt], params["long"])[0]
            assert out[short] == generate(model, [short_prompt], params["short"])[0][not share:]
            shares[share] = (len(times) - 1) * solo_step / (times[-1] - times[0])
            if share:
                gaps = [b - a for a, b in zip(times, times[1:])]
                assert max(gaps) <= 0.5 + 2 * solo_step, max(gaps)
    finally:
        del model.forward
    assert shares[0.5] >= 0.5, shares
    assert shares[0.0] < 0.2, shares
    # prompts no longer than a chunk (a burst of chat requests) are read at once beside running requests: the
    # batch they join then decodes them too
    engine = Engine(model, max_batch=4, max_len=512, prefill_chunk=64, prefix_capacity_blocks=0, decode_share=0.5)
    engine.submit(Request(short_prompt, params["short"]))
    engine.step()
    prompts = [p[:20] for p in _prompts(3, seed=33)]
    burst = [engine.submit(Request(p, SamplingParams(max_new_tokens=2))) for p in prompts]
    assert set(burst) <= {o.request_id for o in engine.step()}
    with pytest.raises(ValueError, match="decode_share"):
        Engine(model, decode_share=1.0)
    with pytest.raises(ValueError, match="prefill_stall"):
        Engine(model, prefill_stall=0)
