"""Attention helpers: the preallocated KV cache, attention masks, and the SDPA call with GQA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ModelConfig


class KVCache:
    """Keys (after RoPE) and values of `batch_size` sequences (rows), written by position.

    Shape of `k` and `v`: (layers, rows, kv_heads, max_len, head_dim); `lengths` (rows,) counts each row's
    slots. A forward writes through a `CacheWrite`, made in one of two ways:
    - `model(ids, cache=cache)` (= `cache.append(t, valid)`): t more slots on every row, rows sharing one length;
      batched prompts are left-padded, and `valid` (batch, t) marks real tokens (`key_valid`), the rest masked;
    - `cache.at(rows, starts, n)`: the next n tokens of each listed row from its own position `starts[i]` on
      (the generation engine: rows are independent sequences of different lengths).
    Each row also records the length its sequence may reach (`extents`: prompt + max_new_tokens, default
    max_len), from which YaRN with `apply_only_beyond_original` picks its table (see rope.yarn_applies).

    int8=True stores keys and values as int8 with one fp32 scale per token and head (absmax / 127 over head_dim):
    a quarter of fp32's memory, half of bf16's (+ 4 bytes per head_dim values); attention reads them dequantized
    to `dtype`. `blocks`/`put_blocks` move slot ranges (the engine's prefix cache) in either form.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", int8: bool = False):
        shape = (cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, max_len, cfg.head_size)
        self.dtype, self.int8 = dtype, int8
        self.k = torch.zeros(shape, dtype=torch.int8 if int8 else dtype, device=device)
        self.v = torch.zeros(shape, dtype=torch.int8 if int8 else dtype, device=device)
        # per (layer, row, head, slot): the scale of an int8 key / value vector
        self.k_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if int8 else None
        self.v_scale = torch.zeros(shape[:-1], dtype=torch.float32, device=device) if int8 else None
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.extents = [max_len] * batch_size
        self.has_padding = False  # whether any slot written by append is padding (then attention needs a mask)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def length(self) -> int:
        """The longest row's length (every row's, when written by append)."""
        return int(self.lengths.max())

    def nbytes(self) -> int:
        scales = 2 * self.k_scale.numel() * 4 if self.int8 else 0
        return self.k.numel() * self.k.element_size() * 2 + scales

    @property
    def stored(self) -> tuple[torch.Tensor, ...]:
        """Every tensor indexed (layer, row, head, slot, ...): keys and values, and their scales when int8."""
        return (self.k, self.v) + ((self.k_scale, self.v_scale) if self.int8 else ())

    def blocks(self, row: int, span: slice) -> tuple[torch.Tensor, ...]:
        """Copies of slots `span` of one row, every layer (as stored: with their scales when int8)."""
        return tuple(t[:, row, :, span].clone() for t in self.stored)

    def put_blocks(self, row: int, span: slice, blocks: tuple[torch.Tensor, ...]) -> None:
        """Write what `blocks` returned into slots `span` of a row."""
        for t, b in zip(self.stored, blocks):
            t[:, row, :, span] = b

    def append(self, n: int, valid: torch.Tensor | None = None) -> CacheWrite:
        """The write of n more slots on every row (valid: (batch, n) bool, None = all real tokens)."""
        start = self.length
        if start + n > self.max_len:
            raise ValueError(f"KV cache full: {start} + {n} tokens exceed its max_len {self.max_len}")
        if valid is None:
            self.key_valid[:, start:start + n] = True
        else:
            self.key_valid[:, start:start + n] = valid
            self.has_padding = self.has_padding or not bool(valid.all())
        self.lengths.fill_(start + n)
        return CacheWrite(self, slice(None), start, n)

    def at(self, rows: list[int], starts: list[int] | torch.Tensor, n: int) -> CacheWrite:
        """The write of n tokens for each of `rows`, row i from slot starts[i] on. Rows of a batch may be right
        padded to n: the padding's keys land past the row's real tokens, where later writes overwrite them."""
        if len(rows) == 1:
            return CacheWrite(self, slice(rows[0], rows[0] + 1), int(starts[0]), n)
        return CacheWrite(self, rows, torch.as_tensor(starts, device=self.k.device), n)

    def reset(self):
        self.lengths.zero_()
        self.has_padding = False
        self.key_valid.zero_()
        self.extents = [self.max_len] * self.batch_size


class CacheWrite:
    """Where one forward writes its keys/values in a KVCache, what they attend to, and the RoPE extents.

    rows: a slice (one row, or all of them, sharing `start`) or a list of rows with their own starts (tensor).
    The model calls `update(layer, k, v)` in every layer and reads `mask()` (None = plain causal or one new token
    seeing everything before it), `positions` (the token positions written), `extents`, `key_valid`/`has_padding`,
    and `sparse` (the SparsePrefill settings when this forward's attention runs sparse, model/sparse.py).
    """

    def __init__(self, cache: KVCache, rows: slice | list[int], start: int | torch.Tensor, n: int):
        self.cache, self.n = cache, n
        self.extents = cache.extents[rows] if isinstance(rows, slice) else [cache.extents[r] for r in rows]
        device = cache.k.device
        self.shared = isinstance(start, int)  # every written row starts at the same slot
        if self.shared:
            self.rows, self.start, self.end = rows, start, start + n
            self.positions = torch.arange(start, start + n, device=device)[None]
        else:  # several rows, each from its own slot; rows 0..r-1 (decode over slots) read without a copy
            self.index = torch.tensor(rows, device=device)[:, None]
            self.rows = slice(0, len(rows)) if rows == list(range(len(rows))) else self.index[:, 0]
            self.positions = start[:, None] + torch.arange(n, device=device)
            self.start, self.end = 0, int(self.positions.max()) + 1
        padded = self.shared and rows == slice(None) and cache.has_padding
        self.has_padding = padded
        self.key_valid = cache.key_valid if padded else None
        self.sparse = None  # SparsePrefill when this write's attention runs sparse (set by CausalLM.forward)

    def mask(self, device=None) -> torch.Tensor | None:
        """(rows or 1, 1, n, keys) bool, True = attend; None where attention needs none (see Attention.forward)."""
        device = device or self.cache.k.device
        if not self.shared:  # a token sees its row's keys up to its own position
            keys = torch.arange(self.end, device=device)
            return (keys <= self.positions[:, :, None])[:, None]
        if self.has_padding:
            return attention_mask(self.start, self.n, self.end, self.key_valid, device=device)
        if self.start > 0 and self.n > 1:  # new tokens after cached ones: causal over slots
            return attention_mask(self.start, self.n, self.end, device=device)
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (rows, kv_heads, n, head_dim); return the rows' keys/values up to the furthest slot."""
        c = self.cache
        if c.int8:
            return self._update_int8(layer, k, v)
        if self.shared:
            c.k[layer, self.rows, :, self.start:self.end] = k
            c.v[layer, self.rows, :, self.start:self.end] = v
        else:
            c.k[layer, self.index, :, self.positions] = k.transpose(1, 2)
            c.v[layer, self.index, :, self.positions] = v.transpose(1, 2)
        return c.k[layer, self.rows, :, :self.end], c.v[layer, self.rows, :, :self.end]

    def _update_int8(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        c, out = self.cache, []
        for store, scales, x in ((c.k, c.k_scale, k), (c.v, c.v_scale, v)):
            q, scale = quantize_int8(x)
            if self.shared:
                store[layer, self.rows, :, self.start:self.end] = q
                scales[layer, self.rows, :, self.start:self.end] = scale
            else:
                store[layer, self.index, :, self.positions] = q.transpose(1, 2)
                scales[layer, self.index, :, self.positions] = scale.transpose(1, 2)
            held = store[layer, self.rows, :, :self.end]
            out.append((held.to(x.dtype) * scales[layer, self.rows, :, :self.end, None].to(x.dtype)))
        return out[0], out[1]


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per vector of the last dimension: (int8 values, fp32 scales = absmax / 127)."""
    scale = x.float().abs().amax(dim=-1) / 127
    q = torch.where(scale[..., None] > 0, x.float() / scale[..., None].clamp(min=1e-30), 0.0)
    return q.round().clamp(-127, 127).to(torch.int8), scale


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
