"""`qwen25 sft|rm|dpo|grpo|rejection-sample CONFIG`: each post-training stage from a YAML (or JSON) config.

A config holds the stage's options (the fields of SFTConfig, RMConfig, DPOConfig, GRPOConfig, RejectionConfig;
unknown keys are an error) and `--set key=value` overrides them. GRPO and rejection sampling also take
`reward:`, one of
    {type: task, task: humaneval | path/to/spec.json}     the Task's own check (qwen25.tasks.task)
    {type: reward_model, path: runs/rm/final, threshold?}  a trained reward model (threshold: 1 above it, else 0)
    {type: python, function: "package.module:function"}   any reward_fn(prompts, completions, examples)
A list of such mappings, each with an optional `weight:`, sums the weighted rewards (verifier + reward model).
With a task, `data:` may be left out: the task's examples (with their rendered prompts) are used.
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

from ..utils import add_common_flags, load_config

STAGES = {
    "sft": "supervised fine-tuning on chat data (loss on assistant tokens, packed rows)",
    "rm": "train a reward model (Bradley-Terry) on preference pairs",
    "dpo": "DPO on preference pairs (optionally with the Online Merging Optimizer)",
    "grpo": "GRPO on prompts with verifier / reward-model rewards",
    "rejection-sample": "sample k responses per prompt, keep verified ones as SFT data and DPO pairs",
}


def load_tokenizer(path: str, model: str):
    """The tokenizer of `path`, else of the model directory when it has one, else None (token-id data)."""
    from ..tokenizer import Tokenizer

    for candidate in (path, model):
        if candidate and (Path(candidate) / "tokenizer.json").is_file():
            return Tokenizer.from_dir(candidate)
    if path:
        raise ValueError(f"tokenizer: no tokenizer.json in {path}")
    return None


def build_reward(spec: dict | list, tokenizer=None):
    """(reward_fn, task or None) from a `reward:` mapping, or a list of them each with an optional `weight`
    (their weighted sum; the first task found supplies the examples)."""
    if isinstance(spec, list):
        from .grpo import weighted_rewards

        built = [build_reward({k: v for k, v in s.items() if k != "weight"}, tokenizer) for s in spec]
        tasks = [t for _, t in built if t is not None]
        return (weighted_rewards([f for f, _ in built], [float(s.get("weight", 1.0)) for s in spec]),
                tasks[0] if tasks else None)
    kind = spec.get("type")
    if kind == "task":
        from ..tasks.task import load_task

        task = load_task(spec["task"])
        return task.reward_fn(), task
    if kind == "reward_model":
        from .reward import load_reward_model, reward_fn

        score = reward_fn(load_reward_model(spec["path"]), tokenizer)
        if "threshold" not in spec:
            return score, None
        return (lambda p, c, e: [float(r >= spec["threshold"]) for r in score(p, c, e)]), None
    if kind == "python":
        module, _, name = spec.get("function", "").partition(":")
        if not name:
            raise ValueError("reward type python needs function: 'package.module:function'")
        return getattr(importlib.import_module(module), name), None
    raise ValueError(f"reward: type must be task, reward_model or python, got {kind!r}")


def _examples(cfg, task=None) -> list[dict]:
    from ..utils import read_jsonl

    if cfg.data:
        return read_jsonl(cfg.data)
    if task is not None:
        return task.rl_examples()
    raise ValueError("data: a jsonl file is required")


def _eval_examples(cfg) -> list[dict] | None:
    from ..utils import read_jsonl

    return read_jsonl(cfg.eval_data) if getattr(cfg, "eval_data", "") else None


def run_stage(stage: str, raw: dict, progress: bool = True) -> dict:
    """Run one stage from its config mapping; returns its final metrics (or rejection statistics)."""
    if not raw.get("model"):
        raise ValueError("model: a checkpoint directory (or a preset name for a random start) is required")
    if stage == "sft":
        from .sft import SFTConfig, train_sft

        cfg = SFTConfig.from_dict(raw)
        return train_sft(cfg, _examples(cfg), load_tokenizer(cfg.tokenizer, cfg.model), progress=progress)
    if stage == "rm":
        from .reward import RMConfig, train_reward_model

        cfg = RMConfig.from_dict(raw)
        return train_reward_model(cfg, _examples(cfg), load_tokenizer(cfg.tokenizer, cfg.model),
                                  eval_examples=_eval_examples(cfg), progress=progress)[1]
    if stage == "dpo":
        from .dpo import DPOConfig, train_dpo

        cfg = DPOConfig.from_dict(raw)
        return train_dpo(cfg, _examples(cfg), load_tokenizer(cfg.tokenizer, cfg.model),
                         eval_examples=_eval_examples(cfg), progress=progress)
    if stage == "grpo":
        from .grpo import GRPOConfig, train_grpo

        cfg = GRPOConfig.from_dict(raw)
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        reward, task = build_reward(cfg.reward, tokenizer)
        if task is not None and "chat" not in raw:
            cfg.chat = task.spec.chat
        return train_grpo(cfg, _examples(cfg, task), reward, tokenizer, progress=progress)
    if stage == "rejection-sample":
        from .rejection import RejectionConfig, rejection_sample
        from .runner import load_causal_lm

        cfg = RejectionConfig.from_dict(raw)
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.model)
        reward, task = build_reward(cfg.reward, tokenizer)
        if task is not None and "chat" not in raw:
            cfg.chat = task.spec.chat
        model = load_causal_lm(cfg.model, cfg.seed, cfg.device)
        return rejection_sample(model, _examples(cfg, task), reward, cfg, tokenizer)
    raise ValueError(f"unknown post-training stage {stage!r}")


def cmd_post(args) -> int:
    result = run_stage(args.command, load_config(args.config, args.set), progress=not args.quiet)
    print(json.dumps(result, indent=2))
    return 0


def add_post_commands(subparsers) -> None:
    """Register `qwen25 sft|rm|dpo|grpo|rejection-sample CONFIG`."""
    for name, help_text in STAGES.items():
        p = subparsers.add_parser(name, help=help_text, description=f"{help_text}. {__doc__.splitlines()[0]}",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("config", type=Path, help="YAML or JSON file with the stage's options")
        add_common_flags(p, sets="override an option of the config, e.g. --set lr=1e-6", quiet=True)
        p.set_defaults(func=cmd_post)
