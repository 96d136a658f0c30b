"""The pre-training loop: learns a generated corpus, survives SIGKILL with an exact resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from qwen25.train.loop import TokenWindows, TrainConfig, train


def markov_corpus(n: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    """Tokens where each token is followed by one of two fixed successors (conditional entropy 1 bit)."""
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(1, vocab, (vocab, 2), generator=g)
    choice = torch.randint(0, 2, (n,), generator=g)
    out = [1]
    for c in choice.tolist()[1:]:
        out.append(int(succ[out[-1], c]))
    return torch.tensor(out)


def unigram_entropy(tokens: torch.Tensor) -> float:
    counts = Counter(tokens.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_loss_falls_well_below_unigram_entropy(tmp_path):
    tokens = markov_corpus(20_000)
    h_unigram = unigram_entropy(tokens)  # ~4.1 nats for this corpus; the true conditional entropy is ln 2 = 0.69
    cfg = TrainConfig(out_dir=str(tmp_path), model="tiny", steps=120, batch_size=8, seq_len=64, lr=1e-2,
                      warmup=10, save_every=1000, dtype="fp32")
    data = TokenWindows(tokens, cfg.batch_size, cfg.seq_len, seed=0)
    final = train(cfg, data, progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert losses[0] > h_unigram - 0.5  # starts near uniform over 512 ids (6.2 nats)
    assert final["loss"] < 0.5 * h_unigram and final["loss"] < 1.5  # learned the successor structure
    assert (tmp_path / "final" / "model.safetensors").is_file()


RUN = textwrap.dedent("""
    import os, signal, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_train_loop import markov_corpus
    from qwen25.train.loop import TokenWindows, TrainConfig, train

    class Data(TokenWindows):
        def batch(self, step):
            if step == int(os.environ.get("KILL_AT", -1)):
                os.kill(os.getpid(), signal.SIGKILL)
            return super().batch(step)

    cfg = TrainConfig(out_dir=sys.argv[1], model="tiny", steps=24, batch_size=4, seq_len=32, lr=1e-2, warmup=4,
                      save_every=5, grad_accum=2, eos_id=0, dtype="bf16")
    train(cfg, Data(markov_corpus(5000), cfg.batch_size, cfg.seq_len, seed=1), progress=False)
