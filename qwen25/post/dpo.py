"""Offline RL with DPO (Rafailov et al. 2023), as in the report: ~150k pairs, 1 epoch, lr 7e-7, with the Online
Merging Optimizer (merging.py) or plain AdamW.

    loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])

with log-probabilities summed over the completion tokens. Metrics are TRL's: rewards/chosen and rewards/rejected
(beta * log-ratio, batch means), rewards/accuracies (share of pairs whose chosen reward is higher) and
rewards/margins. The reference is the starting (SFT) policy, frozen; with precompute_ref its log-probabilities
are computed once for the whole data set and the reference model is freed before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .logprobs import encode_pair, pair_batch, sequence_logprobs
from .merging import OnlineMergingOptimizer, sft_delta
from .runner import StageConfig, adamw, autocast, example_indices, frozen_copy, load_causal_lm, run_stage_steps


@dataclass
class DPOConfig(StageConfig):
    """DPO options; defaults from the report (lr 7e-7, 1 epoch) and TRL (beta 0.1, no weight decay)."""

    lr: float = 7e-7
    epochs: float = 1.0
    weight_decay: float = 0.0
    beta: float = 0.1
    # TRL's rpo_alpha (RPO, Pang et al. 2024): + rpo_alpha x the chosen responses' mean token NLL, which keeps
    # what the chosen responses share with the rejected (e.g. copying a result into the final answer) from being
    # pushed down with them
    rpo_alpha: float = 0.0
    precompute_ref: bool = True
    pad_id: int = 0
    eval_data: str = ""  # held-out pairs (jsonl) scored at the end into eval.json
    # Online merging: `model` is the SFT policy, `base_model` the model SFT started from (tau = sft - base).
    merge: str = "none"  # "none" (plain AdamW), "dare" (OnDARE) or "ties" (OnTIES)
    base_model: str = ""
    merge_weight: float = 1e-6
    merge_keep: float = 0.01
    merge_every: int = 1


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """Sigmoid DPO loss (mean over pairs) and its metrics, from (B,) summed completion log-probabilities."""
    chosen_logratios = policy_chosen - ref_chosen
    rejected_logratios = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios)).mean()
    chosen_rewards = beta * chosen_logratios.detach()
    rejected_rewards = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": policy_chosen.detach().mean().item(),
        "logps/rejected": policy_rejected.detach().mean().item(),
    }
    return loss, metrics


@torch.no_grad()
def reference_logprobs(ref_model, pairs: list[tuple], batch_size: int = 8, pad_id: int = 0) -> torch.Tensor:
    """(N, 2) summed completion log-probabilities [chosen, rejected] of every pair under the reference."""
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        logps = sequence_logprobs(ref_model, pair_batch(chunk, pad_id)).float().cpu()
        out.append(torch.stack(logps.chunk(2), dim=1))
    return torch.cat(out)


@torch.no_grad()
def evaluate_pairs(model, pairs: list[tuple], ref_logps: torch.Tensor, beta: float = 0.1, batch_size: int = 8,
                   pad_id: int = 0) -> dict[str, float]:
    """DPO loss and reward metrics of `model` over held-out pairs, given their (N, 2) reference log-probabilities;
    rewards/accuracies is the preference accuracy."""
    was_training = model.training
    model.eval()
    policy = reference_logprobs(model, pairs, batch_size, pad_id)
    model.train(was_training)
    loss, metrics = dpo_loss(policy[:, 0], policy[:, 1], ref_logps[:, 0], ref_logps[:, 1], beta)
    return {"loss": loss.item(), **metrics, "pairs": len(pairs)}


def build_optimizer(cfg: DPOConfig, model):
    """Plain AdamW, or AdamW wrapped by the Online Merging Optimizer with tau = model - base_model."""
    optimizer = adamw(model, cfg)
    if cfg.merge == "none":
        return optimizer
    if not cfg.base_model:
        raise ValueError(f"merge={cfg.merge!r} needs base_model: the checkpoint SFT started from")
    tau = sft_delta(model, load_causal_lm(cfg.base_model, cfg.seed, cfg.device))
    deltas = {p: tau[name] for name, p in model.named_parameters() if p.requires_grad}
    return OnlineMergingOptimizer(optimizer, deltas, cfg.merge, cfg.merge_weight, cfg.merge_keep, cfg.merge_every,
                                  seed=cfg.seed)


def train_dpo(cfg: DPOConfig, examples: list[dict], tokenizer=None, model=None, eval_examples=None,
              progress: bool = True) -> dict:
    """Train on preference pairs; writes metrics.jsonl, checkpoints, final/ and (with held-out pairs) eval.json."""
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_causal_lm(cfg.model, cfg.seed, cfg.device)
    ref_model = frozen_copy(model)
    pairs = [encode_pair(e, tokenizer) for e in examples]
    held_out = [encode_pair(e, tokenizer) for e in eval_examples or []]
    held_ref = reference_logprobs(ref_model, held_out, cfg.batch_size, cfg.pad_id) if held_out else None
    ref_logps = None
    if cfg.precompute_ref:
        ref_logps = reference_logprobs(ref_model, pairs, cfg.batch_size, cfg.pad_id)
        ref_model = None  # only the numbers are needed from here on: free the reference's memory
    optimizer = build_optimizer(cfg, model)

    def step_fn(step: int) -> dict:
        idx = example_indices(step, cfg.batch_size, len(pairs), cfg.seed)
        batch = pair_batch([pairs[i] for i in idx], cfg.pad_id)
        with autocast(cfg):
            policy = sequence_logprobs(model, batch)
        chosen, rejected = policy.chunk(2)
        if ref_logps is not None:
            ref_chosen, ref_rejected = ref_logps[idx, 0].to(chosen.device), ref_logps[idx, 1].to(chosen.device)
        else:
            with torch.no_grad(), autocast(cfg):
                ref_chosen, ref_rejected = sequence_logprobs(ref_model, batch).chunk(2)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta)
        if cfg.rpo_alpha:
            nll = -chosen.sum() / batch.target_mask[:len(idx)].sum().clamp(min=1.0).to(chosen.device)
            loss = loss + cfg.rpo_alpha * nll
            metrics["nll_loss"] = nll.item()
        loss.backward()
        return {"loss": loss.item(), **metrics, "tokens": int(batch.lengths.sum())}

    metrics = run_stage_steps(cfg, model, optimizer, step_fn, cfg.total_steps(len(pairs)), "dpo", progress=progress)
    if held_out:
        result = evaluate_pairs(model, held_out, held_ref, cfg.beta, cfg.batch_size, cfg.pad_id)
        Path(cfg.out_dir, "eval.json").write_text(json.dumps(result, indent=2) + "\n")
        metrics = {**metrics, **{f"eval/{k}": v for k, v in result.items()}}
    return metrics
