"""Dual Chunk Attention (DCA; An et al. 2024, used by Qwen2.5-1M): training-free length extrapolation.

Config `dual_chunk_attention_config = {chunk_size: s, local_size: w, original_max_position_embeddings: L}`,
c = s - w. Keys are rotated at position j mod c (so they are cached rotated once). For a query at
position i, with chunks numbered i // c:

- intra-chunk (keys of the same chunk, causal):      query position i mod c
- successive-chunk (keys of the previous chunk):     query position min(i mod c + c, s)
- inter-chunk (keys of every earlier chunk):         query position min(2c - 1, s)

Every relative distance stays below s, a length seen in training, yet every key stays visible: DCA is
dense (same FLOPs as full attention). The three partial attentions merge exactly by log-sum-exp. Queries
and keys are processed in tiles of at most `tile` x `tile` scores, so memory grows with the tile (at most
the chunk), not with the square of the sequence. When the whole sequence fits in one chunk DCA equals
plain causal attention.

Logit scaling (vLLM's option, used when L is set): logits x m^2, m = max(1, 0.1 ln(n / L) + 1). vLLM takes n
as the prompt length in prefill and the current length in decoding (scaling each cached key by the m of
the step that wrote it). We take n = i + 1, the number of tokens query i sees, for every query: the same
value for the last prompt token, and a rule under which prefill + cached decoding equals a full forward.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, ModelConfig, dtype_bytes, flops_per_token
from .attention import CacheWrite, KVCache
from .rope import apply_rope, rope_cos_sin

DEFAULT_TILE = 1024  # largest query/key tile (see dca_tile_size)


@dataclass(frozen=True)
class DualChunkSettings:
    """The parsed `dual_chunk_attention_config`: chunk size s, local size w, original length L (0 = no scaling)."""

    chunk_size: int
    local_size: int
    original_max_position_embeddings: int = 0

    @property
    def chunk_len(self) -> int:
        """c = s - w: the chunk length that positions are taken modulo."""
        return self.chunk_size - self.local_size

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> DualChunkSettings | None:
        """Settings of a config, or None when it has no dual_chunk_attention_config."""
        raw = cfg.dual_chunk_attention_config
        if not raw:
            return None
        try:
            s, w = int(raw["chunk_size"]), int(raw["local_size"])
        except KeyError as e:
            raise ConfigError(f"dual_chunk_attention_config needs {e.args[0]!r}: {raw}") from e
        if not 0 <= w < s:
            raise ConfigError(f"dual_chunk_attention_config: need 0 <= local_size ({w}) < chunk_size ({s})")
        return cls(s, w, int(raw.get("original_max_position_embeddings") or 0))


def dual_chunk_positions(positions: torch.Tensor, chunk_size: int, local_size: int):
    """RoPE positions of DCA for token positions (any shape): (intra_q, successive_q, inter_q, key).

    intra_q = i mod c, successive_q = min(i mod c + c, s), inter_q = min(2c - 1, s) everywhere, key = j mod c.
    """
    c = chunk_size - local_size
    intra = key = positions % c
    successive = (intra + c).clamp(max=chunk_size)
    inter = torch.full_like(positions, min(2 * c - 1, chunk_size))
    return intra, successive, inter, key


def dual_chunk_logit_scale(positions: torch.Tensor, original_max_position: int) -> torch.Tensor:
    """m^2 per query, m = max(1, 0.1 ln((i + 1) / L) + 1); all ones when L is 0 (no scaling)."""
    if not original_max_position:
        return torch.ones(positions.shape, dtype=torch.float32, device=positions.device)
    m = (0.1 * torch.log((positions.float() + 1) / original_max_position) + 1).clamp(min=1)
    return m * m


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact softmax attention with GQA, returning (out (B, Hq, T, d), log-sum-exp (B, Hq, T)), both fp32.

    q (B, Hq, T, d), k/v (B, Hkv, S, d); mask (B or 1, 1, T, S) bool, True = visible. A row with no
    visible key gets output 0 and lse -inf, so that it drops out of a merge.
    """
    b, hq, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv  # query head h reads kv head h // g: stack each group's queries as rows of one matmul
    qf = q.float().reshape(b, hkv, g * t, d)  # (B, Hkv, g*T, d)
    scores = (qf @ k.float().transpose(-1, -2) * scale).view(b, hkv, g, t, s)  # (B, Hkv, g, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - finite[..., None]).view(b, hkv, g * t, s)  # (B, Hkv, g*T, S)
    return (probs @ v.float()).view(b, hq, t, d), lse.view(b, hq, t)  # (B, Hq, T, d), (B, Hq, T)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor):
    """Merge two partial attentions over disjoint key sets exactly: weights softmax(lse_a, lse_b)."""
    lse = torch.logaddexp(lse_a, lse_b)
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a, w_b = torch.exp(lse_a - finite)[..., None], torch.exp(lse_b - finite)[..., None]
    return out_a * w_a + out_b * w_b, lse


