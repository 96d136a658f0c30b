"""RoPE variants against transformers: YaRN frequencies and attention factor, logits with rope_scaling, and
the apply-only-beyond-the-original-length option with the KV cache."""

from __future__ import annotations

import math
import random

import pytest
import torch

from qwen25.config import ConfigError, ModelConfig
from qwen25.model import CausalLM, KVCache, load_model
from qwen25.model.rope import (
    ONLY_BEYOND_ORIGINAL, default_inv_freq, rope_parameters, yarn_applies,
    yarn_correction_range, yarn_inv_freq,
)

QWEN_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def hf_rope(rope_type: str, head_dim: int, base: float, max_position: int, scaling: dict | None):
    """(inv_freq, attention_factor) from transformers' own RoPE initialisers."""
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": rope_type, "rope_theta": base, **(scaling or {})}
    cfg = Qwen2Config(hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=max_position, rope_parameters=params)
    if rope_type == "default":
        from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

        return Qwen2RotaryEmbedding.compute_default_rope_parameters(cfg)
    return ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")


def ours(head_dim: int, base: float, max_position: int, scaling: dict | None):
    cfg = ModelConfig(vocab_size=8, hidden_size=head_dim * 2, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, rope_theta=base,
                      max_position_embeddings=max_position, rope_scaling=scaling)
    return rope_parameters(cfg)


def test_qwen25_yarn_numbers_match_transformers():
    assert yarn_correction_range(128, 1e6, 32768) == (23, 40)
    inv_freq, factor = yarn_inv_freq(128, 1e6, 4.0, 32768)
    assert factor == pytest.approx(0.1 * math.log(4) + 1) and round(factor, 6) == 1.138629
    ref_freq, ref_factor = hf_rope("yarn", 128, 1e6, 32768, QWEN_YARN)
    torch.testing.assert_close(inv_freq, ref_freq, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, abs=1e-12)
    # The config path gives the same; pairs below low keep the base frequency, above high are divided by 4.
    got, got_factor = ours(128, 1e6, 32768, QWEN_YARN)
    torch.testing.assert_close(got, ref_freq, atol=0, rtol=1e-6)
    base = default_inv_freq(128, 1e6)
    torch.testing.assert_close(got[:23], base[:23])
    torch.testing.assert_close(got[40:], base[40:] / 4)


@pytest.mark.parametrize("seed", range(25))
def test_yarn_matches_transformers_on_random_settings(seed):
    rng = random.Random(seed)
    head_dim = rng.choice([16, 32, 64, 80, 96, 128, 256])
    base = 10 ** rng.uniform(3, 7.5)
    original = rng.choice([512, 2048, 4096, 32768, 65536, 262144])
    max_position = rng.choice([original, original * 2, original * 4, 1_010_000])
    scaling = {"rope_type": "yarn", "factor": rng.choice([1.0, 1.5, 2.0, 4.0, 8.0, 32.0]),
               "original_max_position_embeddings": original}
    if rng.random() < 0.3:
        scaling["beta_fast"], scaling["beta_slow"] = rng.choice([16, 32, 64]), rng.choice([0.5, 1, 2])
    if rng.random() < 0.2:
        scaling["truncate"] = False
    if rng.random() < 0.2:
        scaling["attention_factor"] = rng.uniform(0.5, 2.0)
    elif rng.random() < 0.2:  # DeepSeek-style ratio of two mscales
        scaling["mscale"], scaling["mscale_all_dim"] = rng.choice([0.707, 1.0]), rng.choice([0.707, 1.0])
    ref_freq, ref_factor = hf_rope("yarn", head_dim, base, max_position, dict(scaling))
    got, factor = ours(head_dim, base, max_position, scaling)
    torch.testing.assert_close(got, ref_freq, atol=0, rtol=1e-6)
    assert factor == pytest.approx(ref_factor, rel=1e-12)


@pytest.mark.parametrize("base", [10_000.0, 1_000_000.0, 10_000_000.0])
def test_default_rope_at_any_base_matches_transformers(base):
    """ABF is only a larger rope_theta: 10K (phase 1), 1M (Qwen2.5), 10M (the 1M models)."""
    ref, ref_factor = hf_rope("default", 128, base, 32768, None)
    got, factor = ours(128, base, 32768, None)
    torch.testing.assert_close(got, ref, atol=0, rtol=1e-6)
    assert factor == ref_factor == 1.0


def test_factor_and_original_length_are_used_as_given():
    """max_position_embeddings / original (= 4 here) must not replace the explicit factor 2, nor the original
    length be taken from max_position_embeddings when it is given (older transformers versions did both)."""
    scaling = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    ref, ref_factor = hf_rope("yarn", 64, 1e6, 32768, dict(scaling))
    got, factor = ours(64, 1e6, 32768, scaling)
    expected, expected_factor = yarn_inv_freq(64, 1e6, 2.0, 8192)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got, ref, atol=0, rtol=1e-6)
    assert factor == expected_factor == pytest.approx(ref_factor)
    # Missing original length: max_position_embeddings, as transformers 5 defaults it.
    no_original = {"rope_type": "yarn", "factor": 2.0}
    torch.testing.assert_close(ours(64, 1e6, 32768, no_original)[0], hf_rope("yarn", 64, 1e6, 32768, dict(no_original))[0],
                               atol=0, rtol=1e-6)


def test_bad_rope_scaling_is_a_clear_error():
    with pytest.raises(ConfigError, match="needs 'factor'"):
        ours(64, 1e4, 512, {"rope_type": "yarn"})
    with pytest.raises(ConfigError, match="'dynamic' is not supported"):
        ours(64, 1e4, 512, {"rope_type": "dynamic", "factor": 2.0})


def test_logits_with_yarn_match_transformers(hf_checkpoint):
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    hf, path = hf_checkpoint(seed=11, rope_scaling=scaling, max_position_embeddings=64)
    model = load_model(path, dtype="fp32")
    assert model.attention_factor == pytest.approx(0.1 * math.log(4) + 1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)


# ---- YaRN only beyond the original length ------------------------------------------------------------------
def _tiny(scaling):
    cfg = ModelConfig.from_preset("tiny", num_hidden_layers=2, rope_scaling=scaling, max_position_embeddings=256)
    model = CausalLM(cfg)
    model.init_weights(seed=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def _same_weights(model, scaling):
    other = CausalLM(model.config.replace(rope_scaling=scaling))
    other.load_state_dict(model.state_dict())
    return other.eval()


def test_only_beyond_original_switches_by_sequence_length():
    static = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    model = _tiny({**static, ONLY_BEYOND_ORIGINAL: True})
    plain, scaled = _same_weights(model, None), _same_weights(model, static)
    assert not yarn_applies(model.config, 32) and yarn_applies(model.config, 33) and yarn_applies(scaled.config, 5)
    short, long = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(short), plain(short), atol=0, rtol=0)  # short: untouched by YaRN
        torch.testing.assert_close(model(long), scaled(long), atol=0, rtol=0)
        assert not torch.allclose(plain(long), scaled(long), atol=1e-3)
        # With a cache, the choice follows the cache's capacity (prompt + max_new_tokens), made once:
        # a short prompt in a cache that may grow past 32 is rotated with the scaled table from the start.
        cache = KVCache(model.config, 2, 48)
        torch.testing.assert_close(model(short, cache=cache), scaled(short), atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [24, 44])
def test_only_beyond_original_cached_decoding_equals_full_forward(length):
    model = _tiny({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, ONLY_BEYOND_ORIGINAL: True})
    ids = torch.randint(0, 512, (2, length))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, length)  # capacity = the full length, as generate sizes it
        parts = [model(ids[:, :12], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(12, length)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_only_beyond_original_generate_and_serving_engine_agree():
    """`qwen25 generate` and `qwen25 serve` run one engine: a request's table follows the length it may reach
    (prompt + max_new_tokens), whatever the engine's capacity and whichever requests share its batch."""
    from qwen25.generation import Engine, SamplingParams, generate

    static = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    model = _tiny({**static, ONLY_BEYOND_ORIGINAL: True})
    with torch.no_grad():  # weights far from init, so that greedy tokens depend on the table
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    plain, scaled = _same_weights(model, None), _same_weights(model, static)
    g = torch.Generator().manual_seed(5)
    short, long = (torch.randint(0, 512, (n,), generator=g).tolist() for n in (12, 30))
    few, many = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=16)  # 20 <= 32 < 46
    served = Engine(model, max_batch=4, max_len=256)  # a server's capacity, far past the original length
    batch = [(short, few), (long, many), (short, many), (long, few)]
    outs = served.generate([p for p, _ in batch], [q for _, q in batch])
    for (prompt, params), out in zip(batch, outs):
        reference = scaled if len(prompt) + params.max_new_tokens > 32 else plain
        assert out == generate(model, [prompt], params)[0] == generate(reference, [prompt], params)[0]
    for prompt, params in batch:  # and the two tables give different tokens for each of these requests
        assert generate(plain, [prompt], params) != generate(scaled, [prompt], params)


def test_rope_settings_apply_to_a_loaded_model_and_come_back():
    """CausalLM.rope_settings: inside the block the model computes what a model built with the setting computes
    (same weights), after it what it did before; a setting that is not about positions is refused."""
    static = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}
    model = _tiny(None)
    scaled = _same_weights(model, static)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        before = model(ids)
        with model.rope_settings(rope_scaling=static) as same:
            assert same is model and model.config.rope_scaling == static
            torch.testing.assert_close(model(ids), scaled(ids), atol=0, rtol=0)
        torch.testing.assert_close(model(ids), before, atol=0, rtol=0)
    assert model.config.rope_scaling is None
    with pytest.raises(ValueError, match="not an inference-time position setting: hidden_size"):
        with model.rope_settings(hidden_size=8):
            pass
