"""Training checkpoints: exact resume, atomic saves, keep-last-N — without pickles."""

from __future__ import annotations

import os

import pytest
import torch

import qwen25.train.checkpoint as ckpt
from qwen25.config import ModelConfig
from qwen25.model import CausalLM
from qwen25.train.checkpoint import latest_checkpoint, load_training_state, save_training_state


def _setup(seed=0):
    torch.manual_seed(seed)
    model = CausalLM(ModelConfig.from_preset("tiny"))
    model.init_weights(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    return model, opt


def _train(model, opt, steps):
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 17))  # uses the global RNG: resume must restore it
        logits = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_is_bitwise_equal(tmp_path):
    model, opt = _setup()
    straight = _train(model, opt, 8)
    final = {n: p.detach().clone() for n, p in model.named_parameters()}

    model, opt = _setup()
    first = _train(model, opt, 5)
    save_training_state(tmp_path, 5, model, opt, data_state={"position": 5})
    del model, opt
    torch.manual_seed(999)  # whatever happened since, the checkpoint's RNG state wins
    model, opt = _setup(seed=1)  # different weights: all of them must be overwritten
    state = load_training_state(latest_checkpoint(tmp_path), model, opt)
    assert state["step"] == 5 and state["data"] == {"position": 5}
    rest = _train(model, opt, 3)
    assert first + rest == straight
    for n, p in model.named_parameters():
        assert torch.equal(p, final[n]), n


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model, opt = _setup()
    _train(model, opt, 2)
    good = save_training_state(tmp_path, 2, model, opt)
    _train(model, opt, 2)
    real = ckpt.save_file

    def failing(tensors, path, *a, **k):
        if str(path).endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        save_training_state(tmp_path, 4, model, opt)
    assert latest_checkpoint(tmp_path) == good
    assert not (tmp_path / "step-00000004").exists()
    fresh, fresh_opt = _setup(seed=3)
    assert load_training_state(good, fresh, fresh_opt)["step"] == 2


def test_keep_last_n(tmp_path):
    model, opt = _setup()
    for step in range(1, 6):
        _train(model, opt, 1)
        save_training_state(tmp_path, step, model, opt, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path).name == "step-00000005"
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin"))  # no pickles anywhere


def test_mismatched_model_is_refused(tmp_path):
    model, opt = _setup()
    _train(model, opt, 1)
    save_training_state(tmp_path, 1, model, opt)
    other = CausalLM(ModelConfig.from_preset("tiny", num_hidden_layers=3))
    with pytest.raises(ValueError, match=r"does not match the model \(missing \['model\.layers\.2"):
        load_training_state(latest_checkpoint(tmp_path), other, torch.optim.AdamW(other.parameters()))


def test_dcp_checkpoints_load_without_arbitrary_unpickling(tmp_path):
    """DCP's .metadata and non-tensor values are pickles: a planted one must not run code (issue 28), while a
    real DCP folder (tensors + optimizer hyper-parameters) still loads exactly."""
    import io
    import pickle
    import warnings

    import torch.distributed.checkpoint as dcp

    from qwen25.train.distributed import _safe_reader_and_planner

    state = {"w": torch.randn(4, 3), "opt": {"lr": 3e-3, "betas": (0.9, 0.95), "step": torch.tensor(7.0),
                                             "amsgrad": False, "name": None}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DCP warns that no process group is initialised
        dcp.save(state, checkpoint_id=str(tmp_path / "ok"))
        target = {"w": torch.zeros(4, 3), "opt": {"lr": 0.0, "betas": (0.0, 0.0), "step": torch.tensor(0.0),
                                                  "amsgrad": True, "name": "x"}}
        reader, planner = _safe_reader_and_planner(tmp_path / "ok")
        dcp.load(target, storage_reader=reader, planner=planner)
    assert torch.equal(target["w"], state["w"]) and target["opt"]["lr"] == 3e-3
    assert tuple(target["opt"]["betas"]) == (0.9, 0.95) and target["opt"]["step"].item() == 7.0
    assert target["opt"]["amsgrad"] is False and target["opt"]["name"] is None

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / ".metadata").write_bytes(pickle.dumps(Exploit()))
    reader, _ = _safe_reader_and_planner(tmp_path / "bad")
    with pytest.raises(ValueError, match=r"\.metadata: DCP metadata names (posix|os)\.system.*refused"):
        reader.read_metadata()
    assert not (tmp_path / "pwned").exists()
    # a planted pickle among the values (optimizer hyper-parameters) is refused by weights_only loading
    planner = _safe_reader_and_planner(tmp_path / "ok")[1]
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        planner.load_bytes(None, io.BytesIO(pickle.dumps(Exploit())))
    assert not (tmp_path / "pwned").exists()


def test_pruning_never_removes_later_steps(tmp_path):
    model, opt = _setup()
    for step in (1, 2, 3, 4, 5):
        save_training_state(tmp_path, step, model, opt, keep_last=2)
    save_training_state(tmp_path, 2, model, opt, keep_last=2)  # a run resumed from an older checkpoint
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000005"]
    assert latest_checkpoint(tmp_path).name == "step-00000002"
