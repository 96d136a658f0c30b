import json

import pytest
import torch

from qwen25.data.shards import ShardError, ShardWriter, TokenShards


def _rows(n, row_len, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (n, row_len), generator=g)
    docs = torch.cumsum((torch.rand(n, row_len, generator=g) < 0.1).long(), dim=1)
    docs[:, -3:] = -1
    return tokens, docs


def test_write_read_round_trip_across_shards(tmp_path):
    tokens, docs = _rows(23, 17, 100, seed=1)
    with ShardWriter(tmp_path / "s", seq_len=16, eos_id=0, pad_id=1, vocab_size=100, rows_per_shard=5,
                     meta={"source": "test"}) as w:
        for t, d in zip(tokens, docs):
            w.add(t, d)
    shards = TokenShards(tmp_path / "s", verify=True)
    assert len(shards) == 23 and len(shards.index["shards"]) == 5
    assert shards.num_tokens == int((docs >= 0).sum())
    assert shards.index["meta"] == {"source": "test"}
    order = torch.randperm(23).tolist()
    got_t, got_d = shards.rows(order)
    assert torch.equal(got_t, tokens[order]) and torch.equal(got_d, docs[order])
    with pytest.raises(IndexError):
        shards.row(23)


def test_errors_name_the_problem(tmp_path):
    w = ShardWriter(tmp_path / "s", seq_len=4, eos_id=0, pad_id=1, vocab_size=10)
    with pytest.raises(ShardError, match="seq_len \\+ 1 = 5"):
        w.add([1, 2, 3], [0, 0, 0])
    with pytest.raises(ShardError, match="lie in \\[0, 10\\)"):
        w.add([1, 2, 3, 4, 10], [0] * 5)
    with pytest.raises(ShardError, match="no index.json"):
        TokenShards(tmp_path / "s")  # writer not closed: incomplete
    w.add([1, 2, 3, 4, 5], [0] * 5)
    w.close()
    with pytest.raises(ShardError, match="already holds"):
        ShardWriter(tmp_path / "s", seq_len=4, eos_id=0, pad_id=1, vocab_size=10)
    (tmp_path / "s" / "shard-00000.safetensors").write_bytes(b"x" * 64)
    with pytest.raises(ShardError, match="sha256"):
        TokenShards(tmp_path / "s", verify=True)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    index["version"] = 99
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    with pytest.raises(ShardError, match="version 99"):
        TokenShards(tmp_path / "s")


def test_a_rejected_row_leaves_no_loss_mask_behind(tmp_path):
    """A row refused for its token ids adds nothing: the masks stay aligned with the rows written."""
    with ShardWriter(tmp_path / "s", seq_len=3, eos_id=0, pad_id=0, vocab_size=9, loss_mask=True) as w:
        w.add([1, 2, 3, 4], [0, 0, 0, 0], [0, 1, 1, 1])
        with pytest.raises(ShardError, match="token ids"):
            w.add([1, 2, 3, 99], [0, 0, 0, 0], [1, 1, 1, 1])
        w.add([5, 6, 7, 8], [0, 0, 0, 0])
    shards = TokenShards(tmp_path / "s")
    assert shards.loss_masks([0, 1]).int().tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
