"""Mixture of experts against transformers' Qwen2MoeForCausalLM: logits, aux loss, checkpoints both ways,
KV cache, grouped dispatch vs a per-token reference, gradients, training with the load-balancing loss."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from qwen25.config import PRESETS, ConfigError, ModelConfig, flops_per_token, param_count
from qwen25.model import CausalLM, KVCache, load_model, save_model
from qwen25.model.moe import (SparseMoeBlock, grouped_experts, load_balancing_loss, route, router_aux_loss,
                              router_loss, router_stats, router_z_loss, sparse_blocks)

# Several expert counts and top-k, renormalised or not, dense layers among sparse ones (both mechanisms).
CONFIGS = {
    "e4-k1": dict(num_experts=4, num_experts_per_tok=1),
    "e8-k2-norm": dict(num_experts=8, num_experts_per_tok=2, norm_topk_prob=True),
    "e6-k3-step2": dict(num_experts=6, num_experts_per_tok=3, decoder_sparse_step=2, num_hidden_layers=3),
    "e16-k4-mlponly": dict(num_experts=16, num_experts_per_tok=4, mlp_only_layers=[1], num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=4),
    "e60-k4-a27b": dict(num_experts=60, num_experts_per_tok=4, hidden_size=48, num_attention_heads=6,
                        num_key_value_heads=6, moe_intermediate_size=24, shared_expert_intermediate_size=96),
}


def hf_moe_model(seed: int = 0, **overrides):
    """A transformers Qwen2MoeForCausalLM, small, every weight random (router, biases and norms too), eval mode."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48,
                shared_expert_intermediate_size=96, rope_theta=10000.0, max_position_embeddings=512,
                tie_word_embeddings=False, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**base, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def random_ours(cfg: ModelConfig, seed: int = 0) -> CausalLM:
    model = CausalLM(cfg)
    model.init_weights(seed=seed)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


