"""Training on token shards: deterministic per-rank batches, doc-id masking, padding never a target."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from qwen25.config import ModelConfig
from qwen25.data.shards import ShardError, ShardWriter, TokenShards
from qwen25.model import CausalLM
from qwen25.train.data import ShardBatches, target_mask
from qwen25.train.loop import TrainConfig, count_targets, lm_loss, train
from qwen25.train.packing import document_ids_from_eos, document_mask, document_positions

EOS = 0


def make_shards(path, rows: int = 48, seq_len: int = 32, vocab: int = 512, seed: int = 0, pad_every: int = 3):
    """A shard set of Markov-chain documents ending in EOS, packed into rows; every pad_every-th row ends in
    padding. Each token is followed by one of two fixed successors, so a model can learn it."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(2, vocab, (vocab, 2), generator=g)
    with ShardWriter(path, seq_len=seq_len, eos_id=EOS, pad_id=1, vocab_size=vocab, rows_per_shard=16) as w:
        for r in range(rows):
            tokens, docs, doc, prev = [], [], 0, int(torch.randint(2, vocab, (1,), generator=g))
            fill = seq_len + 1 - (5 if pad_every and r % pad_every == 0 else 0)
            while len(tokens) < fill:
                n = int(torch.randint(3, 20, (1,), generator=g))
                for i in range(min(n, fill - len(tokens))):
                    prev = EOS if i == n - 1 else int(succ[prev, int(torch.randint(0, 2, (1,), generator=g))])
                    tokens.append(prev)
                    docs.append(doc)
                prev, doc = int(torch.randint(2, vocab, (1,), generator=g)), doc + 1
            tokens += [1] * (seq_len + 1 - len(tokens))
            docs += [-1] * (seq_len + 1 - len(docs))
            w.add(tokens, docs)
    return path


def _model(seed=0):
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=seed)
    return model


def test_batches_are_deterministic_cover_each_epoch_and_split_over_ranks(tmp_path):
    shards = TokenShards(make_shards(tmp_path / "s", rows=20))
    one = ShardBatches(shards, batch_size=4, seed=3)
    seen = [i for step in range(5) for i in one.row_ids(step)]  # 5 steps x 4 rows = one epoch of 20 rows
    assert sorted(seen) == list(range(20))
    second = [i for step in range(5, 10) for i in one.row_ids(step)]
    assert sorted(second) == list(range(20)) and second != seen  # a new order every epoch
    again = ShardBatches(shards, batch_size=4, seed=3)
    for step in (7, 0, 13):
        assert all(torch.equal(a, b) for a, b in zip(again.batch(step), one.batch(step)))
    ranks = [ShardBatches(shards, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(6):
        tokens = torch.cat([r.batch(step)[0] for r in ranks])
        docs = torch.cat([r.batch(step)[1] for r in ranks])
        assert torch.equal(tokens, one.batch(step)[0]) and torch.equal(docs, one.batch(step)[1])
    assert ShardBatches(shards, batch_size=4, seed=4).row_ids(0) != one.row_ids(0)


def test_doc_id_loss_equals_eos_path_on_rows_without_padding(tmp_path):
    shards = TokenShards(make_shards(tmp_path / "s", rows=8, pad_every=0))
    tokens, docs = shards.rows(range(8))
    # Documents end with EOS (a row's last one may be cut), so the shard's doc ids are exactly what the
    # eos-based path derives: equal masks, positions and targets must give an equal loss.
    assert torch.equal(docs, document_ids_from_eos(tokens, EOS)) and docs.max() > 2
    assert bool(target_mask(docs).all())
    model = _model()
    with torch.no_grad():
        assert torch.equal(lm_loss(model, (tokens, docs), None), lm_loss(model, tokens, EOS))
        # and it is not the plain causal loss: the document mask matters
        assert not torch.allclose(lm_loss(model, (tokens, docs), None), lm_loss(model, tokens, None))


def test_padding_is_never_a_target_and_documents_do_not_see_each_other(tmp_path):
    shards = TokenShards(make_shards(tmp_path / "s", rows=6, pad_every=2))
    tokens, docs = shards.rows(range(6))
    assert (docs == -1).any()
    model = _model(1)
    with torch.no_grad():
        loss = lm_loss(model, (tokens, docs), None)
        # Reference: every document run through the model on its own (no mask, positions from 0); a target
        # counts when both it and the token predicting it belong to documents.
        total, count = 0.0, 0
        for row in range(tokens.shape[0]):
            valid = target_mask(docs[row:row + 1])[0]
            for doc in docs[row].unique().tolist():
                if doc < 0:
                    continue
                where = (docs[row, :-1] == doc).nonzero().flatten()
                if where.numel() == 0:
                    continue
                logits = model(tokens[row, where][None])[0]
                ce = F.cross_entropy(logits, tokens[row, where + 1], reduction="none")
                keep = valid[where]
                total, count = total + float(ce[keep].sum()), count + int(keep.sum())
        assert abs(float(loss) - total / count) < 1e-5
        garbage = tokens.clone()
        garbage[docs == -1] = 7  # whatever sits in the padding changes nothing
        assert torch.equal(lm_loss(model, (garbage, docs), None), loss)


def test_loss_mask_keeps_context_tokens_out_of_the_loss(tmp_path):
    """Shards with a loss mask: the batch carries it, and the loss is the mean cross entropy over exactly the
    marked targets (attention and positions unchanged: masked tokens are still context)."""
    plain = TokenShards(make_shards(tmp_path / "s", rows=6, pad_every=2))
    tokens, docs = plain.rows(range(6))
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(tokens.shape, generator=g) < 0.3
    with ShardWriter(tmp_path / "m", seq_len=plain.seq_len, eos_id=EOS, pad_id=1, vocab_size=plain.vocab_size,
                     loss_mask=True) as w:
        for row in range(6):
            w.add(tokens[row], docs[row], mask[row])
    batches = ShardBatches(tmp_path / "m", batch_size=6)
    t, d, m = batches.batch(0)
    order = batches.row_ids(0)
    assert torch.equal(t, tokens[order]) and torch.equal(m, mask[order])
    model = _model(1)
    with torch.no_grad():
        loss = lm_loss(model, (t, d, m), None)
        full = model(t[:, :-1], position_ids=document_positions(d[:, :-1]), mask=document_mask(d[:, :-1]))
        ce = F.cross_entropy(full.transpose(1, 2), t[:, 1:], reduction="none")
        keep = (d[:, :-1] >= 0) & (d[:, 1:] >= 0) & m[:, 1:]
        assert abs(float(loss) - float(ce[keep].mean())) < 1e-5
        assert count_targets((t, d, m)) == int(keep.sum()) < count_targets((t, d))
    with pytest.raises(ShardError, match="loss_mask"):
        ShardWriter(tmp_path / "x", seq_len=4, eos_id=EOS, pad_id=1, vocab_size=9).add([2] * 5, [0] * 5, [1] * 5)


def test_training_from_shard_config_learns_and_logs_mfu(tmp_path):
    data = make_shards(tmp_path / "s", rows=64)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=str(data), model="tiny", steps=40, batch_size=8,
                      seq_len=32, lr=1e-2, warmup=4, dtype="fp32", save_every=100, peak_flops=1e11)
    final = train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] > 5.5  # ~ln 512 = 6.2 at the start
    assert final["loss"] < 3.0  # the two-successor chain: ln 2 = 0.69 per token is the floor
    assert 0 < final["mfu"] < 1 and final["tokens_per_s"] > 0
    saved = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert saved["data"] == str(data) and saved["seq_len"] == 32


