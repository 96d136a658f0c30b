"""Tokenise and pack documents into training rows, written as token shards (qwen25/data/shards.py).

Every document becomes its tokens followed by <|endoftext|>. Two packers:
  * concat:   all documents in order, one stream cut into rows of seq_len + 1 tokens (only the last row is padded);
              a document may continue into the next row, where it gets a new per-row document id.
  * best_fit: documents longer than a row are cut into row-sized pieces; the remaining pieces of a buffer of
              documents are placed largest first into the open row with the least room that still fits them
              (best-fit decreasing), so no piece is split and little is padded.

Beside the shards, `documents.jsonl` (one line per packed document: its id and token count, in pack order) and
`segments.npy` (int64 rows of [row, doc id in row, document index, offset in document, length]) record where
each piece of each document went, so any token of a shard can be traced back to its source document.
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .shards import INDEX, ShardWriter

SEGMENTS, DOCUMENTS = "segments.npy", "documents.jsonl"


@dataclass
class Row:
    """One packed row: the pieces it holds, as (document index, offset in document, length)."""

    pieces: list[tuple[int, int, int]] = field(default_factory=list)
    used: int = 0


def pack_concat(lengths: Iterable[int], row_len: int) -> Iterator[Row]:
    """Rows for documents of the given token lengths, concatenated in order and cut every row_len tokens."""
    row = Row()
    for doc, n in enumerate(lengths):
        offset = 0
        while offset < n:
            take = min(n - offset, row_len - row.used)
            row.pieces.append((doc, offset, take))
            row.used += take
            offset += take
            if row.used == row_len:
                yield row
                row = Row()
    if row.pieces:
        yield row


def pack_best_fit(lengths: Iterable[int], row_len: int, buffer_docs: int = 8192) -> Iterator[Row]:
    """Rows by best-fit decreasing over buffers of `buffer_docs` documents (long documents cut into full rows)."""
    lengths = list(lengths)
    for first in range(0, len(lengths), buffer_docs):
        pieces = []
        for doc in range(first, min(first + buffer_docs, len(lengths))):
            n, offset = lengths[doc], 0
            while n - offset >= row_len:  # a full row of one document needs no packing
                yield Row([(doc, offset, row_len)], row_len)
                offset += row_len
            if n > offset:
                pieces.append((n - offset, doc, offset))
        rows: list[Row] = []
        free: list[tuple[int, int]] = []  # (room left, row number), sorted
        for length, doc, offset in sorted(pieces, key=lambda p: (-p[0], p[1])):
            at = bisect.bisect_left(free, (length, -1))
            if at == len(free):
                rows.append(Row())
                slot = len(rows) - 1
                room = row_len
            else:
                room, slot = free.pop(at)
            rows[slot].pieces.append((doc, offset, length))
            rows[slot].used += length
            if room - length > 0:
                bisect.insort(free, (room - length, slot))
        yield from rows


def pack_documents(token_lists: Sequence[Sequence[int]], ids: Sequence[str], out_dir: str | Path, seq_len: int,
                   eos_id: int, pad_id: int, vocab_size: int, method: str = "concat", rows_per_shard: int = 4096,
                   buffer_docs: int = 8192, meta: dict | None = None) -> dict:
    """Append eos to each document, pack them (method "concat" or "best_fit") into rows of seq_len + 1 tokens
    and write a token-shard directory with the document map beside it; returns the packing statistics."""
    if method not in ("concat", "best_fit"):
        raise ValueError(f"pack method must be 'concat' or 'best_fit', got {method!r}")
    if len(token_lists) != len(ids):
        raise ValueError(f"{len(token_lists)} token lists for {len(ids)} ids")
    out_dir, row_len = Path(out_dir), seq_len + 1
    docs = [list(t) + [eos_id] for t in token_lists]
    lengths = [len(d) for d in docs]
    rows = (pack_concat(lengths, row_len) if method == "concat"
            else pack_best_fit(lengths, row_len, buffer_docs))
    segments = []
    stats = {"method": method, "documents": len(docs), "tokens": sum(lengths), "rows": 0, "padding": 0}
    writer = ShardWriter(out_dir, seq_len, eos_id, pad_id, vocab_size, rows_per_shard, meta={})
    for r, row in enumerate(rows):
        tokens = np.full(row_len, pad_id, dtype=np.int64)
        doc_ids = np.full(row_len, -1, dtype=np.int64)
        at = 0
        for local, (doc, offset, length) in enumerate(row.pieces):
            tokens[at:at + length] = docs[doc][offset:offset + length]
            doc_ids[at:at + length] = local
            segments.append((r, local, doc, offset, length))
            at += length
        writer.add(tokens, doc_ids)
        stats["rows"] += 1
        stats["padding"] += row_len - at
    slots = stats["rows"] * row_len
    stats["padding_fraction"] = stats["padding"] / slots if slots else 0.0
    np.save(out_dir / (SEGMENTS + ".tmp.npy"), np.array(segments, dtype=np.int64).reshape(-1, 5))
    os.replace(out_dir / (SEGMENTS + ".tmp.npy"), out_dir / SEGMENTS)
    tmp = out_dir / (DOCUMENTS + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for doc_id, n in zip(ids, lengths):
            f.write(json.dumps({"id": doc_id, "tokens": n}) + "\n")
    os.replace(tmp, out_dir / DOCUMENTS)
    writer.meta = {**(meta or {}), **stats, "segment_map": SEGMENTS, "document_map": DOCUMENTS}
    writer.close()  # index.json last: its presence means the directory is complete
    return stats


def is_packed(out_dir: str | Path) -> bool:
    """Whether a finished shard directory is already there (a rerun skips packing then)."""
    return (Path(out_dir) / INDEX).is_file()


def read_document_map(out_dir: str | Path) -> tuple[list[dict], np.ndarray]:
    """The documents (id, tokens) in pack order and the segments array [row, doc id in row, doc, offset, len]."""
    out_dir = Path(out_dir)
    docs = [json.loads(line) for line in (out_dir / DOCUMENTS).read_text(encoding="utf-8").splitlines()]
    return docs, np.load(out_dir / SEGMENTS)


def pack_folder(reader, tokenizer_dir: str | Path, out_dir: str | Path, seq_len: int = 2048, method: str = "concat",
                seed: int = 0, rows_per_shard: int = 4096, buffer_docs: int = 8192) -> dict:
    """Read every document of a datatrove reader, shuffle by a hash of the id (the same order for any number of
    input files or workers), tokenise (text as plain text) and pack into a token-shard directory."""
    from tqdm import tqdm

    from ..tokenizer import Tokenizer
    from .mixture import hash01

    docs = sorted(((hash01(d.id, seed, "shuffle"), d.id, d.text) for d in reader()), key=lambda x: (x[0], x[1]))
    tok = Tokenizer.from_dir(tokenizer_dir)
    token_lists = []
    for i in tqdm(range(0, len(docs), 1024), desc="tokenize", unit="batch", leave=False):
        token_lists += tok.encode_batch([d[2] for d in docs[i:i + 1024]], allowed_special="none")
    eos = tok.endoftext_id
    return pack_documents(token_lists, [d[1] for d in docs], out_dir, seq_len, eos, eos, len(tok), method,
                          rows_per_shard, buffer_docs, meta={"seed": seed, "tokenizer": str(tokenizer_dir)})