class _Checkpoints(dict):
    """name -> (transformers model, its save_pretrained directory), each written on first use."""

    def __init__(self, tmp_path_factory):
        super().__init__()
        self.tmp = tmp_path_factory

    def __missing__(self, name):
        model = hf_moe_model(seed=10 + list(CONFIGS).index(name), **CONFIGS[name])
        path = self.tmp.mktemp(name)
        model.save_pretrained(path)
        self[name] = (model, path)
        return self[name]


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    return _Checkpoints(tmp_path_factory)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_aux_loss_match_transformers_fp32(hf_checkpoints, name):
    hf, path = hf_checkpoints[name]
    ours = load_model(path, dtype="fp32")
    assert ours.config.model_type == "qwen2_moe"
    sparse = [i for i in range(ours.config.num_hidden_layers) if ours.config.is_sparse_layer(i)]
    assert len(sparse_blocks(ours)) == len(sparse) > 0
    if "mlp_only_layers" in CONFIGS[name] or "decoder_sparse_step" in CONFIGS[name]:
        assert len(sparse) < ours.config.num_hidden_layers  # a dense layer among the sparse ones
    ids = torch.randint(0, 320, (3, 37))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        got = ours(ids)
    torch.testing.assert_close(got, ref.logits, atol=1e-5, rtol=0)
    for ours_logits, hf_logits in zip([b.router_logits for b in sparse_blocks(ours)], ref.router_logits):
        torch.testing.assert_close(ours_logits, hf_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(router_aux_loss(ours), ref.aux_loss, atol=1e-6, rtol=1e-6)


def test_aux_loss_with_padding_matches_transformers(hf_checkpoints):
    hf, path = hf_checkpoints["e8-k2-norm"]
    ours = load_model(path, dtype="fp32")
    ids = torch.randint(0, 320, (3, 20))
    valid = torch.ones(3, 20, dtype=torch.bool)
    valid[0, 13:] = False  # right padding: every query still sees at least one key
    valid[2, 5:] = False
    with torch.no_grad():
        ref = hf(ids, attention_mask=valid.long(), output_router_logits=True)
        got = ours(ids, valid=valid)
    torch.testing.assert_close(got[valid], ref.logits[valid], atol=1e-5, rtol=0)
    padded = router_aux_loss(ours, valid)
    torch.testing.assert_close(padded, ref.aux_loss, atol=1e-6, rtol=1e-6)
    assert abs(float(padded - router_aux_loss(ours))) > 1e-4  # the mask changes the loss: padding left out
    stats = router_stats(ours, valid)
    assert [sum(layer) for layer in stats["tokens_per_expert"]] == [int(valid.sum()) * 2] * 2  # 2 layers, top-2
    assert stats["aux_loss"] == pytest.approx(float(padded))


def test_our_checkpoint_loads_in_transformers(tmp_path):
    from transformers import Qwen2MoeForCausalLM

    cfg = ModelConfig.from_preset("tiny-moe", num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=True)
    ours = random_ours(cfg, seed=4)
    save_model(ours, tmp_path)
    hf = Qwen2MoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.num_experts == 8 and hf.config.mlp_only_layers == [0] and hf.config.norm_topk_prob
    ids = torch.randint(0, cfg.vocab_size, (2, 23))
    with torch.no_grad():
        ref = hf(ids, output_router_logits=True)
        torch.testing.assert_close(ours(ids), ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(router_aux_loss(ours), ref.aux_loss, atol=1e-6, rtol=1e-6)
    # The per-expert tensor names are those transformers writes itself.
    theirs = tmp_path / "hf"
    hf.save_pretrained(theirs)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as ours_file:
        names = set(ours_file.keys())
    with safe_open(str(theirs / "model.safetensors"), "pt") as theirs_file:
        assert names == set(theirs_file.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names


def test_sharded_round_trip_keeps_every_expert(tmp_path):
    cfg = ModelConfig.from_preset("tiny-moe")
    ours = random_ours(cfg, seed=5)
    save_model(ours, tmp_path, max_shard_size=60_000)
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 2
    again = load_model(tmp_path, dtype="fp32")
    for (name, p), (_, q) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name


def test_kv_cached_decoding_equals_full_forward(hf_checkpoints):
    _, path = hf_checkpoints["e6-k3-step2"]
    model = load_model(path, dtype="fp32")
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, batch_size=2, max_len=32)
        parts = [model(ids[:, :9], cache=cache)]
        parts += [model(ids[:, i:i + 1], cache=cache) for i in range(9, 20)]
        parts.append(model(ids[:, 20:], cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_grouped_dispatch_equals_per_token_reference():
    cfg = ModelConfig.from_preset("tiny-moe", num_experts=12, num_experts_per_tok=3)
    block = SparseMoeBlock(cfg)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    calls = {i: 0 for i in range(cfg.num_experts)}
    for i, expert in enumerate(block.experts):
        expert.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randn(2, 41, cfg.hidden_size, dtype=torch.float64)
    block.double()
    with torch.no_grad():
        got = block(x).reshape(-1, cfg.hidden_size)
        calls_per_expert = dict(calls)
        flat = x.reshape(-1, cfg.hidden_size)
        probs = torch.softmax(block.gate(flat), dim=-1, dtype=torch.float32).double()  # routing is in fp32
        ref = torch.empty_like(flat)
        for t in range(flat.shape[0]):  # the definition, one token at a time
            w, e = probs[t].topk(3)
            y = sum(w[j] * block.experts[int(e[j])](flat[t]) for j in range(3))
            ref[t] = y + torch.sigmoid(block.shared_expert_gate(flat[t])) * block.shared_expert(flat[t])
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    assert max(calls_per_expert.values()) == 1  # each expert ran once, on all of its tokens
    empty = grouped_experts(x[0, :0], torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3), block.experts)
    assert empty.shape == (0, cfg.hidden_size)  # an empty batch (e.g. every row padding) is no error


def test_route_renormalises_only_when_asked():
    logits = torch.randn(50, 10)
    w, e = route(logits, 3, norm_topk_prob=False)
    probs = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(w, probs.gather(1, e))
    assert (w.sum(-1) < 1).all()
    w_norm, e_norm = route(logits.bfloat16(), 3, norm_topk_prob=True)
    assert w_norm.dtype == torch.float32  # the softmax is taken in fp32 whatever the model dtype
    torch.testing.assert_close(w_norm.sum(-1), torch.ones(50))


def test_load_balancing_loss_identities():
    # Uniform router probabilities: f sums to k over experts, P_e = 1/E, so the loss is exactly k.
    assert float(load_balancing_loss([torch.zeros(64, 8)], top_k=2)) == pytest.approx(2.0)
    # Collapse onto one expert with k = 1: f = P = one-hot, the loss is E.
    collapsed = torch.full((32, 8), -1e4)
    collapsed[:, 3] = 0
    assert float(load_balancing_loss([collapsed], top_k=1)) == pytest.approx(8.0)
    # Layers are pooled: two layers equal one layer holding both sets of tokens.
    a, b = torch.randn(20, 6), torch.randn(20, 6)
    torch.testing.assert_close(load_balancing_loss([a, b], 2), load_balancing_loss([torch.cat([a, b])], 2))
    # z-loss: zero logits give (log E)^2 per token.
    assert float(router_z_loss([torch.zeros(5, 8)])) == pytest.approx(torch.log(torch.tensor(8.0)).item() ** 2)


def test_gradients_reach_router_experts_and_shared_expert():
    cfg = ModelConfig.from_preset("tiny-moe", router_z_loss_coef=1e-3)
    model = random_ours(cfg, seed=6).train()
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    logits = model(ids[:, :-1])
    lm = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    extra = router_loss(model)
    recorded = [b.router_logits for b in sparse_blocks(model)]
    torch.testing.assert_close(extra, cfg.router_aux_loss_coef * load_balancing_loss(recorded, 2)
                               + 1e-3 * router_z_loss(recorded))
    assert router_z_loss(recorded).item() > 0
    (lm + extra).backward()
    block = sparse_blocks(model)[0]
    used = router_stats(model)["tokens_per_expert"][0]
    for name, p in [("gate", block.gate.weight), ("shared_expert_gate", block.shared_expert_gate.weight),
                    ("shared_expert", block.shared_expert.down_proj.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for j, expert in enumerate(block.experts):
        if used[j]:
            assert expert.gate_proj.weight.grad.abs().sum() > 0, f"expert {j}"
    # The router gets gradient from the aux loss alone, too (not only through the chosen experts' weights).
    model.zero_grad()
    model(ids)
    router_aux_loss(model).backward()
    last = sparse_blocks(model)[-1]  # (earlier layers' experts feed the later routers, so they get some)
    assert last.gate.weight.grad.abs().sum() > 0 and last.experts[0].up_proj.weight.grad is None


def _train(model, steps, data, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = data[step % len(data)]
        logits = model(batch[:, :-1])
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss = lm + router_loss(model)  # what the training loop adds for a MoE model
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(lm.item())
    return losses


def test_training_lowers_the_loss():
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("tiny-moe", vocab_size=64)
    model = CausalLM(cfg)
    model.init_weights(seed=0)
    # A learnable sequence: each row counts up from a random start (mod vocab).
    data = [(torch.randint(0, 64, (8, 1)) + torch.arange(33)) % 64 for _ in range(4)]
    losses = _train(model.train(), 30, data)
    assert losses[-1] < 0.6 * losses[0], losses
    stats = router_stats(model)
    assert len(stats["tokens_per_expert"]) == 2 and stats["dropped_tokens"] == 0
    assert sum(stats["tokens_per_expert"][0]) == 8 * 32 * cfg.num_experts_per_tok
    assert stats["load_max"] < 3, stats  # top-2 of 8 on 256 tokens, coef 0.001: no expert takes 3x its share


def test_aux_loss_balances_a_collapsed_router():
    """Stated bound: from a router that sends every token to one of two experts (8 experts, top-1: max load
    about 4x the mean), 200 Adam steps on the load-balancing loss alone bring every expert's load on fresh
    random tokens to within 1.4x of the mean (measured: 1.24; sampling noise alone gives about 1.06)."""
    cfg = ModelConfig.from_preset("tiny-moe", num_experts_per_tok=1)
    block = SparseMoeBlock(cfg)
    gen = torch.Generator().manual_seed(1)
    x, fresh = torch.randn(1024, cfg.hidden_size, generator=gen), torch.randn(4096, cfg.hidden_size, generator=gen)
    with torch.no_grad():  # experts 0 and 1 point along +d and -d: one of them always wins
        direction = torch.randn(cfg.hidden_size, generator=gen)
        block.gate.weight.normal_(std=0.02, generator=gen)
        block.gate.weight[0], block.gate.weight[1] = direction, -direction

    def load_max(tokens):
        counts = torch.bincount(route(block.gate(tokens), 1, False)[1].reshape(-1), minlength=8).float()
        return float(counts.max() / counts.mean())

    assert load_max(fresh) > 3.5
    opt = torch.optim.Adam([block.gate.weight], lr=0.05)
    for _ in range(200):
        loss = load_balancing_loss([block.gate(x)], top_k=1)  # the router alone: the experts play no part
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert load_max(fresh) < 1.4


# ---- config, presets, parameter counts ------------------------------------------------------------------
def test_official_moe_configs_and_parameter_counts():
    a27 = ModelConfig.from_preset("qwen1.5-moe-a2.7b")
    a14 = ModelConfig.from_preset("qwen2-57b-a14b")
    assert 14.2e9 < param_count(a27) < 14.4e9 and 2.6e9 < param_count(a27, activated=True) < 2.8e9  # "14.3B, A2.7B"
    assert 57.3e9 < param_count(a14) < 57.5e9 and 14.1e9 < param_count(a14, activated=True) < 14.3e9  # "57B-A14B"
    dense = ModelConfig.from_preset("7b")
    assert param_count(dense, activated=True) == param_count(dense)
    # Forward FLOPs count the activated weights only.
    assert flops_per_token(a27, 1) == pytest.approx(2 * param_count(a27, embeddings=False, activated=True)
                                                    + 2 * a27.vocab_size * a27.hidden_size, rel=1e-3)


@pytest.mark.parametrize("name", ["tiny-moe", "mini-moe"])
def test_param_count_equals_the_module(name):
    cfg = ModelConfig.from_preset(name, mlp_only_layers=[1])
    with torch.device("meta"):
        model = CausalLM(cfg)
    assert param_count(cfg) == sum(p.numel() for p in model.parameters())
    block = sparse_blocks(model)[0]
    expert = sum(p.numel() for p in block.experts[0].parameters())
    unused = (cfg.num_experts - cfg.num_experts_per_tok) * expert * len(sparse_blocks(model))
    assert param_count(cfg, activated=True) == param_count(cfg) - unused


def test_official_config_json_round_trip():
    raw = {  # Qwen2-57B-A14B's config.json as released
        "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 3584,
        "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 131072,
        "max_window_layers": 28, "model_type": "qwen2_moe", "moe_intermediate_size": 2560, "norm_topk_prob": False,
        "num_attention_heads": 28, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 28,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 20480, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.1", "use_cache": True,
        "use_sliding_window": False, "vocab_size": 151936}
    cfg = ModelConfig.from_hf_dict(raw)
    assert cfg == ModelConfig.from_preset("qwen2-57b-a14b")
    out = cfg.to_hf_dict()
    assert out.pop("mlp_only_layers") == []
    assert {k: v for k, v in raw.items() if k != "transformers_version"} == out
    # A dense config.json stays free of MoE keys.
    assert "num_experts" not in ModelConfig.from_preset("tiny").to_hf_dict()


def test_transformers_reads_our_moe_config(tmp_path):
    from transformers import AutoConfig

    cfg = ModelConfig.from_preset("mini-moe", mlp_only_layers=[0, 3], decoder_sparse_step=2, router_z_loss_coef=1e-3)
    cfg.save(tmp_path)
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "qwen2_moe"
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step", "mlp_only_layers"):
        assert getattr(hf, key) == getattr(cfg, key), key
    assert json.loads((tmp_path / "config.json").read_text())["router_z_loss_coef"] == 1e-3
    assert ModelConfig.from_json(tmp_path) == cfg


def test_missing_moe_keys_take_transformers_defaults():
    from transformers import Qwen2MoeConfig

    raw = {k: v for k, v in PRESETS["tiny"].items()} | {"model_type": "qwen2_moe"}
    cfg = ModelConfig.from_hf_dict(raw)
    hf = Qwen2MoeConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                "norm_topk_prob", "router_aux_loss_coef", "decoder_sparse_step"):
        assert getattr(cfg, key) == getattr(hf, key), key


@pytest.mark.parametrize("change,message", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok must be in 1..num_experts"),
    (dict(moe_intermediate_size=0), "moe_intermediate_size must be positive"),
    (dict(mlp_only_layers=[5]), r"mlp_only_layers \[5\]"),
    (dict(model_type="qwen2"), "needs model_type 'qwen2_moe'"),
])
def test_invalid_moe_configs_are_named(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_preset("tiny-moe", **change)


def test_bf16_block_matches_fp32_where_routing_agrees():
    cfg = ModelConfig.from_preset("tiny-moe", num_experts=16, num_experts_per_tok=4)
    block = SparseMoeBlock(cfg).bfloat16()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(200, cfg.hidden_size).bfloat16()
    with torch.no_grad():
        got = block(x).float()
        picked = route(block.router_logits, 4, False)[1].sort(-1).values
        ref = block.float()(x.float())  # the same (bf16-representable) weights and inputs, computed in fp32
        picked_ref = route(block.router_logits, 4, False)[1].sort(-1).values
    same = (picked == picked_ref).all(-1)
    assert same.float().mean() > 0.9  # a near-tie may flip in bf16; those tokens legitimately differ
    assert (got - ref)[same].abs().max() < 0.02 * ref.abs().max()


def test_greedy_generation_matches_transformers(hf_checkpoints):
    from qwen25.generation import SamplingParams, generate

    hf, path = hf_checkpoints["e8-k2-norm"]
    ours = load_model(path, dtype="fp32")
    prompts = [[5, 17, 33, 2, 90, 41, 7], [250, 3, 77]]  # different lengths: left padding, masked
    got = generate(ours, prompts, SamplingParams(max_new_tokens=8))
    for prompt, tokens in zip(prompts, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()


def test_cli_info_shows_total_and_activated_parameters(capsys):
    from qwen25.cli import main

    assert main(["info", "--preset", "qwen1.5-moe-a2.7b", "--flops", "1e12"]) == 0
    out = capsys.readouterr().out
    assert "14.32B" in out and "activated: 2,689,173,504 (2.69B) per token: top-4 of 60 experts" in out
    assert main(["info", "--preset", "tiny-moe", "--flops", "1e12", "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    cfg = ModelConfig.from_preset("tiny-moe")
    assert info["parameters_activated"] == param_count(cfg, activated=True) < info["parameters"]


def test_training_loop_trains_a_moe_preset(tmp_path):
    from qwen25.train.loop import TokenWindows, TrainConfig, train

    tokens = (torch.arange(6000) * 7) % 64  # a fixed successor rule over 64 ids
    cfg = TrainConfig(out_dir=str(tmp_path), model="tiny-moe", steps=20, batch_size=8, seq_len=32, lr=1e-2,
                      warmup=2, save_every=1000, dtype="fp32", tensorboard=False, peak_flops=1e10)
    final = train(cfg, TokenWindows(tokens, 8, 32, seed=0), progress=False)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert final["loss"] < 0.5 * lines[0]["loss"]
    assert all(0 < m["router_loss"] < 0.01 for m in lines)  # 0.001 x aux, aux between k=2 and E=8
    model = load_model(tmp_path / "final", dtype="fp32")
    assert model.config.model_type == "qwen2_moe" and len(sparse_blocks(model)) == 2


def test_serving_engine_equals_generate(hf_checkpoints):
    from qwen25.generation import SamplingParams, generate
    from qwen25.generation import Engine

    _, path = hf_checkpoints["e6-k3-step2"]
    model = load_model(path, dtype="fp32")
    prompts = [[1, 2, 3, 4], [9, 8, 7, 6, 5, 4, 3], [100]]
    params = SamplingParams(max_new_tokens=6)
    batched = Engine(model, max_batch=2).generate(prompts, params)  # continuous batching over 2 slots
    assert batched == [generate(model, [p], params)[0] for p in prompts]
    assert len({tuple(t) for t in batched}) == 3
