"""Weight-only int8: exact against dequantized weights, close to the full-precision model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen25.config import ModelConfig
from qwen25.generation import SamplingParams
from qwen25.model import CausalLM
from qwen25.generation import Engine
from qwen25.serve.quant import Int8Linear, quantize_int8, quantize_per_channel


def test_int8_linear_equals_dequantized_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(96, 200, bias=True)
    q, scales = quantize_per_channel(linear.weight)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scales[:, None] - linear.weight).abs() <= scales[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 5, 96)
    layer = Int8Linear(linear, torch.float32)
    expected = F.linear(x, q.float() * scales[:, None], linear.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-4, rtol=1e-5)


def test_quantized_model_tracks_the_original():
    cfg = ModelConfig.from_preset("tiny", tie_word_embeddings=False)
    model = CausalLM(cfg).eval()
    model.init_weights(seed=1)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ref = model(ids)
        quantize_int8(model, torch.float32)
        assert not any(type(m) is nn.Linear for m in model.modules())
        got = model(ids)
    # int8 rounding error is ~0.4% of each weight; the logits stay close and mostly agree on the argmax
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    out = Engine(model, max_batch=2, max_len=64).generate([[1, 2, 3]], SamplingParams(max_new_tokens=5))
    assert len(out[0]) == 5
