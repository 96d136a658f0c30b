"""Document-masked packing and the learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from qwen25.config import ModelConfig
from qwen25.model import CausalLM
from qwen25.train.packing import document_ids_from_eos, document_mask, document_positions
from qwen25.train.schedule import lr_at


def test_document_ids_positions_and_mask():
    tokens = torch.tensor([[5, 6, 0, 7, 8, 9, 0, 4]])
    ids = document_ids_from_eos(tokens, eos_id=0)
    assert ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    mask = document_mask(ids)[0, 0]
    for i in range(8):
        for j in range(8):
            assert bool(mask[i, j]) == (j <= i and ids[0, i] == ids[0, j])


def test_loss_of_a_document_ignores_its_neighbours():
    cfg = ModelConfig.from_preset("tiny")
    model = CausalLM(cfg).eval()
    model.init_weights(seed=0)
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(1, cfg.vocab_size, (12,), generator=g)
    other = torch.randint(1, cfg.vocab_size, (9,), generator=g)
    packed = torch.cat([other, doc])[None]
    ids = torch.tensor([[0] * 9 + [1] * 12])
    with torch.no_grad():
        alone = model(doc[None])
        together = model(packed, position_ids=document_positions(ids), mask=document_mask(ids))
    torch.testing.assert_close(together[0, 9:], alone[0], atol=1e-5, rtol=0)
    # without the document mask the neighbour does leak in
    with torch.no_grad():
        leaky = model(packed, position_ids=document_positions(ids))
    assert (leaky[0, 9:] - alone[0]).abs().max() > 1e-3


def test_schedule_equals_transformers_cosine_with_floor():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=3e-4)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=10, num_training_steps=100,
                                                        min_lr_rate=0.1)
    for step in range(100):
        assert lr_at(step, 3e-4, 10, 100) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9, abs=1e-15)
        opt.step()
        sched.step()
    assert lr_at(100, 3e-4, 10, 100) == pytest.approx(3e-5)
    assert lr_at(500, 3e-4, 10, 100) == pytest.approx(3e-5)
