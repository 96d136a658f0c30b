"""Packing: every token of every document lands in the shards exactly once, boundaries recorded; best-fit waste."""

from __future__ import annotations

import random

import numpy as np
import pytest

from qwen25.data.pack import is_packed, pack_best_fit, pack_concat, pack_documents, read_document_map
from qwen25.data.shards import TokenShards

EOS, PAD, VOCAB = 1, 0, 5000


def random_docs(seed: int, count: int, max_len: int):
    rng = random.Random(seed)
    docs = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, max_len))] for _ in range(count)]
    return docs, [f"doc-{i}" for i in range(count)]


def check_exactly_once(out_dir, docs):
    """Rebuild each document from the shards through the document map; every shard slot is used at most once."""
    shards = TokenShards(out_dir, verify=True)
    tokens, doc_ids = shards.rows(range(len(shards)))
    meta_docs, segments = read_document_map(out_dir)
    used = np.zeros(tokens.shape, dtype=np.int64)
    rebuilt = [[None] * (len(d) + 1) for d in docs]
    for row in range(len(shards)):
        at = 0
        for r, local, doc, offset, length in segments[segments[:, 0] == row]:
            assert (doc_ids[row, at:at + length] == local).all()
            rebuilt[doc][offset:offset + length] = tokens[row, at:at + length].tolist()
            used[row, at:at + length] += 1
            at += length
        assert (doc_ids[row, at:] == -1).all() and (tokens[row, at:] == PAD).all()
    assert used.max() == 1
    assert [m["tokens"] for m in meta_docs] == [len(d) + 1 for d in docs]
    for doc, again in zip(docs, rebuilt):
        assert again == doc + [EOS]
    assert shards.num_tokens == sum(len(d) + 1 for d in docs) == int(used.sum())
    return shards


@pytest.mark.parametrize("method", ["concat", "best_fit"])
def test_every_token_exactly_once(tmp_path, method):
    docs, ids = random_docs(0, 300, 200)
    stats = pack_documents(docs, ids, tmp_path / "s", seq_len=63, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB,
                           method=method, rows_per_shard=50, buffer_docs=100)
    shards = check_exactly_once(tmp_path / "s", docs)
    assert len(shards.index["shards"]) > 1  # several shard files were exercised
    assert shards.index["meta"]["method"] == method and stats["rows"] == len(shards)
    assert is_packed(tmp_path / "s")


def test_concat_pads_only_the_last_row(tmp_path):
    docs, ids = random_docs(1, 100, 90)
    pack_documents(docs, ids, tmp_path / "s", seq_len=31, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB)
    shards = TokenShards(tmp_path / "s")
    _, doc_ids = shards.rows(range(len(shards)))
    assert (doc_ids[:-1] >= 0).all()


def test_best_fit_wastes_little_and_splits_only_long_documents():
    rng = random.Random(2)
    row_len = 2049
    lengths = [min(int(rng.lognormvariate(6.0, 1.1)) + 1, 20_000) for _ in range(5000)]
    rows = list(pack_best_fit(lengths, row_len, buffer_docs=5000))
    padding = sum(row_len - r.used for r in rows) / (len(rows) * row_len)
    assert padding < 0.01, padding  # stated bound: under 1% on this length distribution
    pieces: dict[int, list] = {}
    for r in rows:
        assert r.used == sum(p[2] for p in r.pieces) <= row_len
        for doc, offset, length in r.pieces:
            pieces.setdefault(doc, []).append((offset, length))
    for doc, ps in pieces.items():
        assert sum(length for _, length in ps) == lengths[doc]
        assert sum(1 for _, length in ps if length < row_len) <= 1  # one partial piece at most per document
    concat_rows = list(pack_concat(lengths, row_len))
    assert sum(r.used for r in concat_rows) == sum(lengths)


def test_rejects_unknown_method(tmp_path):
    with pytest.raises(ValueError, match="pack method"):
        pack_documents([[2]], ["a"], tmp_path / "s", 8, EOS, PAD, VOCAB, method="greedy")


@pytest.mark.parametrize("method", ["concat", "best_fit"])
def test_loss_masks_travel_with_their_tokens(tmp_path, method):
    """Per-document loss masks land beside exactly their tokens (split documents too); eos is a target."""
    docs, ids = random_docs(2, 120, 90)
    rng = random.Random(3)
    masks = [None if i % 3 == 0 else [rng.randrange(2) for _ in d] for i, d in enumerate(docs)]
    pack_documents(docs, ids, tmp_path / "s", seq_len=31, eos_id=EOS, pad_id=PAD, vocab_size=VOCAB, method=method,
                   rows_per_shard=40, loss_masks=masks)
    shards = check_exactly_once(tmp_path / "s", docs)
    assert shards.has_loss_mask and shards.index["loss_mask"] is True
    loss_mask = shards.loss_masks(range(len(shards)))
    _, segments = read_document_map(tmp_path / "s")
    rebuilt = [[None] * (len(d) + 1) for d in docs]
    for row in range(len(shards)):
        at = 0
        for _, _, doc, offset, length in segments[segments[:, 0] == row]:
            rebuilt[doc][offset:offset + length] = loss_mask[row, at:at + length].int().tolist()
            at += length
        assert not loss_mask[row, at:].any()  # padding is never a target
    assert rebuilt == [([1] * len(d) if m is None else m) + [1] for d, m in zip(docs, masks)]
    with pytest.raises(ValueError, match="loss mask of 2 values"):
        pack_documents([[5, 6, 7]], ["x"], tmp_path / "bad", 7, EOS, PAD, VOCAB, loss_masks=[[1, 0]])