def dca_tile_size(chunk_len: int, max_tile: int = DEFAULT_TILE) -> int:
    """The tile side: the chunk length when it fits, else its largest divisor in (max_tile / 2, max_tile] (tiles
    then never straddle a chunk boundary, so each holds one part), else max_tile."""
    if chunk_len <= max_tile:
        return chunk_len
    return next((n for n in range(max_tile, max_tile // 2, -1) if chunk_len % n == 0), max_tile)


# torch's CPU flash-attention kernel also returns the log-sum-exp that an exact merge needs (private aten op:
# absent elsewhere or in other versions, in which case the tiled path serves).
_FLASH_WITH_LSE = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool):
    """(out (B, Hq, T, d) fp32, lse (B, Hq, T) fp32) by the flash kernel; causal needs T == S (top-left)."""
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if causal:  # rows of one head must stay one causal block: give every query head its kv head
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
        out, lse = _FLASH_WITH_LSE(q, k, v, 0.0, True, scale=scale)
        return out.float(), lse.float()
    out, lse = _FLASH_WITH_LSE(q.reshape(b, hkv, g * t, d), k, v, 0.0, False, scale=scale)
    return out.float().reshape(b, hq, t, d), lse.float().reshape(b, hq, t)


def _contiguous(q_positions: torch.Tensor, k_positions: torch.Tensor, t: int, s: int) -> bool:
    """Whether key j sits at position j and the queries are the last t of the s slots (no padding)."""
    slots = torch.arange(s, device=k_positions.device)
    return bool((k_positions == slots).all()) and bool((q_positions == slots[s - t:]).all())


def _dca_by_chunks(q_intra, q_successive, q_inter, k, v, chunk_len: int, scale: float) -> torch.Tensor:
    """DCA when slots are positions: per query chunk, at most four flash calls (no score matrix is stored)."""
    b, hq, t, d = q_intra.shape
    s, c = k.shape[2], chunk_len
    first = s - t  # slot of the first query
    out = torch.empty(b, hq, t, d, dtype=torch.float32, device=q_intra.device)
    for start in range(first // c * c, s, c):
        qa, qb = max(first, start), min(start + c, s)  # query slots inside this chunk
        rows = slice(qa - first, qb - first)
        parts = [_flash_with_lse(q_intra[:, :, rows], k[:, :, qa:qb], v[:, :, qa:qb], scale, causal=True)]
        if qa > start:  # earlier keys of the same chunk (decoding): all visible
            parts.append(_flash_with_lse(q_intra[:, :, rows], k[:, :, start:qa], v[:, :, start:qa], scale, False))
        if start >= c:
            parts.append(_flash_with_lse(q_successive[:, :, rows], k[:, :, start - c:start],
                                         v[:, :, start - c:start], scale, False))
        if start >= 2 * c:
            parts.append(_flash_with_lse(q_inter[:, :, rows], k[:, :, :start - c], v[:, :, :start - c], scale,
                                         False))
        merged = parts[0]
        for part in parts[1:]:
            merged = merge_attention(*merged, *part)
        out[:, :, rows] = merged[0]
    return out.to(q_intra.dtype)


def dca_attention(q_intra: torch.Tensor, q_successive: torch.Tensor, q_inter: torch.Tensor, k: torch.Tensor,
                  v: torch.Tensor, q_positions: torch.Tensor, k_positions: torch.Tensor, chunk_len: int,
                  mask: torch.Tensor | None = None, tile: int | None = None) -> torch.Tensor:
    """Dual chunk attention: (B, Hq, T, d) in the dtype of the queries.

    q_*: (B, Hq, T, d) queries rotated at their intra/successive/inter positions; k (B, Hkv, S, d) keys
    rotated at j mod c, v (B, Hkv, S, d). q_positions (B, T) and k_positions (B or 1, S) are token
    positions: they decide the chunks (i // c). mask (B or 1, 1, T, S) bool marks visible keys; None means
    causal over slots, the queries being the last T of the S slots (prefill, or decoding after the cache).
    Without a mask or padding, on CPU, each chunk's parts run in torch's flash kernel; otherwise (or when
    `tile` is given) the parts are computed on tiles of at most tile x tile scores.
    """
    b, hq, t, d = q_intra.shape
    s = k.shape[2]
    if (tile is None and mask is None and _FLASH_WITH_LSE is not None and q_intra.device.type == "cpu"
            and _contiguous(q_positions, k_positions, t, s)):
        return _dca_by_chunks(q_intra, q_successive, q_inter, k, v, chunk_len, d ** -0.5)
    tile = tile or dca_tile_size(chunk_len)
    scale = d ** -0.5
    q_chunk, k_chunk = q_positions // chunk_len, k_positions // chunk_len
    out = torch.zeros(b, hq, t, d, dtype=torch.float32, device=q_intra.device)
    for q0 in range(0, t, tile):
        q1 = min(q0 + tile, t)
        merged = None
        k_end = s if mask is not None else s - t + q1  # causal: no key after the tile's last query
        for k0 in range(0, k_end, tile):
            k1 = min(k0 + tile, k_end)
            if mask is None:
                slots_q = torch.arange(s - t + q0, s - t + q1, device=k.device)
                visible = (torch.arange(k0, k1, device=k.device)[None, :] <= slots_q[:, None])[None]
            else:
                visible = mask[:, 0, q0:q1, k0:k1]
            cq, ck = q_chunk[:, q0:q1, None], k_chunk[:, None, k0:k1]
            for q, part in ((q_intra, ck == cq), (q_successive, ck == cq - 1), (q_inter, ck < cq - 1)):
                part = part & visible
                if not bool(part.any()):
                    continue
                o, lse = attention_with_lse(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], scale, part[:, None])
                merged = (o, lse) if merged is None else merge_attention(*merged, o, lse)
        if merged is not None:
            out[:, :, q0:q1] = merged[0]
    return out.to(q_intra.dtype)


@dataclass
class DualChunkRope:
    """What a layer's attention needs for DCA: the key table, three query tables, and the token positions.

    The query tables carry the logit scale m^2 (rotation is linear, so scaling cos and sin scales q).
    Key positions are those of the KV slots: `positions` without a cache; with a cache, the slot index,
    or the count of real tokens before a slot when the cache holds left padding (the convention of
    `KVCache.append` with `valid`).
    """

    settings: DualChunkSettings
    key: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    positions: torch.Tensor
    cached: bool
    key_valid: torch.Tensor | None = None

    def where(self, rows: torch.Tensor, other: "DualChunkRope") -> "DualChunkRope":
        """Per row, these tables (rows True: (B, 1, 1) bool) or other's (the same positions, another RoPE table)."""
        pick = lambda a, b: (torch.where(rows, a[0], b[0]), torch.where(rows, a[1], b[1]))  # noqa: E731
        return replace(self, key=pick(self.key, other.key),
                                   queries=tuple(pick(a, b) for a, b in zip(self.queries, other.queries)))

    def key_positions(self, num_keys: int) -> torch.Tensor:
        """Token positions (B or 1, S) of the first `num_keys` key slots."""
        if not self.cached:
            return self.positions
        if self.key_valid is not None:
            return (self.key_valid[:, :num_keys].long().cumsum(-1) - 1).clamp(min=0)
        return torch.arange(num_keys, device=self.positions.device)[None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """DCA of un-rotated queries q against cached keys k (rotated with `self.key`) and values v."""
        rotated = [apply_rope(q, cos, sin) for cos, sin in self.queries]
        return dca_attention(*rotated, k, v, self.positions, self.key_positions(k.shape[2]),
                             self.settings.chunk_len, mask)


def dual_chunk_rope(settings: DualChunkSettings, inv_freq: torch.Tensor, attention_factor: float,
                    positions: torch.Tensor, cache: CacheWrite | KVCache | None = None) -> DualChunkRope:
    """The DCA tables for token positions (B, T) with a RoPE table (inv_freq, attention_factor)."""
    intra, successive, inter, key = dual_chunk_positions(positions, settings.chunk_size, settings.local_size)
    scale = dual_chunk_logit_scale(positions, settings.original_max_position_embeddings)[..., None]
    queries = []
    for pos in (intra, successive, inter):
        cos, sin = rope_cos_sin(inv_freq, pos, attention_factor)
        queries.append((cos * scale, sin * scale))
    key_valid = cache.key_valid if cache is not None and cache.has_padding else None  # left padding in the cache
    return DualChunkRope(settings, rope_cos_sin(inv_freq, key, attention_factor), tuple(queries), positions,
                         cached=cache is not None, key_valid=key_valid)


def dual_chunk_needed(settings: DualChunkSettings, positions: torch.Tensor) -> bool:
    """Whether DCA differs from plain attention here: some position past the first chunk, or a logit scale."""
    last = int(positions.max()) if positions.numel() else 0
    beyond_scale = bool(settings.original_max_position_embeddings) and last + 1 > settings.original_max_position_embeddings
    return last >= settings.chunk_len or beyond_scale


# ---- long-context cost estimates (for `qwen25 info`) ----------------------------------------------------------
def long_context_estimate(cfg: ModelConfig, length: int, flops_per_second: float, dtype: str = "bfloat16",
                          tile: int | None = None) -> dict:
    """Prefill cost at `length` tokens: FLOPs, time at a FLOP/s rate, and attention memory, full vs DCA.

    Attention FLOPs are the same with DCA (every key stays visible). What changes is the largest transient:
    a materialised (eager) attention matrix holds heads x length^2 fp32 scores per layer, DCA's tiles
    heads x tile^2 (tile <= min(chunk length, 1024)). Flash-style kernels (SDPA without a mask) avoid the
    full matrix too, but cannot extrapolate past the trained length.
    """
    total = flops_per_token(cfg, length) * length
    d, h, layers = cfg.head_size, cfg.num_attention_heads, cfg.num_hidden_layers
    attention = layers * h * 4 * d * length * length / 2  # causal: length^2 / 2 (query, key) pairs
    settings = DualChunkSettings.from_config(cfg)
    if tile is None:
        tile = dca_tile_size(settings.chunk_len) if settings else DEFAULT_TILE
    kv_cache = 2 * layers * cfg.num_key_value_heads * d * dtype_bytes(dtype) * length
    return {
        "length": length, "prefill_flops": total, "attention_flops": attention,
        "prefill_seconds": total / flops_per_second, "flops_per_second": flops_per_second,
        "scores_bytes_full": h * length * length * 4, "scores_bytes_dca": h * min(tile, length) ** 2 * 4,
        "kv_cache_bytes": kv_cache, "dca_tile": tile,
        "dca_chunk_len": settings.chunk_len if settings else None,
    }
