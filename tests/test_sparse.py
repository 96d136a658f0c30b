"""Sparse prefill attention (model/sparse.py): the block kernel equals a dense softmax restricted to the pattern's keys
(plain RoPE and DCA), the measured attention mass equals the reference's, a pattern that keeps every key equals dense
attention in the whole model and the engine, and the probe finds planted vertical and slash structure."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.generation import Engine, SamplingParams
from qwen25.model import CausalLM, KVCache
from qwen25.model import sparse as sparse_module
from qwen25.model.sparse import SparsePrefill


def raw_scores(qs, k, q_pos, k_pos, chunk_len):
    """Scores of every (query, key) pair, DCA's rotation chosen literally by the pair's chunks."""
    s = [q @ k.T for q in qs]
    if chunk_len is None:
        return s[0]
    rel = q_pos[:, None] // chunk_len - k_pos[None] // chunk_len
    return torch.where(rel == 0, s[0], torch.where(rel == 1, s[1], s[2]))


def reference(qs, k, v, q_pos, k_pos, chunk_len, block, bands, columns):
    """Dense softmax over the keys the pattern keeps: key blocks at the kept distances, kept columns before the query's
    block; causal. Returns (output, share of the causal softmax mass kept per query row)."""
    scores = raw_scores(qs, k, q_pos, k_pos, chunk_len)
    q_block, k_block = q_pos[:, None] // block, k_pos[None] // block
    causal = k_pos[None] <= q_pos[:, None]
    keep = (torch.isin(q_block - k_block, bands) | (torch.isin(k_pos, columns)[None] & (k_block < q_block))) & causal
    kept = scores.masked_fill(~keep, float("-inf"))
    mass = torch.exp(torch.logsumexp(kept, -1) - torch.logsumexp(scores.masked_fill(~causal, float("-inf")), -1))
    return torch.softmax(kept, -1) @ v, mass


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "explicit"])
@pytest.mark.parametrize("measure", [False, True], ids=["", "measure"])
@pytest.mark.parametrize("chunk_len", [None, 70], ids=["rope", "dca"])
def test_block_kernel_equals_dense_softmax_over_the_pattern(chunk_len, measure, fused, monkeypatch):
    """Every path of the block kernel: torch's SDPA (plain RoPE), its flash kernel with log-sum-exp once per DCA
    rotation (or when measuring), and the explicit score tensors where that kernel is absent."""
    if not fused:
        monkeypatch.setattr(sparse_module, "_FLASH_WITH_LSE", None)
    g, t, s, d, block = 3, 150, 403, 16, 16
    gen = torch.Generator().manual_seed(1)
    qs = [torch.randn(g, t, d, generator=gen) * d ** -0.5 for _ in range(1 if chunk_len is None else 3)]
    k, v = torch.randn(s, d, generator=gen), torch.randn(s, d, generator=gen)
    q_pos, k_pos = torch.arange(s - t, s), torch.arange(s)  # the chunk starts mid-block: padded query blocks
    for bands, columns in ((torch.tensor([0, 2, 5]), torch.tensor([3, 40, 41, 200, 390, 402])),
                           (torch.tensor([0]), torch.tensor([0, 1, 2])),
                           (torch.arange(30), torch.empty(0, dtype=torch.long))):
        sparse = SparsePrefill(min_length=1, block=block, measure=measure)
        out = sparse._blocks(qs, k, v, q_pos, k_pos, chunk_len, bands, columns)
        want, mass = reference(qs, k, v, q_pos, k_pos, chunk_len, block, bands, columns)
        torch.testing.assert_close(out, want.expand_as(out), atol=2e-6, rtol=1e-5)
        if measure:
            assert sparse.summary()["attention_mass"] == pytest.approx(float(mass.mean()), abs=1e-5)
    if measure:
        assert sparse.summary()["attention_mass"] == pytest.approx(1.0, abs=1e-5)  # the last keeps every band
    # the probe's estimate: the exact kept share over the last `probe` queries
    sparse = SparsePrefill(min_length=1, block=block, probe=24, max_keys=96, mass=0.9)
    bands, columns = sparse.pattern(qs, k, q_pos, k_pos, chunk_len)
    assert 0 in bands.tolist() and len(bands) * block + len(columns) <= 96
    _, mass = reference([q[:, -24:] for q in qs], k, v, q_pos[-24:], k_pos, chunk_len, block, bands, columns)
    assert sparse.summary()["probe_mass"] == pytest.approx(float(mass.mean()), abs=1e-5)
    # a budget that allows it: the pattern grows until it holds the target exactly (bands and columns overlap)
    sparse = SparsePrefill(min_length=1, block=block, probe=24, max_keys=10_000, mass=0.97)
    bands, columns = sparse.pattern(qs, k, q_pos, k_pos, chunk_len)
    assert 0.97 <= sparse.summary()["probe_mass"] < 1


def test_probe_finds_planted_columns_and_diagonal():
    """Queries that attend to 3 far columns and their own position: the pattern keeps those (and little else), its
    probe estimate and the exact mass kept over every query are both above 95%."""
    g, t, s, d = 2, 256, 2048, 32
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(s, d, generator=gen) * 0.1
    v = torch.randn(s, d, generator=gen)
    hot = torch.tensor([5, 700, 1300])
    direction = torch.randn(d, generator=gen)
    k[hot] += 3 * direction
    q = torch.randn(g, t, d, generator=gen) * 0.1 + 3 * direction  # every query likes the hot columns ...
    q_pos, k_pos = torch.arange(s - t, s), torch.arange(s)
    k[q_pos] += 2 * direction  # ... and the keys of its own chunk (the local diagonal)
    sparse = SparsePrefill(min_length=1, block=64, max_keys=512, measure=True)
    bands, columns = sparse.pattern([q], k, q_pos, k_pos, None)
    assert set(hot.tolist()) <= set(columns.tolist())
    assert 0 in bands.tolist() and len(columns) + 64 * len(bands) <= 512
    out = sparse._blocks([q], k, v, q_pos, k_pos, None, bands, columns)
    stats = sparse.summary()
    assert stats["probe_mass"] >= 0.95 and stats["attention_mass"] >= 0.95
    assert stats["kept_key_share"] < 0.3
    want, _ = reference([q], k, v, q_pos, k_pos, None, 64, torch.arange(s // 64), torch.empty(0, dtype=torch.long))
    assert (out - want).abs().max() < 0.2 * v.abs().max()  # close to dense attention


def small_model(seed=0, **changes):
    cfg = ModelConfig.from_preset("tiny", **changes)
    model = CausalLM(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():  # larger weights than the 0.02 init: peaked attention
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


DCA = {"dual_chunk_attention_config": {"chunk_size": 48, "local_size": 8, "original_max_position_embeddings": 32}}


@pytest.mark.parametrize("changes", [{}, DCA], ids=["rope", "dca"])
def test_keep_all_pattern_equals_dense_prefill_in_the_model(changes):
    """Prefill in chunks through the cache (as the engine does): a pattern keeping every key gives dense logits."""
    model = small_model(seed=3, **changes)
    ids = torch.randint(0, model.config.vocab_size, (1, 150))
    logits = {}
    for name, sparse in (("dense", None), ("sparse", SparsePrefill.keep_all(block=16, probe=16))):
        model.sparse_prefill = sparse
        cache = KVCache(model.config, 1, 160)
        with torch.no_grad():
            logits[name] = torch.cat([model(ids[:, a:a + 40], cache=cache) for a in range(0, 150, 40)], 1)
    assert model.sparse_prefill.stats["forwards"] == 4 * model.config.num_hidden_layers
    torch.testing.assert_close(logits["sparse"], logits["dense"], atol=1e-4, rtol=1e-4)


def test_sparse_applies_only_to_long_single_row_prefills():
    model = small_model(seed=4)
    model.sparse_prefill = sparse = SparsePrefill(min_length=100, block=16, probe=16, min_queries=8, max_keys=64)
    with torch.no_grad():
        cache = KVCache(model.config, 1, 200)
        model(torch.randint(0, 500, (1, 90)), cache=cache)  # 90 keys: dense
        assert sparse.stats["forwards"] == 0
        model(torch.randint(0, 500, (1, 4)), cache=cache)  # 94 keys, and 4 queries: dense
        model(torch.randint(0, 500, (1, 20)), cache=cache)  # 114 keys: sparse
        assert sparse.stats["forwards"] == model.config.num_hidden_layers
        batch = KVCache(model.config, 2, 200)
        model(torch.randint(0, 500, (2, 120)), cache=batch)  # two rows: dense
        assert sparse.stats["forwards"] == model.config.num_hidden_layers
    assert sparse.summary()["kept_key_share"] < 1


@pytest.mark.parametrize("changes", [{}, DCA], ids=["rope", "dca"])
def test_engine_with_keep_all_sparse_prefill_generates_the_dense_tokens(changes):
    """Several long prompts, chunked (each long chunk in a forward of its own), beside short ones: the same greedy
    tokens as dense prefill; the long chunks really ran sparse."""
    model = small_model(seed=5, **changes)
    prompts = [torch.randint(0, 500, (n,)).tolist() for n in (140, 30, 120)]
    params = SamplingParams(max_new_tokens=6)
    dense = Engine(model, max_batch=3, max_len=160, prefill_chunk=64, prefix_capacity_blocks=0).generate(prompts, params)
    model.sparse_prefill = SparsePrefill.keep_all(block=16, probe=16, min_length=64)
    sparse = Engine(model, max_batch=3, max_len=160, prefill_chunk=64, prefix_capacity_blocks=0).generate(prompts, params)
    assert sparse == dense
    assert model.sparse_prefill.stats["forwards"] > 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_keys"):
        SparsePrefill(block=64, max_keys=32)
    with pytest.raises(ValueError, match="mass"):
        SparsePrefill(mass=0)
    with pytest.raises(ValueError, match="probe"):
        SparsePrefill(probe=0)


def test_cli_flag_builds_the_settings():
    from qwen25.cli import build_parser

    sparse_prefill_from = SparsePrefill.from_flags
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt-ids", "1", "--sparse-prefill"])
    assert sparse_prefill_from(args) == SparsePrefill(min_length=8192, max_keys=2048)
    args = build_parser().parse_args(["serve", "--model", "m", "--sparse-prefill", "4096", "--sparse-max-keys", "1024"])
    assert (sparse_prefill_from(args).min_length, sparse_prefill_from(args).max_keys) == (4096, 1024)
    assert sparse_prefill_from(build_parser().parse_args(["chat", "--model", "m"])) is None
