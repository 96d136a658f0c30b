"""The Qwen2.5 decoder in plain PyTorch.

Pre-norm blocks: h = x + attn(rmsnorm(x)); out = h + mlp(rmsnorm(h)); a final RMSNorm and the lm_head.
Attention is grouped-query with biases on q/k/v, rotate-half RoPE and `F.scaled_dot_product_attention`;
the MLP is SwiGLU, or in qwen2_moe sparse layers a mixture of SwiGLU experts (moe.py). Module names equal
the HF checkpoint names (`model.layers.3.self_attn.q_proj` ...), so a state dict is a checkpoint.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..config import ModelConfig
from .attention import CacheWrite, KVCache, attention_mask, sdpa
from .dca import DualChunkRope, DualChunkSettings, dual_chunk_needed, dual_chunk_rope
from .layers import MLP, RMSNorm, concat_linears
from .moe import SparseMoeBlock
from .rope import apply_rope, rope_cos_sin, rope_parameters, yarn_applies, yarn_depends_on_length
from .sparse import SparsePrefill


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        d, hq, hkv = cfg.head_size, cfg.num_attention_heads, cfg.num_key_value_heads
        self.layer, self.head_dim, self.n_heads, self.n_kv_heads = layer, d, hq, hkv
        self.dropout = cfg.attention_dropout
        self.q_proj = nn.Linear(cfg.hidden_size, hq * d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, hkv * d, bias=True)
        self.o_proj = nn.Linear(hq * d, cfg.hidden_size, bias=False)
        self.qkv_proj = None
        self.apply_rope = apply_rope  # serving may swap in a compiled kernel (serve/cpu_kernels.py)

    def fuse_projections(self):
        """Replace q/k/v_proj by one qkv_proj (inference: one matmul reads all three; names leave the HF layout)."""
        if self.qkv_proj is None:
            self.qkv_proj = concat_linears([self.q_proj, self.k_proj, self.v_proj])
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, rope, mask, cache: CacheWrite | None):
        """rope: (cos, sin) tables, or DualChunkRope past the first chunk (keys at j mod c, queries rotated thrice)."""
        b, t, _ = x.shape  # batch, new tokens, hidden (C)
        if self.qkv_proj is not None:  # fused for inference (fuse_projections)
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim,
                                              self.n_kv_heads * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # (B, T, Hq*d), (B, T, Hkv*d) x 2
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, Hq, T, d)
        k = k.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, d)
        dual_chunk = isinstance(rope, DualChunkRope)
        cos, sin = rope.key if dual_chunk else rope
        k = self.apply_rope(k, cos, sin)  # keys are cached after RoPE
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, S, d): every key so far, S >= T
        if cache is not None and cache.sparse is not None:  # a long prefill: vertical-slash sparse attention
            qs = [apply_rope(q, c, s) for c, s in rope.queries] if dual_chunk else [self.apply_rope(q, cos, sin)]
            keys = rope.key_positions(k.shape[2])[0] if dual_chunk else torch.arange(k.shape[2], device=k.device)
            out = cache.sparse.attend(qs, k, v, cache.positions[0], keys,
                                      rope.settings.chunk_len if dual_chunk else None)
        elif dual_chunk:
            out = rope.attend(q, k, v, mask)
        else:
            # Without a mask: plain causal attention when queries and keys coincide, no mask at all for one new
            # token against the cache (it sees every earlier slot). CausalLM.forward builds the mask otherwise.
            q = self.apply_rope(q, cos, sin)
            out = sdpa(q, k, v, mask, mask is None and t > 1, self.dropout if self.training else 0.0)  # (B, Hq, T, d)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # (B, T, Hq*d) -> (B, T, C)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_sparse_layer(layer):  # qwen2_moe: a mixture of experts (moe.py) in place of the MLP
            self.mlp = SparseMoeBlock(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, mask, cache):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Decoder(nn.Module):
    """Embedding, the stack of decoder layers and the final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


# What CausalLM.rope_settings may change: how positions are encoded, not the weights' meaning.
ROPE_SETTINGS = ("rope_theta", "rope_scaling", "dual_chunk_attention_config")