def test_moe_router_loss_joins_the_objective_without_padding(tmp_path):
    from qwen25.model.moe import router_loss
    from qwen25.train.loop import build_model, make_data

    data = make_shards(tmp_path / "s", rows=8, pad_every=2)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=str(data), model="tiny-moe", steps=2, batch_size=4,
                      seq_len=32, lr=1e-2, warmup=0, dtype="fp32", save_every=100, peak_flops=1e11)
    train(cfg, progress=False)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    # step 1 ran on the initial weights: its logged router loss is model/moe.py's, padding left out
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    tokens, docs = make_data(cfg).batch(0)
    assert (docs == -1).any()
    with torch.no_grad():
        lm = lm_loss(model, (tokens, docs), None)
        expected = router_loss(model, docs[:, :-1] >= 0)
        unmasked = router_loss(model, None)
    assert first["router_loss"] == pytest.approx(float(expected), rel=1e-6) and float(expected) > 0
    assert float(unmasked) != pytest.approx(float(expected), rel=1e-6)
    assert first["loss"] == pytest.approx(float(lm), rel=1e-6)  # the logged loss is the LM part alone


def test_metrics_go_to_tensorboard_when_it_is_installed(tmp_path, monkeypatch):
    import sys
    import types

    logged = []

    class Writer:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir):
            logged.append(("dir", log_dir))

        def add_scalar(self, tag, value, step):
            logged.append((tag, value, step))

        def close(self):
            logged.append(("closed",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    data = make_shards(tmp_path / "s", rows=8)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=str(data), steps=2, batch_size=2, seq_len=32,
                      dtype="fp32", peak_flops=1e11)
    train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0] == ("dir", str(tmp_path / "run" / "tb")) and logged[-1] == ("closed",)
    assert ("train/loss", lines[1]["loss"], 2) in logged and ("train/mfu", lines[0]["mfu"], 1) in logged


def test_train_command_runs_a_yaml_config_and_names_bad_options(tmp_path, capsys):
    import yaml

    from qwen25.cli import main

    data = make_shards(tmp_path / "s", rows=8)
    config = {"out_dir": str(tmp_path / "run"), "data": str(data), "model": "tiny", "steps": 5, "batch_size": 2,
              "seq_len": 32, "dtype": "fp32", "peak_flops": 1e11}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "train.yaml"), "--quiet", "--set", "steps=2"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 2
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert main(["train", str(tmp_path / "train.yaml"), "--quiet", "--set", "step=3"]) == 2
    assert "unknown training option(s): step" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "train.yaml"), "--quiet", "--set", "seq_len=64"]) == 2
    assert "shards hold rows of seq_len 32" in capsys.readouterr().err


@pytest.mark.slow
def test_compiled_training_follows_the_eager_curve(tmp_path):
    data = make_shards(tmp_path / "s", rows=16)
    curves = []
    for name, compiled in (("eager", False), ("compiled", True)):
        cfg = TrainConfig(out_dir=str(tmp_path / name), data=str(data), steps=3, batch_size=4, seq_len=32,
                          dtype="fp32", peak_flops=1e11, compile=compiled)
        train(cfg, progress=False)
        curves.append([json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()])
    assert curves[0] == pytest.approx(curves[1], rel=1e-4)  # fused kernels reorder fp32 sums, nothing more


def test_yaml_numbers_written_as_strings_are_accepted_and_bad_ones_named():
    import yaml

    cfg = TrainConfig.from_dict(yaml.safe_load("out_dir: x\nlr: 3e-3\ntokens: 1e6\nbatch_size: auto\n"))
    assert (cfg.lr, cfg.tokens, cfg.batch_size) == (0.003, 1_000_000, "auto")
    with pytest.raises(ValueError, match="lr must be a number or auto, got 'fast'"):
        TrainConfig(out_dir="x", lr="fast")