""")


def _run(out, kill_at=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["KILL_AT"] = str(kill_at)
    return subprocess.run([sys.executable, "-c", RUN.format(tests=os.path.dirname(__file__)), str(out)],
                          env=env, capture_output=True, text=True)


def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert _run(straight).returncode == 0
    killed = _run(resumed, kill_at=2 * 17)  # micro-batch index of step 17 (grad_accum 2): after the step-15 save
    assert killed.returncode == -9
    assert (resumed / "latest").read_text().strip() == "step-00000015"
    again = _run(resumed)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    curve = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert [m["step"] for m in curve(resumed)] == list(range(1, 25))
    assert [m["loss"] for m in curve(resumed)] == [m["loss"] for m in curve(straight)]


def test_non_finite_losses_are_skipped_then_stop(tmp_path, monkeypatch):
    import pytest

    import qwen25.train.loop as loop

    real = loop.lm_loss
    bad_steps = {3, 4}

    def flaky(model, batch, eos_id):
        loss = real(model, batch, eos_id)
        return loss * float("nan") if flaky.step in bad_steps else loss

    class Data(TokenWindows):
        def batch(self, step):
            flaky.step = step
            return super().batch(step)

    monkeypatch.setattr(loop, "lm_loss", flaky)
    cfg = TrainConfig(out_dir=str(tmp_path / "a"), model="tiny", steps=8, batch_size=2, seq_len=16, dtype="fp32",
                      save_every=100)
    train(cfg, Data(markov_corpus(2000), 2, 16), progress=False)
    steps = [json.loads(x)["step"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 6, 7, 8]  # steps 4 and 5 (0-based 3, 4) skipped, never trained through
    bad_steps.update(range(8))
    cfg = TrainConfig(out_dir=str(tmp_path / "b"), model="tiny", steps=8, batch_size=2, seq_len=16, dtype="fp32",
                      max_bad_steps=3)
    with pytest.raises(RuntimeError, match="3 consecutive non-finite steps"):
        train(cfg, Data(markov_corpus(2000), 2, 16), progress=False)


def test_optimizer_is_fused_adamw_equal_to_the_per_tensor_loop():
    """build_optimizer takes torch's fused AdamW on CPU; a few steps move the weights as the reference loop does."""
    from qwen25.config import ModelConfig
    from qwen25.model import CausalLM
    from qwen25.train.loop import build_optimizer

    cfg = TrainConfig(out_dir="unused", lr=3e-3, weight_decay=0.1)
    models = [CausalLM(ModelConfig.from_preset("tiny")) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], cfg)
    assert fused.defaults["fused"]
    decay = [p for p in models[1].parameters() if p.dim() >= 2]
    no_decay = [p for p in models[1].parameters() if p.dim() < 2]
    loop = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn(a.shape, generator=gen)
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_mfu_counts_the_flops_torch_counts(tmp_path):
    """The MFU the loop logs is flops_per_token(training) x tokens/s / peak, and flops_per_token is what torch's
    FLOP counter sees in one forward + backward: every matmul of the projections, MLP and lm_head exactly, and the
    causal half of the attention's batched matmuls (attention in its math form, which the counter charges for the
    full square of scores)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from qwen25.config import ModelConfig, flops_per_token
    from qwen25.model import CausalLM

    cfg = ModelConfig.from_preset("tiny")
    batch, seq = 2, 64
    model = CausalLM(cfg)
    model.init_weights(seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1))
    counter = FlopCounterMode(display=False)
    with counter, sdpa_kernel(SDPBackend.MATH):
        logits = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1)).backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(by_op) == {"aten.mm", "aten.addmm", "aten.bmm"}
    assert by_op["aten.mm"] + by_op["aten.addmm"] + by_op["aten.bmm"] / 2 == \
        flops_per_token(cfg, seq, training=True) * batch * seq

    train_cfg = TrainConfig(out_dir=str(tmp_path), model="tiny", steps=3, batch_size=4, seq_len=32, lr=1e-3,
                            save_every=1000, dtype="fp32", peak_flops=1e9, tensorboard=False)
    train(train_cfg, TokenWindows(markov_corpus(2000), 4, 32), progress=False)
    for row in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()):
        assert row["mfu"] == pytest.approx(flops_per_token(cfg, 32, training=True) * row["tokens_per_s"] / 1e9, rel=1e-9)


def _small(out, **changes) -> TrainConfig:
    return TrainConfig(**{"out_dir": str(out), "model": "tiny", "steps": 12, "batch_size": 2, "seq_len": 16,
                          "dtype": "fp32", "save_every": 3, "keep_last": 2, "tensorboard": False, **changes})


def _curve(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_damaged_latest_resumes_from_the_newest_intact_checkpoint(tmp_path):
    """`latest` pointing at a truncated or deleted step folder: resume from the newest intact one, say so, and
    end as the uninterrupted run; never restart from step 0 and prune the good ones (issue 28)."""
    data = markov_corpus(3000)
    train(_small(tmp_path / "straight"), TokenWindows(data, 2, 16), progress=False)
    run = tmp_path / "run"
    train(_small(run, stop_at=9), TokenWindows(data, 2, 16), progress=False)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000006", "step-00000009"]
    weights = run / "step-00000009" / "optimizer.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated (a full disk, a copy cut short)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # a line torn by the kill
    with pytest.warns(UserWarning, match=r"latest names step-00000009 \(optimizer.safetensors unreadable.*resuming "
                                         r"from step-00000006"):
        train(_small(run), TokenWindows(data, 2, 16), progress=False)
    assert [m["step"] for m in _curve(run)] == list(range(1, 13))
    assert [m["loss"] for m in _curve(run)] == [m["loss"] for m in _curve(tmp_path / "straight")]
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(run / "step-00000012")  # latest names a folder that is gone, and no other is intact
    (run / "step-00000009" / "state.json").write_text("{")
    with pytest.raises(RuntimeError, match="no intact checkpoint to resume from"):
        train(_small(run), TokenWindows(data, 2, 16), progress=False)


def test_a_changed_config_is_refused_on_resume_unless_allowed(tmp_path, capsys):
    data = markov_corpus(2000)
    train(_small(tmp_path, stop_at=3), TokenWindows(data, 2, 16), progress=False)
    saved = (tmp_path / "train_config.json").read_text()
    for change in ({"seed": 1}, {"lr": 1e-2}, {"steps": 20}, {"batch_size": 4}):
        with pytest.raises(ValueError, match=f"resuming with a changed config \\({next(iter(change))}: "):
            train(_small(tmp_path, **change), TokenWindows(data, 2, 16), progress=False)
        assert (tmp_path / "train_config.json").read_text() == saved  # the record of the run is untouched
    train(_small(tmp_path, stop_at=6, save_every=2, keep_last=1), TokenWindows(data, 2, 16), progress=False)
    train(_small(tmp_path, lr=1e-3, allow_config_change=True), TokenWindows(data, 2, 16), progress=False)
    assert "resuming with a changed config (allowed): lr: 0.003 -> 0.001" in capsys.readouterr().out
    assert json.loads((tmp_path / "train_config.json").read_text())["lr"] == 1e-3
