"""Rejection sampling (the report's SFT data for math and code, and the DPO pairs): sample k responses per prompt,
keep those a verifier accepts, write the kept ones as SFT data and accepted/rejected pairs as DPO data.

The verifier is any reward function `reward_fn(prompts, completions, examples) -> list[float]` (a math answer
check, code unit tests in a sandbox, a Task's reward, or a reward model with a threshold); a response is accepted
when its reward >= `threshold`. Chat prompts ({"prompt": messages or text}) are rendered with the chat format and
responses decoded to text (reward_fn gets text); token prompts ({"prompt_ids": [...]}) stay token ids.
Outputs in out_dir: sft.jsonl (train_sft's format), dpo.jsonl (train_dpo's), rewards.jsonl (every prompt's
k rewards: GRPO can order the same queries by their variance), stats.json (acceptance rates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..generation import QWEN_INSTRUCT_DEFAULTS, Engine, SamplingParams
from .logprobs import _messages, encode_prompt, is_chat_prompt, sampling_vocab_limit, strip_eos
from ..utils import config_from_dict, write_jsonl


@dataclass
class RejectionConfig:
    """Sampling and acceptance settings. Sampling defaults to Qwen2.5-Instruct's (temperature 0.7, top-p 0.8,
    top-k 20) without its repetition penalty, 512 new tokens."""

    out_dir: str = "runs/rejection"
    model: str = ""
    data: str = ""  # jsonl of prompts (+ whatever the verifier needs, e.g. "answer")
    tokenizer: str = ""
    samples_per_prompt: int = 8
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        **{**QWEN_INSTRUCT_DEFAULTS, "repetition_penalty": 1.0}, max_new_tokens=512))  # the seed is set per sample
    vocab_limit: int | None = None
    threshold: float = 1.0  # accept when reward >= threshold (1.0: a binary verifier said "correct")
    max_kept_per_prompt: int = 4  # distinct accepted responses kept for SFT
    pairs_per_prompt: int = 1  # (best accepted, worst rejected) pairs written for DPO
    max_batch: int = 32
    device: str = "cpu"
    seed: int = 0
    chat: bool = True  # text prompts are user turns (False: encoded as they are, for base-model tasks)
    reward: dict | list = field(default_factory=dict)  # CLI only: which reward function(s) (see post/cli.py)

    @classmethod
    def from_dict(cls, raw: dict) -> RejectionConfig:
        return config_from_dict(cls, raw)


def sample(model, prompts: list[list[int]], cfg: RejectionConfig) -> list[list[int]]:
    """samples_per_prompt completions of each prompt (prompt by prompt), each seeded by (seed, index)."""
    k = cfg.samples_per_prompt
    flat = [p for p in prompts for _ in range(k)]
    engine = Engine(model, max_batch=min(cfg.max_batch, len(flat)), vocab_limit=cfg.vocab_limit,
                    max_len=max(len(p) for p in prompts) + cfg.sampling.max_new_tokens + 1)
    params = [replace(cfg.sampling, seed=cfg.seed * 1_000_003 + i) for i in range(len(flat))]
    model.eval()
    return engine.generate(flat, params)


def rejection_sample(model, examples: list[dict], reward_fn, cfg: RejectionConfig, tokenizer=None) -> dict:
    """Sample, verify, and write sft.jsonl / dpo.jsonl / stats.json to cfg.out_dir; returns the stats."""
    prompts = [encode_prompt(e, tokenizer, cfg.chat) for e in examples]
    cfg.vocab_limit = sampling_vocab_limit(cfg.vocab_limit, tokenizer)
    completions = sample(model, prompts, cfg)
    k = cfg.samples_per_prompt
    text = tokenizer is not None  # reward_fn sees text (prompt as the model saw it, reply without its eos)
    flat_examples = [e for e in examples for _ in range(k)]
    texts = [tokenizer.decode(strip_eos(c, cfg.sampling.eos_token_ids)) for c in completions] if text else None
    if text:
        rewards = reward_fn([tokenizer.decode(p) for p in prompts for _ in range(k)], texts, flat_examples)
    else:
        rewards = reward_fn([p for p in prompts for _ in range(k)], completions, flat_examples)
    rewards = [float(r) for r in rewards]
    sft_rows, dpo_rows, accepted_total, solved = [], [], 0, 0
    for i, example in enumerate(examples):
        chat = text and is_chat_prompt(example, cfg.chat)
        group = range(i * k, (i + 1) * k)
        accepted = sorted((j for j in group if rewards[j] >= cfg.threshold), key=lambda j: -rewards[j])
        rejected = sorted((j for j in group if rewards[j] < cfg.threshold), key=lambda j: rewards[j])
        accepted_total += len(accepted)
        solved += bool(accepted)
        seen, distinct = set(), []  # the best-rewarded copy of each distinct accepted response
        for j in accepted:
            if tuple(completions[j]) not in seen:
                seen.add(tuple(completions[j]))
                distinct.append(j)
        for j in distinct[:cfg.max_kept_per_prompt]:
            if chat:
                reply = {"role": "assistant", "content": texts[j]}
                sft_rows.append({"messages": _messages(example["prompt"]) + [reply], "reward": rewards[j]})
            else:
                sft_rows.append({"input_ids": prompts[i] + completions[j], "reward": rewards[j],
                                 "assistant_mask": [0] * len(prompts[i]) + [1] * len(completions[j])})
        for good, bad in list(zip(accepted, rejected))[:cfg.pairs_per_prompt]:
            scores = {"chosen_reward": rewards[good], "rejected_reward": rewards[bad]}
            if chat:
                dpo_rows.append({"prompt": example["prompt"], "chosen": texts[good], "rejected": texts[bad], **scores})
            else:
                dpo_rows.append({"prompt_ids": prompts[i], "chosen_ids": completions[good],
                                 "rejected_ids": completions[bad], **scores})
    out = Path(cfg.out_dir)
    write_jsonl(out / "sft.jsonl", sft_rows)
    write_jsonl(out / "dpo.jsonl", dpo_rows)
    write_jsonl(out / "rewards.jsonl", [{"index": i, "rewards": rewards[i * k:(i + 1) * k]}
                                        for i in range(len(examples))])
    stats = {"prompts": len(examples), "samples": len(completions), "accepted": accepted_total,
             "acceptance_rate": accepted_total / max(1, len(completions)),
             "prompts_solved": solved, "sft_examples": len(sft_rows), "dpo_pairs": len(dpo_rows),
             "mean_reward": sum(rewards) / max(1, len(rewards)),
             "mean_completion_tokens": sum(map(len, completions)) / max(1, len(completions))}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats

