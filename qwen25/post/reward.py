"""The reward model: the decoder with a scalar head, trained with the Bradley-Terry loss on preference pairs.

    loss = -log sigmoid(r(y_w) - r(y_l) - margin)      (margin optional, per pair; TRL's RewardTrainer)

The reward of a sequence is the head's output at its last token (right-padded batches, so no mask is needed).
Saved in the layout of transformers' Qwen2ForSequenceClassification (model.*, score.weight, num_labels 1),
so the official tooling can load it. `reward_fn(...)` turns a trained model into the reward-function interface
that rejection sampling and GRPO take: reward_fn(prompts, completions, examples) -> list[float].
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig
from ..model import CausalLM
from .logprobs import Batch, encode_pair, pad_batch, pair_batch
from ..utils import read_jsonl
from .runner import StageConfig, adamw, autocast, example_indices, load_causal_lm, run_stage_steps


class RewardModel(nn.Module):
    """A Qwen2.5 decoder and a bias-free linear `score` head read at each sequence's last token.

    Built from a CausalLM, whose lm_head it removes (the decoder is shared, not copied)."""

    def __init__(self, lm: CausalLM):
        super().__init__()
        self.config = lm.config
        del lm.lm_head  # the head is replaced by `score`; forward asks the decoder for hidden states only
        self.lm = lm
        self.score = nn.Linear(lm.config.hidden_size, 1, bias=False)
        nn.init.normal_(self.score.weight, std=lm.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) rewards of right-padded rows of `lengths` tokens (default: full rows)."""
        hidden = self.lm(input_ids, return_hidden=True)
        if lengths is None:
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1], device=input_ids.device)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths.to(hidden.device) - 1]
        return self.score(last).squeeze(-1).float()

    def rewards(self, batch: Batch) -> torch.Tensor:
        """(B,) rewards of a right-padded Batch (moved to the model's device)."""
        batch = batch.to(self.score.weight.device)
        return self(batch.input_ids, batch.lengths)


def save_reward_model(rm: RewardModel, directory: str | Path) -> Path:
    """HF Qwen2ForSequenceClassification layout: config.json (num_labels 1) + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name.removeprefix("lm."): t.detach().cpu().contiguous() for name, t in rm.state_dict().items()}
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    raw = rm.config.to_hf_dict()
    raw.update(architectures=["Qwen2ForSequenceClassification"], num_labels=1,
               id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    (directory / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return directory


def load_reward_model(directory: str | Path) -> RewardModel:
    """A reward model saved by save_reward_model (or by transformers as Qwen2ForSequenceClassification)."""
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    for key in ("num_labels", "id2label", "label2id"):  # the classification head's, not the decoder's
        raw.pop(key, None)
    rm = RewardModel(CausalLM(ModelConfig.from_hf_dict(raw, source=str(directory / "config.json"))))
    tensors = {("lm." + k if k.startswith("model.") else k): v.float()
               for k, v in load_file(directory / "model.safetensors").items()}
    missing, unexpected = rm.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: not a reward model checkpoint (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    return rm.eval()


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor,
                       margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(r_w - r_l [- margin]) averaged over pairs, and TRL's metrics (accuracy, margin, rewards)."""
    diff = chosen - rejected
    loss = -F.logsigmoid(diff if margin is None else diff - margin).mean()
    both = torch.cat([chosen, rejected]).detach()
    metrics = {"accuracy": (chosen > rejected).float().mean().item(), "margin": diff.detach().mean().item(),
               "mean_reward": both.mean().item(), "min_reward": both.min().item(), "max_reward": both.max().item()}
    return loss, metrics


@dataclass
class RMConfig(StageConfig):
    """Reward-model options (the report gives no RM hyper-parameters: one epoch at the SFT learning rate)."""

    epochs: float = 1.0
    pad_id: int = 0
    eval_data: str = ""  # held-out pairs (jsonl): accuracy written to eval.json


def _margins(examples: list[dict], idx: list[int]) -> torch.Tensor | None:
    if not any("margin" in examples[i] for i in idx):
        return None
    return torch.tensor([float(examples[i].get("margin", 0.0)) for i in idx])


