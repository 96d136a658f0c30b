"""Shared fixtures: small random Qwen2 checkpoints written by transformers (the reference implementation)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

# Tests run two xdist workers on two cores: one thread each keeps them from fighting over cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*unknown key.*")


def hf_config(**overrides):
    """A transformers Qwen2Config with small defaults."""
    from transformers import Qwen2Config

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=512,
                rms_norm_eps=1e-6)
    base.update(overrides)
    return Qwen2Config(**base)


def random_hf_model(seed: int = 0, **overrides):
    """A transformers Qwen2ForCausalLM with every weight random (biases and norms too), in eval mode."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(hf_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path):
    """Factory: save a random transformers model to a directory; returns (hf_model, path)."""
    def make(seed: int = 0, max_shard_size=None, **overrides):
        model = random_hf_model(seed, **overrides)
        path = tmp_path / f"hf-{seed}-{len(list(tmp_path.iterdir()))}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        return model, path
    return make
