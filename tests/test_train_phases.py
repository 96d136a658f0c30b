"""Long-context phases: ABF phase 2 starts from phase 1's weights; the progressive 40/60 long/short mix."""

from __future__ import annotations

import json

import torch
import yaml
from safetensors.torch import load_file

from qwen25.cli import main
from qwen25.data.shards import TokenShards
from qwen25.train.data import ShardBatches
from qwen25.train.loop import lm_loss
from qwen25.train.packing import document_positions
from qwen25.train.data import ProgressiveMix, is_long_row, split_documents
from qwen25.train.phases import phase_configs
from test_train_data import _model, make_shards


def test_long_share_is_exact_over_every_prefix():
    from fractions import Fraction

    f = Fraction(2, 5)
    for n in (1, 5, 7, 20, 1001):
        assert sum(is_long_row(i, f) for i in range(n)) == (2 * n) // 5


def test_progressive_mix_keeps_40_percent_at_max_length_and_cuts_the_rest(tmp_path):
    shards = TokenShards(make_shards(tmp_path / "s", rows=30, seq_len=32, pad_every=0))
    plain = ShardBatches(shards, batch_size=5, seed=0)
    mixed = ProgressiveMix(ShardBatches(shards, batch_size=5, seed=0), 0.4, [8, 16])
    long_rows = short_rows = 0
    for step in range(8):  # 40 rows
        tokens, docs = mixed.batch(step)
        ref_tokens, ref_docs = plain.batch(step)
        assert torch.equal(tokens, ref_tokens)
        for row in range(5):
            if torch.equal(docs[row], ref_docs[row]):
                long_rows += 1
            else:
                short_rows += 1
                longest = int(document_positions(docs[row:row + 1]).max()) + 1
                assert longest <= 16  # every sequence in a short row is at most the short length
    assert (long_rows, short_rows) == (16, 24)  # exactly 40% / 60%


def test_a_cut_row_trains_like_its_pieces_as_rows_of_their_own():
    model = _model(2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, 512, (1, 33), generator=g)
    docs = torch.zeros(1, 33, dtype=torch.long)
    docs[0, 20:] = 1
    cut = split_documents(docs[0], 8)[None]
    with torch.no_grad():
        whole = lm_loss(model, (tokens, cut), None)
        # the same targets as 4 rows of 8 + 1 tokens, each cut further at the document boundary (position 20)
        pieces = torch.stack([tokens[0, i:i + 9] for i in range(0, 32, 8)])
        piece_docs = torch.stack([docs[0, i:i + 9] - docs[0, i] for i in range(0, 32, 8)])
        piece_docs[:, -1] = piece_docs[:, -2]  # the 9th token is each piece's last target, in the same piece
        separate = lm_loss(model, (pieces, piece_docs), None)
    assert abs(float(whole) - float(separate)) < 1e-5


def test_phase_two_starts_from_phase_one_with_the_new_rope_base_and_length(tmp_path):
    short, long = make_shards(tmp_path / "s32", rows=16, seq_len=32), make_shards(tmp_path / "s64", rows=16,
                                                                                   seq_len=64)
    config = {
        "out_dir": str(tmp_path / "run"), "model": "tiny", "batch_size": 4, "dtype": "fp32", "warmup": 1,
        "peak_flops": 1e11, "save_every": 100,
        "phases": [
            {"name": "short", "seq_len": 32, "rope_theta": 10000, "steps": 3, "lr": 1e-2, "data": str(short)},
            # lr 0: AdamW leaves the weights unchanged, so phase 2's final weights are its starting weights
            {"name": "long", "seq_len": 64, "rope_theta": 1000000, "steps": 2, "lr": 0.0, "data": str(long),
             "long_fraction": 0.4, "short_lengths": [32]},
        ],
    }
    path = tmp_path / "phases.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path), "--quiet"]) == 0
    run = tmp_path / "run"
    saved = json.loads((run / "long" / "train_config.json").read_text())
    assert saved["seq_len"] == 64 and saved["model_overrides"]["rope_theta"] == 1e6
    assert saved["init_from"] == str(run / "short" / "final") and saved["long_fraction"] == 0.4
    assert json.loads((run / "short" / "final" / "config.json").read_text())["rope_theta"] == 1e4
    assert json.loads((run / "long" / "final" / "config.json").read_text())["rope_theta"] == 1e6
    a, b = load_file(run / "short" / "final" / "model.safetensors"), load_file(run / "long" / "final" /
                                                                                "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    first = load_file(run / "short" / "step-00000003" / "model.safetensors")
    assert all(torch.equal(first[k], a[k]) for k in a)
    assert [c.out_dir for c in phase_configs(config)] == [str(run / "short"), str(run / "long")]
    assert main(["train", str(path), "--quiet"]) == 0  # both finished: skipped, nothing retrained


def test_progressive_mix_is_the_same_for_any_process_layout(tmp_path):
    shards = TokenShards(make_shards(tmp_path / "s", rows=20, seq_len=32, pad_every=0))
    one = ProgressiveMix(ShardBatches(shards, batch_size=4, seed=1), 0.4, [8, 16])
    two = [ProgressiveMix(ShardBatches(shards, batch_size=4, seed=1, rank=r, world=2), 0.4, [8, 16])
           for r in range(2)]
    assert two[0].world == 2
    for step in range(7):
        docs = torch.cat([m.batch(step)[1] for m in two])
        assert torch.equal(docs, one.batch(step)[1])
