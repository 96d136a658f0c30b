"""Token shards: the hand-over format between the data pipeline and training.

A shard directory holds packed training rows, each of `seq_len + 1` tokens (a model reads `seq_len` inputs and
predicts the next `seq_len` tokens), plus the document each token belongs to, so training can keep attention
inside documents and restart RoPE positions per document:

    DIR/index.json                  {"format": "qwen25-token-shards", "version": 1, "seq_len": 4096,
                                     "row_len": 4097, "eos_id": ..., "pad_id": ..., "vocab_size": ...,
                                     "num_rows": ..., "num_tokens": ..., "shards": [{"file", "num_rows",
                                     "num_tokens", "sha256"}], "meta": {...anything the producer records}}
    DIR/shard-00000.safetensors     "tokens"  int32 (rows, row_len)
                                    "doc_ids" int32 (rows, row_len): 0, 1, 2... per document inside a row,
                                              -1 for padding (never attended to, never a target)
                                    "loss_mask" uint8 (rows, row_len), only when index.json says
                                              "loss_mask": true: 1 where the token is a training target,
                                              0 where it is context only (e.g. a task's prompt)

Files are written under a temporary name and renamed, and index.json is written last, so a directory with an
index is complete; `sha256` lets a reader detect a damaged shard.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT, VERSION = "qwen25-token-shards", 1
INDEX = "index.json"


class ShardError(ValueError):
    """A token-shard directory is missing, incomplete or inconsistent."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """Collects rows and writes them as shards of `rows_per_shard` rows; `close()` writes index.json."""

    def __init__(self, path: str | Path, seq_len: int, eos_id: int, pad_id: int, vocab_size: int,
                 rows_per_shard: int = 4096, meta: dict | None = None, loss_mask: bool = False):
        if seq_len < 1 or rows_per_shard < 1:
            raise ShardError(f"seq_len and rows_per_shard must be >= 1, got {seq_len}, {rows_per_shard}")
        self.path, self.seq_len, self.row_len = Path(path), seq_len, seq_len + 1
        self.eos_id, self.pad_id, self.vocab_size = eos_id, pad_id, vocab_size
        self.rows_per_shard, self.meta = rows_per_shard, dict(meta or {})
        self.loss_mask = loss_mask
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / INDEX).exists():
            raise ShardError(f"{self.path} already holds a complete shard set ({INDEX} exists)")
        self._tokens: list[torch.Tensor] = []
        self._docs: list[torch.Tensor] = []
        self._masks: list[torch.Tensor] = []
        self._shards: list[dict] = []

    def add(self, tokens, doc_ids, loss_mask=None) -> None:
        """Append one row: `row_len` token ids, their document ids (-1 = padding) and, for a writer made with
        loss_mask=True, which tokens are targets (None: all of them)."""
        tokens = torch.as_tensor(tokens, dtype=torch.int32).reshape(-1)
        doc_ids = torch.as_tensor(doc_ids, dtype=torch.int32).reshape(-1)
        if tokens.numel() != self.row_len or doc_ids.numel() != self.row_len:
            raise ShardError(f"a row must hold seq_len + 1 = {self.row_len} tokens and doc ids, "
                             f"got {tokens.numel()} and {doc_ids.numel()}")
        if loss_mask is not None and not self.loss_mask:
            raise ShardError("a loss_mask was given to a writer made without loss_mask=True")
        if self.loss_mask:
            mask = torch.ones(self.row_len, dtype=torch.uint8) if loss_mask is None else \
                torch.as_tensor(loss_mask).reshape(-1).to(torch.uint8)
            if mask.numel() != self.row_len or int(mask.max()) > 1:
                raise ShardError(f"a loss mask must hold {self.row_len} values of 0 or 1")
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size:
            raise ShardError(f"token ids must lie in [0, {self.vocab_size}), got {int(tokens.min())}.."
                             f"{int(tokens.max())}")
        if self.loss_mask:  # appended with the row only once the whole row is valid
            self._masks.append(mask)
        self._tokens.append(tokens)
        self._docs.append(doc_ids)
        if len(self._tokens) == self.rows_per_shard:
            self._flush()

    def _flush(self) -> None:
        if not self._tokens:
            return
        tokens, docs = torch.stack(self._tokens), torch.stack(self._docs)
        name = f"shard-{len(self._shards):05d}.safetensors"
        tmp = self.path / (name + ".tmp")
        tensors = {"tokens": tokens.contiguous(), "doc_ids": docs.contiguous()}
        if self.loss_mask:
            tensors["loss_mask"] = torch.stack(self._masks).contiguous()
        save_file(tensors, str(tmp))
        os.replace(tmp, self.path / name)
        self._shards.append({"file": name, "num_rows": tokens.shape[0],
                             "num_tokens": int((docs >= 0).sum()), "sha256": _sha256(self.path / name)})
        self._tokens, self._docs, self._masks = [], [], []

    def close(self) -> Path:
        """Write the last shard and index.json; returns the index path."""
        self._flush()
        index = {"format": FORMAT, "version": VERSION, "seq_len": self.seq_len, "row_len": self.row_len,
                 "eos_id": self.eos_id, "pad_id": self.pad_id, "vocab_size": self.vocab_size,
                 "num_rows": sum(s["num_rows"] for s in self._shards),
                 "num_tokens": sum(s["num_tokens"] for s in self._shards),
                 "shards": self._shards, "meta": self.meta}
        if self.loss_mask:
            index["loss_mask"] = True
        tmp = self.path / (INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1))
        os.replace(tmp, self.path / INDEX)
        return self.path / INDEX

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


class TokenShards:
    """Random access to the rows of a shard directory (memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | Path, verify: bool = False):
        self.path = Path(path)
        index_path = self.path / INDEX
        if not index_path.is_file():
            raise ShardError(f"{self.path}: no {INDEX} (not a token-shard directory, or its writer did not finish)")
        self.index = json.loads(index_path.read_text())
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise ShardError(f"{index_path}: format {self.index.get('format')!r} version "
                             f"{self.index.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        self.seq_len, self.row_len = self.index["seq_len"], self.index["row_len"]
        self.eos_id, self.pad_id = self.index["eos_id"], self.index["pad_id"]
        self.vocab_size = self.index["vocab_size"]
        self._starts, start = [], 0
        for shard in self.index["shards"]:
            file = self.path / shard["file"]
            if not file.is_file():
                raise ShardError(f"{self.path}: shard {shard['file']} listed in {INDEX} is missing")
            if verify and _sha256(file) != shard["sha256"]:
                raise ShardError(f"{file}: sha256 differs from {INDEX} (damaged or replaced)")
            self._starts.append(start)
            start += shard["num_rows"]
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return self.index["num_rows"]

    @property
    def has_loss_mask(self) -> bool:
        """Whether the rows carry a loss mask (tokens that are context only, never targets)."""
        return bool(self.index.get("loss_mask", False))

    @property
    def num_tokens(self) -> int:
        """Tokens that belong to documents (padding excluded)."""
        return self.index["num_tokens"]

    def _handle(self, shard: int):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / self.index["shards"][shard]["file"]), "pt")
        return self._handles[shard]

    def _locate(self, i: int):
        """(open shard file, row within it) of row i."""
        shard = bisect.bisect_right(self._starts, i) - 1
        return self._handle(shard), i - self._starts[shard]

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row i as (tokens, doc_ids), both int64 of length row_len."""
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        handle, local = self._locate(i)
        tokens = handle.get_slice("tokens")[local:local + 1]
        docs = handle.get_slice("doc_ids")[local:local + 1]
        return tokens[0].long(), docs[0].long()

    def rows(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows as (tokens, doc_ids), each (len(indices), row_len) int64."""
        pairs = [self.row(int(i)) for i in indices]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def loss_masks(self, indices) -> torch.Tensor:
        """The rows' loss masks, (len(indices), row_len) bool (all True for a shard set without one)."""
        if not self.has_loss_mask:
            return torch.ones(len(indices), self.row_len, dtype=torch.bool)
        masks = []
        for i in indices:
            handle, local = self._locate(int(i))
            masks.append(handle.get_slice("loss_mask")[local:local + 1][0])
        return torch.stack(masks).bool()
