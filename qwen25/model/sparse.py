"""Sparse attention for long prefills (Qwen2.5-1M's MInference-style vertical-slash pattern, issue 33).

At long lengths most of a head's attention falls on a few key columns (vertical lines: the first tokens, a
retrieved passage, delimiters) and a few diagonals (slash lines: the local window, periodic offsets). For a
prefill chunk whose keys reach `min_length`, each KV head (the query heads that share it together):

1. probe: the chunk's last `probe` queries attend to every key, densely. Their probabilities, summed over the
   probe's rows and the group's heads, give each key column's mass and, per block distance (query block minus
   key block, in blocks of `block` tokens), each slash band's mass.
2. pattern: band 0 (a query's own block, causal) always; then the bands and columns holding the most mass per key
   they cost (a band costs `block` keys a query, a column one), until they hold `mass` of the probe's attention or
   cost `max_keys` keys a query.
3. attention: every block of `block` queries attends exactly (a softmax over the kept keys only) to the key blocks
   at the kept distances and to the kept columns before it: one gather and two batched matmuls per group of query
   blocks, instead of every earlier key.

With DCA (dca.py) each (query, key) score uses the query rotation of the pair's chunk relation (intra, successive,
inter), so the two combine. The pattern is searched per KV head rather than per query head: one gather of keys
serves the group's query heads (7 for the 0.5B shape), at the cost of a budget shared among them.
`SparsePrefill.keep_all()` keeps every key (equal to dense attention, for tests); `measure=True` also computes
the dense softmax normaliser, so `stats` holds the exact share of attention mass the pattern kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .dca import _FLASH_WITH_LSE, merge_attention

SCORE_BYTES = 64 * 2**20  # the largest score tensor one batch of query blocks may hold


@dataclass
class SparsePrefill:
    """Settings of sparse prefill attention, and running statistics of what it kept."""

    min_length: int = 8192  # sparse when a forward's keys reach this many (shorter prefills stay dense)
    block: int = 64  # query / key block size
    probe: int = 64  # last queries of the chunk that estimate the pattern
    mass: float = 0.95  # share of the probe's attention mass to keep (>= 1: every band, i.e. dense)
    max_keys: int = 2048  # keys a query may attend to, at most (bands + columns), per KV head
    min_queries: int = 64  # chunks of fewer queries stay dense (their attention is a cheap read of the cache)
    measure: bool = False  # also compute the dense normaliser: the exact attention mass kept, in stats
    stats: dict = field(default_factory=lambda: {"forwards": 0, "heads": 0, "probe_mass": 0.0, "kept_keys": 0.0,
                                                 "causal_keys": 0.0, "queries": 0, "mass": 0.0})

    def __post_init__(self):
        for name in ("min_length", "block", "probe", "max_keys", "min_queries"):
            if getattr(self, name) < 1:
                raise ValueError(f"sparse prefill: {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.mass:
            raise ValueError(f"sparse prefill: mass must be > 0, got {self.mass}")
        if self.max_keys < self.block:
            raise ValueError(f"sparse prefill: max_keys ({self.max_keys}) must hold the local block ({self.block})")

    @classmethod
    def keep_all(cls, **kw) -> SparsePrefill:
        """A pattern that keeps every key: the sparse path computing dense attention."""
        return cls(**{"min_length": 1, "mass": 1.0, "max_keys": 2**62, "min_queries": 1, **kw})

    @classmethod
    def from_flags(cls, args) -> SparsePrefill | None:
        """The settings `--sparse-prefill [MIN_LENGTH] --sparse-max-keys N` ask for (utils.add_common_flags), or None."""
        if getattr(args, "sparse_prefill", None) is None:
            return None
        return cls(min_length=args.sparse_prefill, max_keys=args.sparse_max_keys)

    def applies(self, rows: int, queries: int, keys: int) -> bool:
        """Whether a forward of `queries` new tokens on one row, reaching `keys` keys, runs sparse."""
        return rows == 1 and queries >= self.min_queries and keys >= self.min_length

    def summary(self) -> dict:
        """Since the last reset: sparse attention calls (one per layer and chunk), the share of each query's causal keys
        kept, the probe's kept mass (mean over patterns) and, when measuring, the dense attention mass kept (mean over
        query rows and heads)."""
        s = self.stats
        heads, queries = max(s["heads"], 1), max(s["queries"], 1)
        out = {"forwards": s["forwards"], "kept_key_share": s["kept_keys"] / max(s["causal_keys"], 1),
               "probe_mass": s["probe_mass"] / heads}
        if self.measure:
            out["attention_mass"] = s["mass"] / queries
        return out

    def reset_stats(self) -> None:
        for key in self.stats:
            self.stats[key] = 0 if isinstance(self.stats[key], int) else 0.0

    # ---- the attention ------------------------------------------------------------------------------------------
    def attend(self, qs: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
               k_pos: torch.Tensor, chunk_len: int | None = None) -> torch.Tensor:
        """Sparse attention of one row: qs = [q] (rotated queries (1, Hq, T, d)) or DCA's [intra, successive, inter];
        k, v (1, Hkv, S, d) keys (rotated) and values; q_pos (T,) and k_pos (S,) token positions, queries causal
        over keys (a key is visible when its position is at most the query's). chunk_len: DCA's c (None: plain).
        Returns (1, Hq, T, d) in the queries' dtype."""
        _, hq, t, d = qs[0].shape
        hkv = k.shape[1]
        g = hq // hkv
        out = torch.empty(hq, t, d, dtype=torch.float32, device=k.device)
        self.stats["forwards"] += 1
        for h in range(hkv):
            heads = slice(h * g, (h + 1) * g)
            group = [q[0, heads].float() * d ** -0.5 for q in qs]  # (g, T, d) each, scaled
            kh, vh = k[0, h].float(), v[0, h].float()  # (S, d)
            bands, columns = self.pattern(group, kh, q_pos, k_pos, chunk_len)
            out[heads] = self._blocks(group, kh, vh, q_pos, k_pos, chunk_len, bands, columns)
        return out[None].to(qs[0].dtype)

    def pattern(self, qs: list[torch.Tensor], k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                chunk_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The kept block distances (sorted, 0 first) and key columns of one KV head, from the probe."""
        b, g = self.block, qs[0].shape[0]
        max_band = int(q_pos.max()) // b  # the farthest distance a query block of this chunk has
        if self.mass >= 1 and (max_band + 1) * b <= self.max_keys:
            return torch.arange(max_band + 1, device=k.device), torch.empty(0, dtype=torch.long, device=k.device)
        m = min(self.probe, qs[0].shape[1])
        rows = [q[:, -m:] for q in qs]
        scores = _scores([r.reshape(1, g * m, -1) for r in rows], k[None], q_pos[None, -m:], k_pos[None], chunk_len,
                         g)[0]  # (g, m, S)
        tail = int(torch.searchsorted(k_pos, q_pos[-m:][:1], right=True))  # keys every probe row sees end here
        scores[..., tail:].masked_fill_(k_pos[None, None, tail:] > q_pos[-m:, None][None], float("-inf"))
        probs = torch.softmax(scores, dim=-1).sum(0)  # (m, S): the group's heads summed
        total = g * m
        # mass per (probe row, key block) -> per block distance (key slots are positions: k_pos[j] = j)
        s, full = k.shape[0], k.shape[0] // b
        per_block = probs[:, :full * b].view(m, full, b).sum(-1)
        if s > full * b:
            per_block = torch.cat([per_block, probs[:, full * b:].sum(-1, keepdim=True)], dim=1)  # (m, key blocks)
        row_block = q_pos[-m:] // b
        dist = row_block[:, None] - torch.arange(per_block.shape[1], device=k.device)[None]  # (m, key blocks)
        band_mass = torch.zeros(max_band + 1, device=k.device).index_add_(
            0, dist.clamp(0, max_band).flatten(), (per_block * (dist >= 0)).flatten())
        # column mass outside band 0 (always kept): each probe row's own block lies in the last few blocks
        column_mass = probs.sum(0)  # (S,)
        own_start = int(row_block.min()) * b
        own = row_block[:, None] == (k_pos[own_start:] // b)[None]
        column_mass[own_start:] -= (probs[:, own_start:] * own).sum(0)
        # candidates by mass per key: bands 1.. (cost b) and the heaviest columns (cost 1)
        budget = self.max_keys - b
        top = torch.topk(column_mass, min(budget, s))
        cand_mass = torch.cat([band_mass[1:], top.values])
        cand_cost = torch.cat([torch.full((max_band,), float(b), device=k.device),
                               torch.ones(len(top.values), device=k.device)])
        order = torch.argsort(cand_mass / cand_cost, descending=True)
        affordable = int((cand_cost[order].cumsum(0) <= budget).sum())
        estimate = cand_mass[order].cumsum(0)  # counts a column inside a kept band twice: checked exactly below
        need = self.mass * total
        taken = int(torch.searchsorted(estimate, need - float(band_mass[0]))) + 1
        while True:  # take more while the exact kept mass falls short and the budget allows
            taken = min(taken, affordable)
            bands, columns, kept = self._kept(order[:taken], top.indices, max_band, per_block, dist, probs, row_block)
            if kept >= need or taken == affordable:
                break
            more = estimate[taken:] - estimate[taken - 1] if taken else estimate
            taken += max(int(torch.searchsorted(more, need - kept)) + 1, taken // 8)  # at least 1/8 more: few rounds
        self.stats["probe_mass"] += kept / total
        self.stats["heads"] += 1
        return bands, columns

    def _kept(self, taken, column_ids, max_band, per_block, dist, probs, row_block):
        """The pattern of the taken candidates (bands 1.. then columns) and the probe mass it keeps exactly: the kept
        bands, and the columns where no kept band holds them."""
        b, device = self.block, per_block.device
        bands = torch.cat([torch.zeros(1, dtype=torch.long, device=device), taken[taken < max_band] + 1]).sort()[0]
        columns = column_ids[taken[taken >= max_band] - max_band].sort()[0]
        is_band = torch.zeros(max_band + 1, dtype=torch.bool, device=device)
        is_band[bands] = True
        kept = float((per_block * (is_band[dist.clamp(0, max_band)] & (dist >= 0))).sum())
        col_dist = row_block[:, None] - columns[None] // b  # (m, columns)
        kept += float((probs[:, columns] * ((col_dist > 0) & ~is_band[col_dist.clamp(0, max_band)])).sum())
        return bands, columns, kept

    def _blocks(self, qs, k, v, q_pos, k_pos, chunk_len, bands, columns) -> torch.Tensor:
        """Attention of one KV head's query heads (qs: (g, T, d) each) over the pattern: (g, T, d) fp32."""
        b, g, (t, d) = self.block, qs[0].shape[0], qs[0].shape[1:]
        first = int(q_pos[0]) // b * b  # queries padded to whole blocks (the padding's rows are dropped)
        n_q = -(-(int(q_pos[-1]) + 1 - first) // b)
        lead = int(q_pos[0]) - first
        padded_pos = torch.arange(first, first + n_q * b, device=k.device)
        query_block = padded_pos.view(n_q, b)[:, 0] // b  # (n_q,) absolute block numbers
        slots, valid = self._slots(query_block, bands, columns, k.shape[0])
        queries = []
        for q in qs:  # (g, T, d) -> (n_q, g*b, d): a query block's rows for every head of the group
            qp = torch.zeros(g, n_q * b, d, device=k.device)
            qp[:, lead:lead + t] = q
            queries.append(qp.view(g, n_q, b, d).transpose(0, 1).reshape(n_q, g * b, d))
        real = ((padded_pos >= int(q_pos[0])) & (padded_pos <= int(q_pos[-1]))).view(n_q, b)  # rows of real queries
        block_pos = padded_pos.view(n_q, b)
        out = torch.empty(n_q, g * b, d, device=k.device)
        lse_kept = torch.empty(n_q, g, b, device=k.device) if self.measure else None
        per_batch = max(1, SCORE_BYTES // (4 * g * b * slots.shape[1] * len(qs)))
        for a in range(0, n_q, per_batch):
            sl = slice(a, a + per_batch)
            keys, values = k[slots[sl]], v[slots[sl]]  # (n, K, d)
            key_pos = k_pos[slots[sl]]  # (n, K)
            visible = valid[sl][:, None, :] & (key_pos[:, None, :] <= block_pos[sl][:, :, None])  # (n, b, K)
            if chunk_len is None and lse_kept is None:  # torch's fused kernel (no score tensor): 2x faster on CPU
                n = keys.shape[0]
                out[sl] = F.scaled_dot_product_attention(
                    queries[0][sl].view(n, g, b, d), keys[:, None], values[:, None], attn_mask=visible[:, None],
                    scale=1.0, enable_gqa=True).view(n, g * b, d)
            elif _FLASH_WITH_LSE is not None:  # DCA, or measuring: the fused kernel once per query rotation, merged
                out[sl], lse = _flash_parts([q[sl] for q in queries], keys, values, visible, block_pos[sl], key_pos,
                                            chunk_len, g)
                if lse_kept is not None:
                    lse_kept[sl] = lse
            else:
                scores = _scores([q[sl] for q in queries], keys, block_pos[sl], key_pos, chunk_len, g)  # (n, g, b, K)
                scores.masked_fill_(~visible[:, None], float("-inf"))
                if lse_kept is not None:
                    lse_kept[sl] = torch.logsumexp(scores, dim=-1)
                out[sl] = torch.softmax(scores, dim=-1).flatten(1, 2) @ values
            self.stats["kept_keys"] += float((visible & real[sl][:, :, None]).sum(dtype=torch.float32)) * g
        self.stats["causal_keys"] += float(torch.searchsorted(k_pos, q_pos, right=True).sum()) * g  # k_pos sorted
        if lse_kept is not None:  # the dense normaliser: every band up to each query block
            every = torch.arange(int(query_block.max()) + 1, device=k.device)
            lse_all = self._lse(queries, k, k_pos, chunk_len, every, block_pos, query_block, g)
            share = torch.exp(lse_kept - lse_all).transpose(0, 1)[:, real]  # (g, real rows)
            self.stats["mass"] += float(share.sum())
            self.stats["queries"] += int(share.numel())
        return out.view(n_q, g, b, d).transpose(0, 1).reshape(g, n_q * b, d)[:, lead:lead + t]

    def _slots(self, query_block, bands, columns, n_keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Key slots (n_q, K) of each query block, and which of them hold a kept key: the key blocks at the kept
        distances, then the kept columns before the block that no kept band holds."""
        b, device = self.block, query_block.device
        band_blocks = query_block[:, None] - bands[None]  # (n_q, n_bands)
        slots = (band_blocks[:, :, None] * b + torch.arange(b, device=device)).flatten(1)  # (n_q, n_bands*b)
        valid = (band_blocks >= 0).repeat_interleave(b, dim=1) & (slots < n_keys)
        if len(columns):
            is_band = torch.zeros(int(query_block.max()) + 1, dtype=torch.bool, device=device)
            is_band[bands[bands <= int(query_block.max())]] = True
            col_dist = query_block[:, None] - columns[None] // b  # (n_q, n_columns)
            slots = torch.cat([slots, columns[None].expand(len(query_block), -1)], dim=1)
            valid = torch.cat([valid, (col_dist > 0) & ~is_band[col_dist.clamp(min=0)]], dim=1)
        return slots.clamp(0, n_keys - 1), valid

    def _lse(self, queries, k, k_pos, chunk_len, bands, block_pos, query_block, g) -> torch.Tensor:
        """Log-sum-exp (n_q, g, b) of every padded query row over the keys of the given bands (all of them: dense)."""
        b = self.block
        slots, valid = self._slots(query_block, bands, bands[:0], k.shape[0])
        lse = torch.empty(len(query_block), g, b, device=k.device)
        for a in range(len(query_block)):
            key_pos = k_pos[slots[a]][None]  # (1, K)
            visible = valid[a][None, None] & (key_pos[:, None] <= block_pos[a][None, :, None])  # (1, b, K)
            scores = _scores([q[a:a + 1] for q in queries], k[slots[a]][None], block_pos[a][None], key_pos,
                             chunk_len, g)
            lse[a] = torch.logsumexp(scores.masked_fill(~visible[:, None], float("-inf")), dim=-1)[0]
        return lse


def _flash_parts(qs, keys, values, visible, q_pos, k_pos, chunk_len, g):
    """Attention of query rows qs[i] (n, g*b, d) over keys/values (n, K, d) where `visible` (n, b, K): torch's fused
    CPU kernel once per query rotation (DCA: intra, successive, inter, each over its keys), merged exactly by
    log-sum-exp. Returns (out (n, g*b, d), lse (n, g, b))."""
    n, kk, d = keys.shape
    b = visible.shape[1]
    if chunk_len is None:
        parts = [visible]
    else:
        rel = (q_pos // chunk_len)[:, :, None] - (k_pos // chunk_len)[:, None, :]  # (n, b, K)
        parts = [visible & (rel == 0), visible & (rel == 1), visible & (rel >= 2)]
    merged = None
    for q, part in zip(qs, parts):
        if not bool(part.any()):
            continue
        part_keys, part_values = keys, values
        if len(parts) > 1:  # only this rotation's keys (each block's, to the front), not all K three times
            used = part.any(1)  # (n, K)
            count = used.sum(1)
            order = torch.argsort((~used).to(torch.uint8), dim=1, stable=True)[:, :int(count.max())]  # (n, Kj)
            part_keys = keys.gather(1, order[..., None].expand(-1, -1, d))
            part_values = values.gather(1, order[..., None].expand(-1, -1, d))
            part = part.gather(2, order[:, None, :].expand(-1, b, -1))
        kj = part_keys.shape[1]
        k4, v4 = part_keys[:, None].expand(n, g, kj, d), part_values[:, None].expand(n, g, kj, d)
        bias = torch.zeros(part.shape, device=keys.device).masked_fill_(~part, float("-inf"))[:, None]
        o, lse = _FLASH_WITH_LSE(q.view(n, g, b, d), k4, v4, 0.0, False, attn_mask=bias, scale=1.0)
        lse = lse.masked_fill(~part.any(-1)[:, None], float("-inf"))  # a row with no key here: out of the merge
        merged = (o, lse) if merged is None else merge_attention(*merged, o, lse)
    return merged[0].reshape(n, g * b, d), merged[1]


def _scores(qs: list[torch.Tensor], keys: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
            chunk_len: int | None, g: int) -> torch.Tensor:
    """Scores (n, g, R, K) of query rows qs[i] (n, g*R, d) (g heads of R rows each, already scaled by d^-1/2)
    against keys (n, K, d). With DCA (chunk_len set) qs = [intra, successive, inter] rotations and each pair takes
    the one its chunks call for: the key's chunk equal to the query's, the one before, or earlier.
    q_pos (n, R) and k_pos (n, K) are the rows' and keys' token positions."""
    n, rows, k = keys.shape[0], q_pos.shape[-1], keys.shape[1]
    first = (qs[0] @ keys.transpose(-1, -2)).view(n, g, rows, k)
    if chunk_len is None:
        return first
    rel = ((q_pos // chunk_len)[:, :, None] - (k_pos // chunk_len)[:, None, :])[:, None]  # (n, 1, R, K)
    others = [(q @ keys.transpose(-1, -2)).view(n, g, rows, k) for q in qs[1:]]
    return torch.where(rel == 0, first, torch.where(rel == 1, others[0], others[1]))
