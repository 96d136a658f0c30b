"""Training batches from token shards (qwen25/data/shards.py): deterministic in the step, sliced per rank.

The global batch of step s is the rows with global sample indices s*B ... s*B + B - 1. Sample i is row
perm_e[i mod R] of epoch e = i // R, where perm_e is a permutation of the R shard rows seeded by (seed, e),
so every epoch visits every row once in a new order. Rank r of W takes the contiguous slice
[r*B/W, (r+1)*B/W) of the global batch: together the ranks see exactly the rows one process would see,
and a resumed run needs only the step number.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import torch

from ..data.shards import TokenShards


class ShardBatches:
    """batch(step) -> (tokens, doc_ids), each (batch_size // world, row_len) int64, for this rank; shards with
    a loss mask give (tokens, doc_ids, loss_mask) with the mask bool."""

    def __init__(self, shards: TokenShards | str | Path, batch_size: int, seed: int = 0, rank: int = 0,
                 world: int = 1):
        self.shards = shards if isinstance(shards, TokenShards) else TokenShards(shards)
        if batch_size % world:
            raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {world}")
        if len(self.shards) == 0:
            raise ValueError(f"{self.shards.path}: the shard set holds no rows")
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world
        self.local_batch = batch_size // world
        self.seq_len, self.row_len = self.shards.seq_len, self.shards.row_len
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(len(self.shards), generator=g), epoch
        return self._perm

    def global_indices(self, step: int) -> list[int]:
        """Global sample indices of this rank's rows at `step` (used to decide per-row treatment, e.g. mixes)."""
        first = step * self.batch_size + self.rank * self.local_batch
        return list(range(first, first + self.local_batch))

    def row_ids(self, step: int) -> list[int]:
        """Shard row numbers of this rank's rows at `step`."""
        n = len(self.shards)
        return [int(self._permutation(i // n)[i % n]) for i in self.global_indices(step)]

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """(tokens, doc_ids[, loss_mask]) of this rank's rows at `step`; doc_ids is -1 at padding."""
        rows = self.row_ids(step)
        tokens, docs = self.shards.rows(rows)
        return (tokens, docs, self.shards.loss_masks(rows)) if self.shards.has_loss_mask else (tokens, docs)

    @property
    def tokens_per_epoch(self) -> int:
        """Document tokens in one pass over the shards (padding excluded)."""
        return self.shards.num_tokens


def target_mask(doc_ids: torch.Tensor, loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq) bool for rows of seq + 1 doc ids: True where position t's next token is a training target.

    A target must be a document token (never padding), predicted from a document token, and (with a loss mask)
    marked as a target.
    """
    mask = (doc_ids[:, :-1] >= 0) & (doc_ids[:, 1:] >= 0)
    return mask if loss_mask is None else mask & loss_mask[:, 1:].bool()


def is_long_row(index: int, long_fraction: Fraction) -> bool:
    """Whether global sample `index` is a full-length row: exactly floor(f * n) of the first n samples are."""
    num, den = long_fraction.numerator, long_fraction.denominator
    return (num * (index + 1)) // den - (num * index) // den == 1


def split_documents(doc_ids: torch.Tensor, length: int) -> torch.Tensor:
    """Doc ids of one row cut into independent sequences of at most `length` tokens (padding stays -1).

    Under the document mask each piece is its own sequence (positions restart, no attention across), so a
    row of seq_len + 1 tokens becomes seq_len / length short sequences with exactly the targets they would
    have as rows of their own.
    """
    position = torch.arange(doc_ids.numel())
    piece = position // length
    renumbered = doc_ids + piece * (int(doc_ids.max()) + 1)
    return torch.where(doc_ids >= 0, renumbered, doc_ids)


class ProgressiveMix:
    """Wraps ShardBatches: a `long_fraction` share of rows keep the full length, the others are cut shorter.

    Which rows are long depends only on their global sample index, so the share is exact over any run prefix
    (to within one row), equal for every process layout, and a resumed run sees the same mix.
    """

    def __init__(self, data, long_fraction: float, short_lengths: list[int]):
        if not 0.0 <= long_fraction <= 1.0:
            raise ValueError(f"long_fraction must lie in [0, 1], got {long_fraction}")
        bad = [n for n in short_lengths if not 0 < n < data.seq_len]
        if bad or not short_lengths:
            raise ValueError(f"short_lengths must be shorter than seq_len {data.seq_len} and positive, "
                             f"got {short_lengths}")
        self.data, self.short_lengths = data, list(short_lengths)
        self.long_fraction = Fraction(long_fraction).limit_denominator(1000)
        self.seq_len, self.batch_size, self.world = data.seq_len, data.batch_size, data.world

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's (tokens, doc_ids[, loss_mask]) at `step`, shorter rows cut into independent pieces."""
        tokens, docs, *loss_mask = self.data.batch(step)
        docs = docs.clone()
        num, den = self.long_fraction.numerator, self.long_fraction.denominator
        for row, index in enumerate(self.data.global_indices(step)):
            if not is_long_row(index, self.long_fraction):
                ordinal = index - (num * index) // den  # short rows before this one, in the whole run
                docs[row] = split_documents(docs[row], self.short_lengths[ordinal % len(self.short_lengths)])
        return (tokens, docs, *loss_mask)
