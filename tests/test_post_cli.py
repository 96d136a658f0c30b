"""Rejection sampling (verifier-accepted responses become SFT data, accepted/rejected pairs DPO data, with a
Task's own check as the verifier) and the `qwen25 sft|rm|dpo|grpo|rejection-sample CONFIG` commands."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from post_fixtures import arithmetic_chats, byte_tokenizer, one_thread, separable_pairs  # noqa: F401

from qwen25.cli import main
from qwen25.generation import SamplingParams
from qwen25.model import save_model
from qwen25.post.rejection import RejectionConfig, rejection_sample
from qwen25.post.runner import load_causal_lm
from qwen25.utils import read_jsonl, write_jsonl


def digit7(prompts, completions, examples):
    """Toy verifier on token ids: the share of completion tokens that are 7."""
    return [sum(t == 7 for t in c) / max(1, len(c)) for c in completions]


def _prompts(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_ids": torch.randint(40, 100, (4,), generator=g).tolist()} for _ in range(n)]


def test_rejection_sampling_keeps_only_verified_responses(tmp_path):
    cfg = RejectionConfig(out_dir=str(tmp_path), samples_per_prompt=8, vocab_limit=8,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=4), threshold=0.25,
                          max_kept_per_prompt=8, pairs_per_prompt=2)
    examples = _prompts()
    stats = rejection_sample(load_causal_lm("tiny", 0), examples, digit7, cfg)
    sft, dpo = read_jsonl(tmp_path / "sft.jsonl"), read_jsonl(tmp_path / "dpo.jsonl")
    assert stats["samples"] == 48 and 0 < stats["accepted"] < 48
    assert len(sft) == stats["sft_examples"] > 0 and len(dpo) == stats["dpo_pairs"] > 0
    prompts = [e["prompt_ids"] for e in examples]
    for row in sft:
        cut = row["assistant_mask"].index(1)
        assert row["input_ids"][:cut] in prompts and digit7(None, [row["input_ids"][cut:]], None)[0] >= 0.25
    for row in dpo:
        chosen, rejected = digit7(None, [row["chosen_ids"], row["rejected_ids"]], None)
        assert chosen >= 0.25 > rejected and row["prompt_ids"] in prompts
    again = rejection_sample(load_causal_lm("tiny", 0), examples, digit7,
                             RejectionConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "again")}))
    assert again == stats and read_jsonl(tmp_path / "again" / "sft.jsonl") == sft  # seeded: reproducible


def test_rejection_sampling_with_a_math_task_as_verifier(tmp_path):
    """Chat prompts from a Task; its reward (the math verifier) decides; kept chats are SFT-ready."""
    from qwen25.tasks.task import make_task

    task = make_task({"name": "digits", "kind": "math", "chat": True, "template": "{question}"},
                     examples=[{"question": f"{a}+{b}", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2)]])
    tok = byte_tokenizer()
    cfg = RejectionConfig(out_dir=str(tmp_path), samples_per_prompt=6, vocab_limit=64,
                          sampling=SamplingParams(temperature=1.0, max_new_tokens=3, eos_token_ids=[tok.im_end_id]))
    seen = []

    def verifier(prompts, completions, examples):
        rewards = task.reward_fn()(prompts, completions, examples)
        seen.extend(zip(completions, examples, rewards))
        return rewards

    stats = rejection_sample(load_causal_lm("tiny", 0), task.rl_examples(), verifier, cfg, tok)
    assert stats["samples"] == 18 and len(seen) == 18
    assert all(task.evaluate(e["example"], c) == (r >= 1.0) for c, e, r in seen)
    assert all(isinstance(c, str) and "<|im_end|>" not in c for c, _, _ in seen)
    for row in read_jsonl(tmp_path / "sft.jsonl"):  # anything kept is a correct chat, ready for SFT
        assert row["messages"][-1]["role"] == "assistant" and row["reward"] == 1.0
    # Force acceptance to check the written chats: a verifier that accepts everything.
    rejection_sample(load_causal_lm("tiny", 0), task.rl_examples(), lambda p, c, e: [1.0] * len(c), cfg, tok)
    rows = read_jsonl(tmp_path / "sft.jsonl")
    assert len(rows) >= 3 and rows[0]["messages"][0] == {"role": "user", "content": "1+2"}


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny"
    save_model(load_causal_lm("tiny", 0), path)
    return path


def _config(tmp_path, name, **options):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(options))
    return str(path)


def test_cli_stages_run_from_yaml(tmp_path, tiny_checkpoint, capsys):
    pairs = tmp_path / "pairs.jsonl"
    write_jsonl(pairs, separable_pairs(16, 1))
    common = dict(model=str(tiny_checkpoint), steps=3, batch_size=4, lr=1e-3)
    assert main(["dpo", _config(tmp_path, "dpo", out_dir=str(tmp_path / "dpo"), data=str(pairs),
                                eval_data=str(pairs), **common), "--no-progress"]) == 0
    assert len(read_jsonl(tmp_path / "dpo" / "metrics.jsonl")) == 3
    assert (tmp_path / "dpo" / "eval.json").is_file() and (tmp_path / "dpo" / "final" / "config.json").is_file()

    assert main(["rm", _config(tmp_path, "rm", out_dir=str(tmp_path / "rm"), data=str(pairs), **common),
                 "--no-progress", "--set", "steps=2"]) == 0
    assert len(read_jsonl(tmp_path / "rm" / "metrics.jsonl")) == 2

    sft_data = tmp_path / "sft.jsonl"
    write_jsonl(sft_data, [{"input_ids": list(range(10, 30)), "assistant_mask": [0] * 8 + [1] * 12}] * 4)
    assert main(["sft", _config(tmp_path, "sft", out_dir=str(tmp_path / "sft"), data=str(sft_data),
                                seq_len=64, **common), "--no-progress"]) == 0
    assert read_jsonl(tmp_path / "sft" / "metrics.jsonl")[-1]["assistant_tokens"] > 0

    prompts = tmp_path / "prompts.jsonl"
    write_jsonl(prompts, _prompts(4))
    reward = {"type": "python", "function": "test_post_cli:digit7"}
    assert main(["grpo", _config(tmp_path, "grpo", out_dir=str(tmp_path / "grpo"), data=str(prompts),
                                 reward=reward, queries_per_step=2, group_size=4, sampling={"max_new_tokens": 3},
                                 vocab_limit=16,
                                 **common), "--no-progress"]) == 0
    assert "reward" in read_jsonl(tmp_path / "grpo" / "metrics.jsonl")[-1]
    assert main(["rejection-sample", _config(tmp_path, "rs", out_dir=str(tmp_path / "rs"), data=str(prompts),
                                             model=str(tiny_checkpoint), reward=reward, samples_per_prompt=4,
                                             sampling={"max_new_tokens": 3}, vocab_limit=8, threshold=0.3)]) == 0
    stats = json.loads((tmp_path / "rs" / "stats.json").read_text())
    assert stats["samples"] == 16
    # A list of rewards is their weighted sum: 2 * r - r = r gives the same run.
    twice = [{**reward, "weight": 2.0}, {**reward, "weight": -1.0}]
    assert main(["rejection-sample", _config(tmp_path, "rs2", out_dir=str(tmp_path / "rs2"), data=str(prompts),
                                             model=str(tiny_checkpoint), reward=twice, samples_per_prompt=4,
                                             sampling={"max_new_tokens": 3}, vocab_limit=8, threshold=0.3)]) == 0
    assert json.loads((tmp_path / "rs2" / "stats.json").read_text()) == stats
    capsys.readouterr()


def test_cli_errors_name_the_problem(tmp_path, tiny_checkpoint, capsys):
    bad = _config(tmp_path, "bad", model=str(tiny_checkpoint), learning_rate=1)
    assert main(["dpo", bad]) != 0
    assert "unknown DPOConfig option(s): learning_rate" in capsys.readouterr().err
    assert main(["sft", _config(tmp_path, "nomodel", data="x.jsonl")]) != 0
    assert "model: a checkpoint directory" in capsys.readouterr().err
    no_reward = _config(tmp_path, "nr", model=str(tiny_checkpoint), data="x.jsonl", reward={"type": "oracle"})
    assert main(["grpo", no_reward]) != 0
    assert "reward: type must be task, reward_model or python" in capsys.readouterr().err


def test_cli_chat_stages_with_the_checkpoints_tokenizer_and_a_task(tmp_path, tiny_checkpoint, capsys):
    """A BBPE vocabulary trained into the checkpoint directory: `qwen25 sft` on chat jsonl, then
    `qwen25 rejection-sample` and `qwen25 grpo` with a math task spec (its data and its verifier)."""
    from qwen25.tokenizer import train_tokenizer

    chats = arithmetic_chats(12, 0)
    train_tokenizer([json.dumps(c) for c in chats] * 4, vocab_size=300, out_dir=tiny_checkpoint)
    data = tmp_path / "chats.jsonl"
    write_jsonl(data, [{"messages": c["messages"]} for c in chats])
    assert main(["sft", _config(tmp_path, "sft", model=str(tiny_checkpoint), data=str(data),
                                out_dir=str(tmp_path / "sft"), steps=2, batch_size=2, seq_len=256, lr=1e-3),
                 "--no-progress"]) == 0
    assert read_jsonl(tmp_path / "sft" / "metrics.jsonl")[-1]["assistant_tokens"] > 0

    write_jsonl(tmp_path / "math.jsonl", [{"question": "1+2", "answer": "3"}, {"question": "2+2", "answer": "4"}])
    (tmp_path / "math.json").write_text(json.dumps({"name": "sums", "kind": "math", "data": "math.jsonl",
                                                    "chat": True, "template": "{question}"}))
    reward = {"type": "task", "task": str(tmp_path / "math.json")}
    assert main(["rejection-sample", _config(tmp_path, "rs", model=str(tiny_checkpoint), reward=reward,
                                             out_dir=str(tmp_path / "rs"), samples_per_prompt=3,
                                             sampling={"max_new_tokens": 4})]) == 0
    assert json.loads((tmp_path / "rs" / "stats.json").read_text())["samples"] == 6
    assert main(["grpo", _config(tmp_path, "grpo", model=str(tiny_checkpoint), reward=reward,
                                 out_dir=str(tmp_path / "g"), steps=1, queries_per_step=2, group_size=2,
                                 sampling={"max_new_tokens": 4}, lr=1e-3), "--no-progress"]) == 0
    assert read_jsonl(tmp_path / "g" / "metrics.jsonl")[0]["completion_length"] > 0
    capsys.readouterr()