class CausalLM(nn.Module):
    """A Qwen2.5 dense language model: token ids in, next-token logits out."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()
        inv_freq, self.attention_factor = rope_parameters(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The unscaled table, for short sequences when rope_scaling has apply_only_beyond_original.
        self.register_buffer("inv_freq_unscaled", rope_parameters(cfg, scaled=False)[0], persistent=False)
        self.dual_chunk = DualChunkSettings.from_config(cfg)
        self.sparse_prefill: SparsePrefill | None = None  # inference setting: sparse attention for long prefills

    def tie_weights(self):
        """Share lm_head.weight with the embedding when the config ties them."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_rope(self):
        """Recompute the RoPE inverse frequencies (after loading onto a device, or a config change)."""
        device = self.model.embed_tokens.weight.device
        inv_freq, self.attention_factor = rope_parameters(self.config)
        self.inv_freq = inv_freq.to(device)
        self.inv_freq_unscaled = rope_parameters(self.config, scaled=False)[0].to(device)
        self.dual_chunk = DualChunkSettings.from_config(self.config)

    @contextlib.contextmanager
    def rope_settings(self, **changes):
        """The same weights under other inference-time position settings (`rope_theta`, YaRN's `rope_scaling`, DCA's
        `dual_chunk_attention_config`) inside the `with` block; the model's own come back on exit. The one way to
        apply them to a loaded model (the passkey evaluations of `qwen25 eval` and the recipe use it)."""
        unknown = sorted(set(changes) - set(ROPE_SETTINGS))
        if unknown:
            raise ValueError(f"not an inference-time position setting: {', '.join(unknown)} "
                             f"(these are: {', '.join(ROPE_SETTINGS)})")
        own = self.config
        self.config = own.replace(**changes)
        try:
            self.reset_rope()
            yield self
        finally:
            self.config = own
            self.reset_rope()

    def rotary(self, position_ids: torch.Tensor, cache: CacheWrite | None = None):
        """What every layer rotates with: (cos, sin), or DualChunkRope when DCA differs from plain attention.

        The RoPE table is chosen once per sequence (see rope.yarn_applies), from the length it may reach: the
        cache write's extent of each row, or the positions given when there is no cache. Rows of one batch that
        differ get each its own table.
        """
        inv_freq, factor = self.inv_freq, self.attention_factor
        scaled = None
        if yarn_depends_on_length(self.config):
            extents = [int(position_ids.max()) + 1] if cache is None else cache.extents
            scaled = [yarn_applies(self.config, e) for e in extents]
            if not any(scaled):
                inv_freq, factor = self.inv_freq_unscaled, 1.0
            scaled = None if all(scaled) or not any(scaled) else scaled
        if scaled is not None:
            pick = torch.tensor(scaled, device=position_ids.device)[:, None, None]  # (rows, 1, 1)
        if self.dual_chunk is not None and dual_chunk_needed(self.dual_chunk, position_ids):
            if scaled is None:
                return dual_chunk_rope(self.dual_chunk, inv_freq, factor, position_ids, cache)
            on = dual_chunk_rope(self.dual_chunk, self.inv_freq, self.attention_factor, position_ids, cache)
            return on.where(pick, dual_chunk_rope(self.dual_chunk, self.inv_freq_unscaled, 1.0, position_ids, cache))
        if scaled is None:
            return rope_cos_sin(inv_freq, position_ids, factor)
        on = rope_cos_sin(self.inv_freq, position_ids, self.attention_factor)
        off = rope_cos_sin(self.inv_freq_unscaled, position_ids, 1.0)
        return torch.where(pick, on[0], off[0]), torch.where(pick, on[1], off[1])

    def fuse_projections(self) -> "CausalLM":
        """For inference: q/k/v and gate/up projections become one matmul each (as vLLM does). Logits are
        unchanged; the state dict's names leave the HF layout, so fuse a copy that is not saved or trained."""
        for module in self.modules():
            if isinstance(module, (Attention, MLP)):
                module.fuse_projections()
        return self

    def init_weights(self, seed: int | None = None):
        """Random initialisation as in HF: normal(0, initializer_range) matrices, zero biases, unit norms."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                w = torch.randn(module.weight.shape, generator=gen) * std
                module.weight.data.copy_(w)
                if getattr(module, "bias", None) is not None:
                    module.bias.data.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.data.fill_(1.0)
        self.tie_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | CacheWrite | None = None,
        valid: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
    ) -> torch.Tensor:
        """Logits (batch, seq, vocab) for input_ids (batch, seq).

        position_ids: (batch, seq); default consecutive from the cache length (those of the write for `cache.at`).
        cache: a KVCache (the new keys/values are appended on every row: `cache.append`), or a CacheWrite that
            says where they go (`cache.at(rows, starts, n)`).
        valid: (batch, seq) bool, False at padding tokens (left padding of batched prompts); padding is
            never attended to, now or by later tokens through the cache.
        mask: an explicit boolean attention mask (batch or 1, 1, seq, keys), True = attend; overrides the
            causal/padding mask (e.g. document masks for packed training sequences).
        last_only: logits of the last position only. return_hidden: final normed hidden states instead.
        """
        b, t = input_ids.shape
        write = cache.append(t, valid) if isinstance(cache, KVCache) else cache
        write_mask = None
        if write is not None:
            sparse = self.sparse_prefill
            if (sparse is not None and mask is None and position_ids is None and write.shared
                    and not write.has_padding and sparse.applies(b, t, write.end)):
                write.sparse = sparse  # a long prefill of one row: sparse attention (no mask needed)
            elif mask is None:
                mask = write_mask = write.mask(input_ids.device)
            if position_ids is None:
                position_ids = write.positions.expand(b, t)
        elif valid is not None and mask is None and not bool(valid.all()):
            mask = attention_mask(0, t, t, valid, device=input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
        rope = self.rotary(position_ids, write)
        if (isinstance(rope, DualChunkRope) and mask is not None and write is not None and write.sparse is None
                and write.shared and not write.has_padding and mask is write_mask):
            mask = None  # DCA's own "causal over slots" (queries the last of the keys): its flash path, no tiles
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, rope, mask, write)  # (B, T, C)
        x = self.model.norm(x)
        if last_only:
            x = x[:, -1:]  # (B, 1, C)
        return x if return_hidden else self.lm_head(x)  # (B, T or 1, vocab)
