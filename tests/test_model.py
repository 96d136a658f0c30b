"""The decoder against transformers' Qwen2ForCausalLM: logits, both checkpoint directions, KV cache."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.model import CausalLM, KVCache, load_model, save_model

# Shapes with the official ratios: GQA groups 7 (0.5B) and 6 (1.5B), 7 as in 7B, odd head counts, tied/untied.
CONFIGS = {
    "gqa7-tied": dict(hidden_size=112, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa6-tied": dict(hidden_size=96, num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa7-untied": dict(hidden_size=224, num_attention_heads=28, num_key_value_heads=4, num_hidden_layers=3),
    "mha-odd": dict(hidden_size=56, num_attention_heads=7, num_key_value_heads=7, intermediate_size=72),
    "gqa5-odd": dict(hidden_size=80, num_attention_heads=5, num_key_value_heads=1, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers_fp32(hf_checkpoint, name):
    hf, path = hf_checkpoint(seed=hash(name) % 1000, **CONFIGS[name])
    ours = load_model(path, dtype="fp32")
    ids = torch.randint(0, hf.config.vocab_size, (3, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_logits_match_transformers_bf16(hf_checkpoint):
    hf, path = hf_checkpoint(seed=3, **CONFIGS["gqa7-tied"])
    ours = load_model(path, dtype="bf16")
    assert ours.lm_head.weight.dtype == torch.bfloat16
    hf = hf.to(torch.bfloat16)
    ids = torch.randint(0, hf.config.vocab_size, (2, 29))
    with torch.no_grad():
        ref, got = hf(ids).logits.float(), ours(ids).float()
    # bf16 rounding differs (we rotate in fp32, transformers in bf16); the logits agree to bf16 precision.
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("tied", [True, False])
def test_our_checkpoint_loads_in_transformers(tmp_path, tied):
    from transformers import Qwen2ForCausalLM

    cfg = ModelConfig(vocab_size=300, hidden_size=84, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=1, tie_word_embeddings=tied,
                      rope_theta=10000.0, torch_dtype="float32")
    ours = CausalLM(cfg)
    ours.init_weights(seed=1)
    with torch.no_grad():  # random biases and norms, so that their names and layout are checked too
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_model(ours, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    hf = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.tie_word_embeddings == tied
    ids = torch.randint(0, 300, (2, 21))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-5, rtol=0)


def test_kv_cached_decoding_equals_full_forward(hf_checkpoint):
    _, path = hf_checkpoint(seed=5, **CONFIGS["gqa6-tied"])
    model = load_model(path, dtype="fp32")
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        parts = [model(ids[:, :10], cache=cache)]  # prefill, then one token at a time, then a chunk of 4
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(10, 20)]
        parts.append(model(ids[:, 20:], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 24


def test_left_padded_batch_equals_single_rows(hf_checkpoint):
    _, path = hf_checkpoint(seed=6, **CONFIGS["gqa7-tied"])
    model = load_model(path, dtype="fp32")
    a, b = torch.randint(0, 320, (1, 12)), torch.randint(0, 320, (1, 7))
    padded = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, :5] = False
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(padded, position_ids=positions, valid=valid)
        torch.testing.assert_close(batched[0], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(batched[1, 5:], model(b)[0], atol=1e-5, rtol=0)
        # and through the cache: the padded row decodes as if alone
        cache = KVCache(model.config, 2, 16)
        model(padded, position_ids=positions, cache=cache, valid=valid)
        nxt = torch.tensor([[3], [4]])
        step = model(nxt, position_ids=positions[:, -1:] + 1, cache=cache)
        alone = model(torch.cat([b, nxt[1:]], 1))[:, -1]
    torch.testing.assert_close(step[1, -1], alone[0], atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter():
    cfg = ModelConfig.from_preset("tiny")
    model = CausalLM(cfg)
    model.init_weights(seed=0)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # an untrained model predicts close to uniformly
    assert abs(loss.item() - torch.log(torch.tensor(cfg.vocab_size)).item()) < 0.5


def test_int8_kv_cache_error_bound_and_model_outputs():
    """The 8-bit KV cache: each stored value within half a quantization step of the original (scale = absmax/127
    per token and head), and a model decoding from it close to one decoding from the fp32 cache."""
    from qwen25.model.attention import KVCache, quantize_int8

    x = torch.randn(3, 2, 17, 64) * torch.rand(3, 2, 17, 1) * 10
    x[0, 0, 0] = 0  # an all-zero vector stays zero
    q, scale = quantize_int8(x)
    assert ((q.float() * scale[..., None] - x).abs() <= scale[..., None] / 2 + 1e-6).all()
    assert (q[0, 0, 0] == 0).all() and q.abs().max() <= 127
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=1)
    model.eval()
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        out = {}
        for int8 in (False, True):
            cache = KVCache(model.config, 2, 48, int8=int8)
            steps = [model(ids[:, :30], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(30, 40)]
            out[int8] = torch.cat(steps, 1)
        assert cache.nbytes() < KVCache(model.config, 2, 48).nbytes() / 3  # int8 + scales vs fp32
    probs = out[False].softmax(-1)
    assert (out[True] - out[False]).abs().max() < 0.05 * out[False].abs().max()
    assert (out[True].softmax(-1) - probs).abs().sum(-1).max() < 0.05  # total variation per position
