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
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from ..tokenizer import Tokenizer
from .mixture import hash01
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
                   buffer_docs: int = 8192, meta: dict | None = None,
                   loss_masks: Sequence[Sequence[int] | None] | None = None) -> dict:
    """Append eos to each document, pack them (method "concat" or "best_fit") into rows of seq_len + 1 tokens
    and write a token-shard directory with the document map beside it; returns the packing statistics.

    `loss_masks` (optional, one per document, None for "every token"): 1 for tokens that are training targets,
    0 for context only (a task's prompt, when only its answer should be learned); the eos is a target. The
    shards then carry a loss mask (shards.py)."""
    if method not in ("concat", "best_fit"):
        raise ValueError(f"pack method must be 'concat' or 'best_fit', got {method!r}")
    if len(token_lists) != len(ids):
        raise ValueError(f"{len(token_lists)} token lists for {len(ids)} ids")
    if loss_masks is not None:
        if len(loss_masks) != len(token_lists):
            raise ValueError(f"{len(loss_masks)} loss masks for {len(token_lists)} documents")
        bad = next((i for i, (m, t) in enumerate(zip(loss_masks, token_lists)) if m is not None and len(m) != len(t)),
                   None)
        if bad is not None:
            raise ValueError(f"document {ids[bad]}: loss mask of {len(loss_masks[bad])} values for "
                             f"{len(token_lists[bad])} tokens")
        masks = [([1] * len(t) if m is None else list(m)) + [1] for m, t in zip(loss_masks, token_lists)]
    out_dir, row_len = Path(out_dir), seq_len + 1
    docs = [list(t) + [eos_id] for t in token_lists]
    lengths = [len(d) for d in docs]
    rows = (pack_concat(lengths, row_len) if method == "concat"
            else pack_best_fit(lengths, row_len, buffer_docs))
    segments = []
    stats = {"method": method, "documents": len(docs), "tokens": sum(lengths), "rows": 0, "padding": 0}
    writer = ShardWriter(out_dir, seq_len, eos_id, pad_id, vocab_size, rows_per_shard, meta={},
                         loss_mask=loss_masks is not None)
    for r, row in enumerate(rows):
        tokens = np.full(row_len, pad_id, dtype=np.int64)
        doc_ids = np.full(row_len, -1, dtype=np.int64)
        mask = np.zeros(row_len, dtype=np.int64) if loss_masks is not None else None
        at = 0
        for local, (doc, offset, length) in enumerate(row.pieces):
            tokens[at:at + length] = docs[doc][offset:offset + length]
            doc_ids[at:at + length] = local
            if mask is not None:
                mask[at:at + length] = masks[doc][offset:offset + length]
            segments.append((r, local, doc, offset, length))
            at += length
        writer.add(tokens, doc_ids, mask)
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


def pack_stream(documents, tokenizer_dir: str | Path, out_dir: str | Path, seq_len: int = 2048,
                method: str = "concat", seed: int = 0, rows_per_shard: int = 4096, buffer_docs: int = 8192) -> dict:
    """Shuffle datatrove Documents by a hash of the id (the same order for any number of input files or workers),
    tokenise them (text as plain text) and pack them into a token-shard directory; returns the packing stats."""
    from tqdm import tqdm


    docs = sorted(((hash01(d.id, seed, "shuffle"), d.id, d.text) for d in documents), key=lambda x: (x[0], x[1]))
    tok = Tokenizer.from_dir(tokenizer_dir)
    token_lists = []
    for i in tqdm(range(0, len(docs), 1024), desc="tokenize", unit="batch", leave=False):
        token_lists += tok.encode_batch([d[2] for d in docs[i:i + 1024]], allowed_special="none")
    eos = tok.endoftext_id
    return pack_documents(token_lists, [d[1] for d in docs], out_dir, seq_len, eos, eos, len(tok), method,
                          rows_per_shard, buffer_docs, meta={"seed": seed, "tokenizer": str(tokenizer_dir)})


def pack_folder(reader, tokenizer_dir: str | Path, out_dir: str | Path, **options) -> dict:
    """pack_stream() over every document of a datatrove reader, in one process."""
    return pack_stream(reader(), tokenizer_dir, out_dir, **options)


class PackStep(PipelineStep):
    """Packs one task's documents into `out_dir/part-RANK/` (a complete shard directory of its own); after all
    tasks, merge_parts() writes the index that makes `out_dir` one shard set. For corpora too large for one
    process: each task holds only its share in memory, and rows are shuffled within a task only."""

    name = "pack"
    type = "📦 - PACKER"

    def __init__(self, tokenizer_dir: str | Path, out_dir: str | Path, **options):
        super().__init__()
        self.tokenizer_dir, self.out_dir, self.options = str(tokenizer_dir), str(out_dir), options

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        part = Path(self.out_dir) / f"part-{rank:05d}"
        if part.exists():  # an unfinished earlier attempt: start this part again
            shutil.rmtree(part)
        stats = pack_stream(data or [], self.tokenizer_dir, part, **self.options)
        self.stat_update("total", "forwarded", value=stats["documents"])
        self.stat_update("doc_len_tokens", value=stats["tokens"])
        yield from ()


def merge_parts(out_dir: str | Path) -> Path:
    """One shard set over the part-*/ directories of PackStep: index.json listing every part's shard files,
    and the document map with rows and documents renumbered in part order; index.json is written last."""
    out_dir = Path(out_dir)
    parts = sorted(p for p in out_dir.glob("part-*") if (p / INDEX).is_file())
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no finished part-*/ shard directories to merge")
    indexes = [json.loads((p / INDEX).read_text()) for p in parts]
    first = indexes[0]
    shards, segments, documents, rows, docs = [], [], [], 0, 0
    for part, index in zip(parts, indexes):
        if (index["seq_len"], index["vocab_size"]) != (first["seq_len"], first["vocab_size"]):
            raise ValueError(f"{part}: seq_len/vocab_size differ from {parts[0]}")
        shards += [{**s, "file": f"{part.name}/{s['file']}"} for s in index["shards"]]
        part_docs, part_segments = read_document_map(part)
        segments.append(part_segments + np.array([rows, 0, docs, 0, 0]))
        documents += part_docs
        rows, docs = rows + index["num_rows"], docs + len(part_docs)
    np.save(out_dir / (SEGMENTS + ".tmp.npy"), np.concatenate(segments) if segments else np.zeros((0, 5)))
    os.replace(out_dir / (SEGMENTS + ".tmp.npy"), out_dir / SEGMENTS)
    (out_dir / (DOCUMENTS + ".tmp")).write_text("".join(json.dumps(d) + "\n" for d in documents))
    os.replace(out_dir / (DOCUMENTS + ".tmp"), out_dir / DOCUMENTS)
    metas = [i["meta"] for i in indexes]
    tokens, padding = sum(m["tokens"] for m in metas), sum(m["padding"] for m in metas)
    meta = {**first["meta"], "documents": docs, "tokens": tokens, "rows": rows, "padding": padding,
            "padding_fraction": padding / (rows * first["row_len"]) if rows else 0.0, "parts": len(parts)}
    index = {**first, "num_rows": rows, "num_tokens": sum(i["num_tokens"] for i in indexes), "shards": shards,
             "meta": meta}
    (out_dir / (INDEX + ".tmp")).write_text(json.dumps(index, indent=1))
    os.replace(out_dir / (INDEX + ".tmp"), out_dir / INDEX)
    return out_dir / INDEX
