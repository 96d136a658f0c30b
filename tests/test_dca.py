"""Dual Chunk Attention: exact against plain causal attention within one chunk, and against a slow, literal
reference (one logit at a time, from the three position maps) on sequences of several chunks, for prefill,
token-by-token decoding with the KV cache, left padding, and the whole model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig
from qwen25.model import CausalLM, KVCache
from qwen25.model.dca import (
    DualChunkSettings, dca_attention, dual_chunk_logit_scale, dual_chunk_positions, dual_chunk_rope,
)
from qwen25.model.rope import apply_rope, default_inv_freq

# (chunk_size s, local_size w): c = s - w. With c = 8 the inter-chunk query position is s = 12 (2c - 1 > s);
# with c = 4 it is 2c - 1 = 7 (< s = 10).
SETTINGS = {"c8": (12, 4), "c4": (10, 6)}


# ---- the literal reference ------------------------------------------------------------------------------------
def rotate(x: torch.Tensor, position: float, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of one vector, as complex multiplication: (x1 + i x2) * exp(i position theta)."""
    half = x.shape[-1] // 2
    z = torch.complex(x[:half].double(), x[half:].double()) * torch.exp(1j * position * inv_freq.double())
    return torch.cat((z.real, z.imag))


def literal_dca(q, k, v, q_pos, k_pos, s, w, inv_freq, original=0, visible=None):
    """DCA one logit at a time. q (Hq, T, d), k/v (Hkv, S, d) un-rotated; q_pos (T,), k_pos (S,) token positions.

    Chunks are position // c. Key j sits at RoPE position j mod c; query i at i mod c for keys of its chunk
    (causal), min(i mod c + c, s) for the previous chunk, min(2c - 1, s) for earlier chunks. Logits are
    scaled by m^2, m = max(1, 0.1 ln((i + 1) / L) + 1) when L (original) is set.
    """
    c = s - w
    hq, t, d = q.shape
    group = hq // k.shape[0]
    out = torch.zeros(hq, t, d, dtype=torch.float64)
    for h in range(hq):
        keys = [rotate(k[h // group, j], int(k_pos[j]) % c, inv_freq) for j in range(k.shape[1])]
        for i in range(t):
            pi = int(q_pos[i])
            m2 = max(1.0, 0.1 * math.log((pi + 1) / original) + 1) ** 2 if original else 1.0
            logits = torch.full((k.shape[1],), float("-inf"), dtype=torch.float64)
            for j in range(k.shape[1]):
                pj = int(k_pos[j])
                if visible is not None and not visible[i, j]:
                    continue
                if pj // c == pi // c and pj <= pi:
                    qp = pi % c
                elif pj // c == pi // c - 1:
                    qp = min(pi % c + c, s)
                elif pj // c < pi // c - 1:
                    qp = min(2 * c - 1, s)
                else:
                    continue
                logits[j] = rotate(q[h, i], qp, inv_freq) @ keys[j] / math.sqrt(d) * m2
            out[h, i] = torch.softmax(logits, 0) @ v[h // group].double()
    return out


def random_qkv(b=2, hq=4, hkv=2, t=37, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, t, d, generator=gen), torch.randn(b, hkv, t, d, generator=gen),
            torch.randn(b, hkv, t, d, generator=gen))


# ---- pure functions --------------------------------------------------------------------------------------------
def test_dual_chunk_positions_follow_the_definition():
    s, w = 12, 4
    pos = torch.arange(40)
    intra, successive, inter, key = dual_chunk_positions(pos, s, w)
    for i in range(40):
        assert intra[i] == key[i] == i % 8
        assert successive[i] == min(i % 8 + 8, 12)
        assert inter[i] == min(2 * 8 - 1, 12)
    # No relative distance seen by any part exceeds the chunk size.
    assert int((successive[:, None] - key[None, :]).max()) <= s and int((inter - key).max()) <= s


def test_logit_scale_is_vllms_m_squared():
    pos = torch.tensor([0, 99, 100, 399, 4000])
    got = dual_chunk_logit_scale(pos, 100)
    expected = [max(1.0, 0.1 * math.log((p + 1) / 100) + 1) ** 2 for p in pos.tolist()]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)
    assert torch.equal(dual_chunk_logit_scale(pos, 0), torch.ones(5))


@pytest.mark.parametrize("tile", [None, 5, 64])
def test_dca_equals_causal_attention_within_one_chunk(tile):
    q, k, v = random_qkv(t=30)
    pos = torch.arange(30).expand(2, 30)
    got = dca_attention(q, q * 7, q * -3, k, v, pos, pos, chunk_len=30, tile=tile)  # only intra is ever used
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("t", [37, 20, 9, 1])  # prefill, and queries that are the last t of 37 slots
@pytest.mark.parametrize("chunk_len", [8, 5, 37])
def test_flash_chunk_path_equals_tiled_path(t, chunk_len):
    import qwen25.model.dca as dca

    assert dca._FLASH_WITH_LSE is not None  # this torch has the CPU kernel: the fast path is what runs
    gen = torch.Generator().manual_seed(t * 100 + chunk_len)
    qs = [torch.randn(2, 6, t, 16, generator=gen) for _ in range(3)]
    k, v = torch.randn(2, 3, 37, 16, generator=gen), torch.randn(2, 3, 37, 16, generator=gen)
    pos = torch.arange(37)[None]
    fast = dca_attention(*qs, k, v, pos[:, 37 - t:].expand(2, t), pos, chunk_len)
    tiled = dca_attention(*qs, k, v, pos[:, 37 - t:].expand(2, t), pos, chunk_len, tile=4)
    torch.testing.assert_close(fast, tiled, atol=1e-5, rtol=0)


# ---- DCA against the literal reference ---------------------------------------------------------------------------
def _tables(name, original, positions, cache=None):
    s, w = SETTINGS[name]
    settings = DualChunkSettings(s, w, original)
    inv_freq = default_inv_freq(16, 10_000.0)
    return settings, inv_freq, dual_chunk_rope(settings, inv_freq, 1.0, positions, cache)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("original,tile", [(0, None), (6, 3)])
def test_dca_prefill_matches_literal_reference(name, original, tile):
    q, k, v = random_qkv(t=37, seed=1)
    pos = torch.arange(37).expand(2, 37)
    settings, inv_freq, rope = _tables(name, original, pos)
    k_rot = apply_rope(k, *rope.key)  # keys: RoPE at j mod c
    literal_keys = [[rotate(k[b, h, j], j % settings.chunk_len, inv_freq) for j in range(37)] for b, h in ((0, 0), (1, 1))]
    torch.testing.assert_close(k_rot[[0, 1], [0, 1]].double(), torch.stack([torch.stack(r) for r in literal_keys]),
                               atol=1e-5, rtol=0)
    queries = [apply_rope(q, cos, sin) for cos, sin in rope.queries]
    got = dca_attention(*queries, k_rot, v, pos, pos, settings.chunk_len, tile=tile)
    for b in range(2):
        ref = literal_dca(q[b], k[b], v[b], pos[b], pos[b], *SETTINGS[name], inv_freq, original)
        torch.testing.assert_close(got[b].double(), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", SETTINGS)
def test_dca_decoding_token_by_token_matches_literal_reference(name):
    q, k, v = random_qkv(b=1, t=30, seed=2)
    pos = torch.arange(30)[None]
    settings, inv_freq, rope = _tables(name, 10, pos)
    k_rot = apply_rope(k, *rope.key)
    ref = literal_dca(q[0], k[0], v[0], pos[0], pos[0], *SETTINGS[name], inv_freq, 10)
    cache = KVCache(ModelConfig.from_preset("tiny"), 1, 30)  # no padding: key positions are the slots
    for i in range(30):
        _, _, step = _tables(name, 10, pos[:, i:i + 1], cache=cache)
        out = step.attend(q[:, :, i:i + 1], k_rot[:, :, :i + 1], v[:, :, :i + 1], None)
        torch.testing.assert_close(out[0, :, 0].double(), ref[:, i], atol=1e-5, rtol=0)


# ---- the whole model -----------------------------------------------------------------------------------------------
def dca_model(name="c8", original=0, seed=0, **changes):
    s, w = SETTINGS[name]
    cfg = ModelConfig.from_preset("tiny", **{"dual_chunk_attention_config": {
        "chunk_size": s, "local_size": w, "original_max_position_embeddings": original}, **changes})
    model = CausalLM(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():  # random biases and norms too, and larger weights than the 0.02 init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def literal_model_forward(model, ids):
    """The decoder with every attention computed by `literal_dca` (positions 0..T-1, one sequence)."""
    cfg, (s, w) = model.config, (model.dual_chunk.chunk_size, model.dual_chunk.local_size)
    t, d = ids.shape[1], cfg.head_size
    pos = torch.arange(t)
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers:
        attn, h = layer.self_attn, layer.input_layernorm(x)
        q = attn.q_proj(h).view(t, cfg.num_attention_heads, d).transpose(0, 1)
        k = attn.k_proj(h).view(t, cfg.num_key_value_heads, d).transpose(0, 1)
        v = attn.v_proj(h).view(t, cfg.num_key_value_heads, d).transpose(0, 1)
        out = literal_dca(q, k, v, pos, pos, s, w, model.inv_freq, model.dual_chunk.original_max_position_embeddings)
        x = x + attn.o_proj(out.float().transpose(0, 1).reshape(1, t, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))


@pytest.mark.parametrize("name,original", [("c8", 0), ("c4", 12)])
def test_model_with_dca_matches_literal_forward(name, original):
    model = dca_model(name, original, seed=3)
    ids = torch.randint(0, 512, (1, 29))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), literal_model_forward(model, ids), atol=1e-4, rtol=0)


def test_model_with_dca_prefill_then_decode_equals_full_forward():
    model = dca_model("c8", original=16, seed=4)
    ids = torch.randint(0, 512, (2, 44))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, 2, 48)
        parts = [model(ids[:, :13], cache=cache)]  # prefill across a chunk boundary, then one token at a time
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(13, 37)]
        parts.append(model(ids[:, 37:], cache=cache))  # then a block of 7 after the cache
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=0)


def test_model_with_dca_left_padding_equals_each_prompt_alone():
    model = dca_model("c4", seed=5)
    prompts = [torch.randint(0, 512, (n,)) for n in (27, 19)]
    ids = torch.zeros(2, 27, dtype=torch.long)
    valid = torch.zeros(2, 27, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, 27 - len(p):], valid[row, 27 - len(p):] = p, True
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = KVCache(model.config, 2, 30)
        batched = model(ids, position_ids=positions, cache=cache, valid=valid)
        step = model(torch.tensor([[5], [9]]), position_ids=positions[:, -1:] + 1, cache=cache)
        for row, p in enumerate(prompts):
            alone = model(torch.cat([p, torch.tensor([[5], [9]][row])])[None])
            torch.testing.assert_close(batched[row, 27 - len(p):], alone[0, :-1], atol=1e-5, rtol=0)
            torch.testing.assert_close(step[row, 0], alone[0, -1], atol=1e-5, rtol=0)


def test_model_with_dca_within_one_chunk_equals_plain_model():
    model = dca_model("c8", seed=6)
    plain = CausalLM(model.config.replace(dual_chunk_attention_config=None))
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 512, (2, 8))  # positions 0..7 < c
    with torch.no_grad():
        torch.testing.assert_close(model(ids), plain.eval()(ids), atol=0, rtol=0)
        longer = torch.randint(0, 512, (2, 20))
        assert not torch.allclose(model(longer)[:, 8:], plain(longer)[:, 8:], atol=1e-3)