@torch.no_grad()
def evaluate_reward_model(rm: RewardModel, pairs: list[tuple], examples: list[dict] | None = None,
                          batch_size: int = 8, pad_id: int = 0) -> dict[str, float]:
    """Bradley-Terry loss and accuracy (share of pairs ranked right) over held-out encoded pairs."""
    was_training = rm.training
    rm.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = rm.rewards(pair_batch(pairs[i:i + batch_size], pad_id)).chunk(2)
        chosen.append(c)
        rejected.append(r)
    rm.train(was_training)
    margin = _margins(examples, list(range(len(pairs)))) if examples else None
    chosen, rejected = torch.cat(chosen).cpu(), torch.cat(rejected).cpu()
    loss, metrics = bradley_terry_loss(chosen, rejected, margin)
    return {"loss": loss.item(), **metrics, "pairs": len(pairs)}


def train_reward_model(cfg: RMConfig, examples: list[dict], tokenizer=None, model: CausalLM | None = None,
                       eval_examples: list[dict] | None = None, progress: bool = True) -> tuple[RewardModel, dict]:
    """Train a reward model on preference pairs (chat or pre-tokenized, optional "margin"); returns it and metrics."""
    torch.manual_seed(cfg.seed)
    rm = RewardModel(model if model is not None else load_causal_lm(cfg.model, cfg.seed, cfg.device))
    pairs = [encode_pair(e, tokenizer) for e in examples]
    optimizer = adamw(rm, cfg)

    def step_fn(step: int) -> dict:
        idx = example_indices(step, cfg.batch_size, len(pairs), cfg.seed)
        batch = pair_batch([pairs[i] for i in idx], cfg.pad_id)
        with autocast(cfg):
            chosen, rejected = rm.rewards(batch).chunk(2)
        margin = _margins(examples, idx)
        loss, metrics = bradley_terry_loss(chosen, rejected, None if margin is None else margin.to(chosen.device))
        loss.backward()
        return {"loss": loss.item(), **metrics, "tokens": int(batch.lengths.sum())}

    metrics = run_stage_steps(cfg, rm, optimizer, step_fn, cfg.total_steps(len(pairs)), "rm",
                        save_final=lambda path: save_reward_model(rm, path), progress=progress)
    if eval_examples:
        held = [encode_pair(e, tokenizer) for e in eval_examples]
        result = evaluate_reward_model(rm, held, eval_examples, cfg.batch_size, cfg.pad_id)
        Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        metrics = {**metrics, **{f"eval/{k}": v for k, v in result.items()}}
    return rm, metrics


@torch.no_grad()
def score(rm: RewardModel, prompts: list[list[int]], completions: list[list[int]], batch_size: int = 8,
          pad_id: int = 0) -> list[float]:
    """Rewards of prompt + completion token sequences."""
    rm.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [p + c for p, c in zip(prompts[i:i + batch_size], completions[i:i + batch_size])]
        batch = pad_batch(rows, [[1] * len(r) for r in rows], pad_id)
        out += rm.rewards(batch).cpu().tolist()
    return out


def reward_fn(rm: RewardModel, tokenizer=None, batch_size: int = 8):
    """The reward-function interface over a reward model.

    Called as f(prompts, completions, examples): token-id lists are scored as they are; with a tokenizer, texts
    are encoded (prompt text should be the rendered chat prompt, completion the assistant's reply; after a chat
    prompt the reply gets its turn's closing "<|im_end|>\n", as in training, since the score is read at the last
    token).
    """
    def f(prompts, completions, examples=None) -> list[float]:
        if tokenizer is not None and prompts and isinstance(prompts[0], str):
            ends = ["<|im_end|>\n" if p.endswith("<|im_start|>assistant\n") else "" for p in prompts]
            prompts = [tokenizer.encode(p) for p in prompts]
            completions = [tokenizer.encode(c + end) for c, end in zip(completions, ends)]
        return score(rm, prompts, completions, batch_size)
    return f


def load_pairs(path: str) -> list[dict]:
    """Preference pairs from jsonl: {"prompt", "chosen", "rejected", "margin"?} or *_ids fields."""
    rows = read_jsonl(path)
    for i, row in enumerate(rows):
        if not ({"chosen", "rejected"} <= set(row) or {"chosen_ids", "rejected_ids"} <= set(row)):
            raise ValueError(f"{path}: pair {i} needs chosen/rejected (or chosen_ids/rejected_ids)")
    return rows
