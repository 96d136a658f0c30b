"""Sampling and generation against transformers' logits processors and generate()."""

from __future__ import annotations

import json

import pytest
import torch

from qwen25.generation import (QWEN_INSTRUCT_DEFAULTS, SamplingParams, generate, process_logits, stream_generate,
                               tokenizer_vocab_size)
from qwen25.model import load_model


@pytest.fixture
def models(hf_checkpoint):
    hf, path = hf_checkpoint(seed=11, hidden_size=96, num_attention_heads=12, num_key_value_heads=2)
    return hf, load_model(path, dtype="fp32"), path


def test_processors_equal_transformers():
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    for temperature, top_k, top_p, penalty in [(0.7, 20, 0.8, 1.05), (1.3, 0, 0.5, 1.0), (0.5, 3, 1.0, 1.5),
                                               (1.0, 50, 0.95, 0.9)]:
        logits = torch.randn(4, 500) * 3
        history = torch.randint(0, 500, (4, 30))
        seen = torch.zeros(4, 500, dtype=torch.bool).scatter_(1, history, True)
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=penalty)
        ref = logits.clone()
        for proc in [RepetitionPenaltyLogitsProcessor(penalty), TemperatureLogitsWarper(temperature),
                     TopKLogitsWarper(top_k) if top_k else None, TopPLogitsWarper(top_p)]:
            if proc is not None:
                ref = proc(history, ref)
        ours = process_logits(logits, params, seen)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours[~torch.isinf(ours)], ref[~torch.isinf(ref)])


def test_greedy_generation_equals_transformers(models):
    hf, ours, _ = models
    prompts = [torch.randint(0, 320, (n,)).tolist() for n in (9, 4, 15)]
    for penalty in (1.0, 1.05):
        params = SamplingParams(max_new_tokens=24, repetition_penalty=penalty)
        outs = generate(ours, prompts, params)  # one left-padded batch
        for prompt, out in zip(prompts, outs):
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, repetition_penalty=penalty,
                              pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
            assert out == ref


def test_stops_on_every_eos_id(models):
    hf, ours, _ = models
    prompt = list(range(3, 13))
    free = generate(ours, [prompt], SamplingParams(max_new_tokens=20))[0]
    stop_a, stop_b = free[6], free[3]
    out = generate(ours, [prompt], SamplingParams(max_new_tokens=20, eos_token_ids=[stop_a, stop_b]))[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0,
                      eos_token_id=[stop_a, stop_b])[0, len(prompt):].tolist()
    assert out == ref == free[:free.index(stop_b) + 1]


def test_padding_vocabulary_is_never_sampled(models):
    _, ours, _ = models
    params = SamplingParams(temperature=5.0, max_new_tokens=40, seed=1)
    outs = generate(ours, [[1, 2, 3]] * 4, params, vocab_limit=50)
    assert all(t < 50 for row in outs for t in row)
    assert max(t for row in generate(ours, [[1, 2, 3]] * 4, params) for t in row) >= 50


def test_seeded_sampling_is_reproducible(models):
    _, ours, _ = models
    params = SamplingParams(**QWEN_INSTRUCT_DEFAULTS, max_new_tokens=16, seed=123)
    a = generate(ours, [[5, 6, 7]], params)
    assert a == generate(ours, [[5, 6, 7]], params)
    other = SamplingParams(temperature=1.5, max_new_tokens=16, seed=124)
    assert generate(ours, [[5, 6, 7]], other) != generate(ours, [[5, 6, 7]], SamplingParams(temperature=1.5, max_new_tokens=16, seed=123))


def test_stream_yields_each_step_and_none_after_finish(models):
    _, ours, _ = models
    full = generate(ours, [[1, 2, 3, 4]], SamplingParams(max_new_tokens=10))[0]
    stream = stream_generate(ours, [[1, 2, 3, 4], [9, 8]], SamplingParams(max_new_tokens=10, eos_token_ids=[full[2]]))
    first = next(stream)  # produced before the rest is computed
    assert first[0] == full[0]
    steps = [first] + list(stream)
    assert [s[0] for s in steps[:3]] == full[:3] and all(s[0] is None for s in steps[3:])


def test_generation_config_defaults(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({
        "bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643], "pad_token_id": 151643,
        "repetition_penalty": 1.05, "temperature": 0.7, "top_k": 20, "top_p": 0.8}))
    p = SamplingParams.from_checkpoint(tmp_path, max_new_tokens=5, temperature=None)
    assert (p.do_sample, p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (True, 0.7, 20, 0.8, 1.05)
    assert p.eos_token_ids == [151645, 151643] and p.max_new_tokens == 5
    assert SamplingParams.from_checkpoint(tmp_path, do_sample=False).greedy


def test_bad_inputs():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_bad_prompts(models):
    _, ours, _ = models
    with pytest.raises(ValueError, match="at least one token"):
        generate(ours, [[]], SamplingParams())
    with pytest.raises(ValueError, match="token id 999 is outside"):
        generate(ours, [[1, 999]], SamplingParams())


def test_tokenizer_vocab_size(tmp_path):
    (tmp_path / "tokenizer.json").write_text(json.dumps({
        "model": {"vocab": {"a": 0, "b": 1, "ab": 2}}, "added_tokens": [{"id": 3, "content": "<|endoftext|>"}]}))
    assert tokenizer_vocab_size(tmp_path) == 4
    assert tokenizer_vocab_size(tmp_path / "none") is None


def test_process_logits_leaves_the_callers_logits_alone():
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.randn(2, 50).to(dtype)
        before = logits.clone()
        seen = torch.zeros(2, 50, dtype=torch.bool)
        seen[:, :5] = True
        out = process_logits(logits, SamplingParams(repetition_penalty=1.3), seen, vocab_limit=40)
        assert torch.equal(logits, before) and torch.isinf(out[:, 40:]).all()
        assert torch.allclose(out[:, 5:40], before[:, 5:40].float())


def test_repetition_penalty_on_seen_tokens_equals_the_whole_vocabulary_formula():
    """The CPU path (gather/scatter over the seen tokens) equals the whole-vocabulary form accelerators use."""
    from qwen25.generation import apply_repetition_penalty

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1000, generator=gen)
    seen = torch.rand(3, 1000, generator=gen) < 0.05
    dense = torch.where(seen, torch.where(logits < 0, logits * 1.2, logits / 1.2), logits)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.2), dense)


def test_text_tracker_without_decode_stream_releases_the_same_text():
    """A tokenizer with only `decode` (the windowed re-decoder) gives the stop-string tracker the same text and the
    same stop as our decode_stream, multi-byte characters split across tokens included (text next to an incomplete
    character may come one token later)."""
    from tokenizer_fixtures import qwen_tokenizer

    from qwen25.generation import TextTracker

    tok = qwen_tokenizer()

    class DecodeOnly:
        def decode(self, ids, skip_special_tokens=True):
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    text = "Grüße aus Köln 🌧️ — 東京は雨です. <|im_end|> done 😀😀 end"
    ids = tok.encode(text)
    for stops in ([], ["雨で"], ["😀 end"]):
        ours, plain = TextTracker(tok, stops), TextTracker(DecodeOnly(), stops)
        runs = []
        for tracker in (ours, plain):
            stopped, pieces = [], []
            for n in range(1, len(ids) + 1):
                stopped.append(tracker(ids[:n]))
                pieces.append(tracker.release())
            runs.append((stopped.index(True) if True in stopped else None, "".join(pieces) + tracker.release(True)))
        assert runs[0] == runs[1]