def test_engine_batch_mixing_yarn_tables_with_dca_equals_each_request_alone():
    """YaRN with apply_only_beyond_original and DCA: one engine batch holds a short request (plain RoPE table) and
    a long one (the YaRN table), each with its own tables per row; before, the step raised ValueError."""
    from qwen25.generation import Engine, SamplingParams

    model = dca_model("c8", original=0, seed=6, rope_scaling={"type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 24,
                                                             "apply_only_beyond_original": True})
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (10, 30)]
    params = [SamplingParams(max_new_tokens=n) for n in (6, 12)]  # extents 16 (<= 24: plain) and 42 (YaRN)
    together = Engine(model, max_batch=2, max_len=64).generate(prompts, params)
    alone = [Engine(model, max_batch=1, max_len=64).generate([p], q)[0] for p, q in zip(prompts, params)]
    assert together == alone


def test_engine_chunked_prefill_with_dca_equals_one_forward():
    """A DCA model's prompts prefilled 5 tokens per engine step (chunks crossing DCA's chunk boundaries), beside a
    request that keeps decoding: the first token's logits and the greedy tokens equal a one-shot prefill's."""
    from qwen25.generation import Engine, Request, SamplingParams

    model = dca_model("c8", original=16, seed=7)
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (37, 23, 9)]
    params = SamplingParams(max_new_tokens=8)
    chunked = Engine(model, max_batch=3, max_len=64, prefill_chunk=5, prefix_capacity_blocks=0)
    whole = Engine(model, max_batch=1, max_len=64, prefill_chunk=None, prefix_capacity_blocks=0)
    assert chunked.generate(prompts, params) == [whole.generate([p], params)[0] for p in prompts]
    assert chunked.stats["prefill_forwards"] > len(prompts)  # the prompts really were read in pieces
    for prompt in prompts:  # the logits a prompt ends with, prefilled in chunks vs in one forward
        ids = {e: e.submit(Request(prompt, SamplingParams(max_new_tokens=1, logprobs=5))) for e in (chunked, whole)}
        tops = {}
        for engine, rid in ids.items():
            while engine.has_work():
                for out in engine.step():
                    tops[engine] = out.logprob
        assert tops[chunked][0] == pytest.approx(tops[whole][0], abs=1e-5)
        assert [v for _, v in tops[chunked][1]] == pytest.approx([v for _, v in tops[whole][1]], abs=1e-5)
