"""Attention helpers: the preallocated KV cache, attention masks, and the SDPA call with GQA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig


class KVCache:
    """Keys (after RoPE) and values for every layer in preallocated tensors.

    Shape of `k` and `v`: (layers, batch, kv_heads, max_len, head_dim). All rows share one write position
    `length`: batched prompts are left-padded and padding slots are masked by `key_valid`, a (batch, max_len)
    bool tensor that is True where a slot holds a real token. The same object serves generation, serving
    and RL rollouts.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_size)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0
        self.has_padding = False  # whether any claimed slot is padding (then attention needs a mask)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def reserve(self, n: int, valid: torch.Tensor | None = None) -> int:
        """Claim the next n slots (valid: (batch, n) bool, None = all real tokens); returns their start."""
        start = self.length
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens exceed its max_len {self.max_len}")
        if valid is None:
            self.key_valid[:, start:start + n] = True
        else:
            self.key_valid[:, start:start + n] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        self.length = start + n
        return start

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (batch, kv_heads, n, head_dim) at slots [start, start+n); return the layer's keys/values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self):
        self.length = 0
        self.has_padding = False
        self.key_valid.zero_()


def attention_mask(q_start: int, q_len: int, k_len: int, key_valid: torch.Tensor | None = None,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask (batch or 1, 1, q_len, k_len), True where query slot q_start+i may attend to key slot j.

    Causal over slots (j <= q_start + i), restricted to valid keys. Every query always sees itself, so a
    padding query never has an empty row (its output is unused, but must not be NaN).
    """
    q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    causal = k_pos <= q_pos
    if key_valid is None:
        return causal[None, None]
    mask = causal[None] & key_valid[:, None, :k_len]
    mask |= k_pos == q_pos
    return mask[:, None]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
         dropout: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention with GQA: q (B, Hq, T, d), k/v (B, Hkv, S, d) -> (B, Hq, T, d)."""
    # Query head h uses kv head h // (Hq / Hkv); SDPA's GQA path avoids materialising repeated keys
    # (2x faster than repeat_interleave for a decode step at the 0.5B shape on CPU).
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                          dropout_p=dropout, enable_gqa=q.shape[1] != k.shape[1])
