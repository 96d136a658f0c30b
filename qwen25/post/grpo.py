"""Online RL with GRPO (Shao et al. 2024), as in the report: 8 responses per query, queries with higher reward
variance first, rewards from verifiers and/or the reward model.

For a group of G responses to one query with rewards r_i:  A_i = (r_i - mean(r)) / (std(r) + eps)  (std with
Bessel's correction, eps 1e-4, as TRL). Per token t of response i, with rho = pi / pi_old:

    loss_it = -min(rho * A_i, clip(rho, 1 - eps_low, 1 + eps_high) * A_i) + beta * k3,
    k3      = exp(ref - logp) - (ref - logp) - 1        (the k3 estimator of KL(pi || ref))

aggregated as "sequence" (mean over each response's tokens, then over responses: original GRPO, TRL's "grpo"),
"token" (mean over all tokens of the batch: DAPO, TRL's "dapo"/"bnpo" on one device) or "dr_grpo" (sum over all
tokens / (responses * max_completion_length): Dr. GRPO). Groups whose rewards are all equal have zero advantage
and teach nothing: their share is logged (frac_zero_std), and `prioritise` keeps sampling the queries whose
groups disagreed most.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..generation import Engine, SamplingParams
from .logprobs import (encode_prompt, model_token_logprobs, prompt_completion_batch, sampling_vocab_limit,
                       strip_eos)
from .runner import StageConfig, adamw, autocast, frozen_copy, load_causal_lm, run_stage_steps


@dataclass
class GRPOConfig(StageConfig):
    """GRPO options. The report: group size 8, 2048 samples per episode; here the per-step sizes."""

    lr: float = 1e-6
    epochs: float = 1.0
    weight_decay: float = 0.0
    queries_per_step: int = 4
    group_size: int = 8
    # how rollouts sample (temperature, top_p, top_k, max_new_tokens, eos_token_ids); the seed is set per rollout
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0, max_new_tokens=256))
    vocab_limit: int | None = None  # sample only ids below this (a model whose embedding is padded past its vocab)
    beta: float = 0.0  # KL weight (TRL's default 0: no reference model is kept)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    loss_type: str = "token"  # "sequence" (GRPO), "token" (DAPO), "dr_grpo"
    updates_per_rollout: int = 1  # policy updates on each rollout batch (TRL's num_iterations; >1: PPO-style reuse)
    reward_eps: float = 1e-4
    prioritise: bool = True  # queries with higher reward variance first (the report)
    explore: float = 0.25  # share of each step's queries drawn at random when prioritising
    pad_id: int = 0
    chat: bool = True  # text prompts are user turns (False: encoded as they are, for base-model tasks)
    reward: dict | list = field(default_factory=dict)  # CLI only: which reward function(s) (see post/cli.py)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     scale: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, per-response group std) of rewards laid out group by group: (r - group mean) / (std + eps)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    groups = rewards.float().view(-1, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = groups - mean
    if scale:
        adv = adv / (std + eps)
    return adv.reshape(-1), std.expand_as(groups).reshape(-1)


def grpo_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor,
                    ref_logps: torch.Tensor | None = None, beta: float = 0.0, epsilon_low: float = 0.2,
                    epsilon_high: float = 0.2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token loss (B, T), per-token k3 KL or None): clipped ratio objective plus beta * k3."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    loss = -torch.min(ratio * adv, clipped * adv)
    kl = None
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta != 0 needs the reference log-probabilities")
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        loss = loss + beta * kl
    return loss, kl


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str = "token",
              max_completion_length: int | None = None) -> torch.Tensor:
    """Reduce a (B, T) per-token loss over the completion tokens (mask 1): "sequence", "token" or "dr_grpo"."""
    masked = token_loss * mask
    if loss_type == "sequence":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "token":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = max_completion_length or token_loss.shape[1]
        return masked.sum() / (token_loss.shape[0] * length)
    raise ValueError(f"loss_type must be 'sequence', 'token' or 'dr_grpo', got {loss_type!r}")


def prioritise(variances: dict[int, float], num_queries: int, k: int, step: int, seed: int = 0,
               explore: float = 0.0) -> list[int]:
    """The k queries to sample next: never-seen ones first (in a seeded random order), then by the reward
    variance their last group showed, highest first (the report's prioritisation). A share `explore` of the k
    is drawn at random from the rest, so a query whose group once agreed is revisited. Pure in its inputs."""
    order = torch.randperm(num_queries, generator=torch.Generator().manual_seed(seed * 1_000_003 + step)).tolist()
    rank = {q: i for i, q in enumerate(order)}
    ranked = sorted(order, key=lambda q: (q in variances, -variances.get(q, 0.0), rank[q]))
    n_random = min(int(round(explore * k)), k)
    chosen = ranked[:k - n_random]
    rest = [q for q in order if q not in set(chosen)]  # `order` is already a seeded shuffle
    return chosen + rest[:n_random]


def weighted_rewards(functions: list, weights: list[float] | None = None):
    """One reward function from several (verifiers and/or a reward model): the weighted sum of their rewards."""
    weights = weights or [1.0] * len(functions)
    if len(weights) != len(functions):
        raise ValueError(f"{len(functions)} reward functions but {len(weights)} weights")

    def f(prompts, completions, examples) -> list[float]:
        total = [0.0] * len(completions)
        for fn, w in zip(functions, weights):
            total = [t + w * float(r) for t, r in zip(total, fn(prompts, completions, examples))]
        return total
    return f


def rollout(model, prompts: list[list[int]], cfg: GRPOConfig, step: int) -> list[list[int]]:
    """group_size sampled completions per prompt (group by group), seeded by (seed, step, index), sampled with the
    policy's own weights (no copy). A group's prompt is prefilled once (Engine.generate shares it through the
    prefix cache); the engine is built for this rollout, so its cache only holds keys and values of the current
    weights."""
    engine = Engine(model, max_batch=min(64, len(prompts) * cfg.group_size), vocab_limit=cfg.vocab_limit,
                    max_len=max(len(p) for p in prompts) + cfg.sampling.max_new_tokens + 1,
                    prefix_capacity_blocks=sum(len(p) // 16 for p in prompts) + 1)
    flat = [p for p in prompts for _ in range(cfg.group_size)]
    params = [replace(cfg.sampling, seed=cfg.seed * 1_000_003 + step * 4099 + i) for i in range(len(flat))]
    was_training = model.training
    model.eval()
    out = engine.generate(flat, params)
    model.train(was_training)
    return out


def train_grpo(cfg: GRPOConfig, examples: list[dict], reward_fn, tokenizer=None, model=None,
               progress: bool = True, variances: dict[int, float] | None = None) -> dict:
    """GRPO on prompts (examples with "prompt" or "prompt_ids"); reward_fn(prompts, completions, examples).

    Prompts and completions reach reward_fn as text when a tokenizer is given (prompt = rendered chat text),
    else as token-id lists. Metrics per step: loss, reward mean/std, frac_zero_std, clip_ratio, kl, completion
    length. A rollout and its pi_old log-probs live in checkpoints while it is being reused, so resuming is exact.
    `variances` ({query index: reward variance}, e.g. of rejection sampling's responses to the same queries)
    seeds the prioritisation; without it every query is sampled once, in random order, before any is ranked.
    """
    torch.manual_seed(cfg.seed)
    model = model if model is not None else load_causal_lm(cfg.model, cfg.seed, cfg.device)
    ref_model = frozen_copy(model) if cfg.beta != 0.0 else None
    prompts = [encode_prompt(e, tokenizer, cfg.chat) for e in examples]
    cfg.vocab_limit = sampling_vocab_limit(cfg.vocab_limit, tokenizer)
    optimizer = adamw(model, cfg)
    variances = dict(variances or {})  # query -> reward variance of its last group (prioritisation)
    current: dict = {}  # the rollout being trained on (reused for updates_per_rollout steps)
    total = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * len(prompts) / cfg.queries_per_step))

    def sample_and_score(step: int) -> dict:
        """A rollout for step `step`: queries, completions, rewards, advantages (and pi_old when reused)."""
        if cfg.prioritise:
            queries = prioritise(variances, len(prompts), cfg.queries_per_step, step, cfg.seed, cfg.explore)
        else:
            order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
            queries = order[:cfg.queries_per_step].tolist()
        group_prompts = [prompts[q] for q in queries]
        completions = rollout(model, group_prompts, cfg, step)
        flat_prompts = [p for p in group_prompts for _ in range(cfg.group_size)]
        flat_examples = [examples[q] for q in queries for _ in range(cfg.group_size)]
        if tokenizer is not None:
            rewards = reward_fn([tokenizer.decode(p) for p in flat_prompts],
                                [tokenizer.decode(strip_eos(c, cfg.sampling.eos_token_ids)) for c in completions], flat_examples)
        else:
            rewards = reward_fn(flat_prompts, completions, flat_examples)
        rewards = [float(r) for r in rewards]
        _, std = group_advantages(torch.tensor(rewards), cfg.group_size, cfg.reward_eps)
        for i, q in enumerate(queries):
            variances[q] = float(std[i * cfg.group_size] ** 2)
        out = {"step": step, "prompts": flat_prompts, "completions": completions, "rewards": rewards}
        if cfg.updates_per_rollout > 1:  # pi_old: the policy that sampled, fixed across the reuses
            with torch.no_grad(), autocast(cfg):
                batch = prompt_completion_batch(flat_prompts, completions, cfg.pad_id)
                out["old_logps"] = model_token_logprobs(model, batch, cfg.sampling.temperature).float().cpu().tolist()
        return out

    def step_fn(step: int) -> dict:
        rollout_step = step - step % cfg.updates_per_rollout
        if current.get("step") != rollout_step:
            current.clear()
            current.update(sample_and_score(rollout_step))
        rewards = torch.tensor(current["rewards"])
        advantages, std = group_advantages(rewards, cfg.group_size, cfg.reward_eps)
        batch = prompt_completion_batch(current["prompts"], current["completions"], cfg.pad_id).to(cfg.device)
        advantages = advantages.to(cfg.device)
        mask = batch.target_mask
        with autocast(cfg):
            logps = model_token_logprobs(model, batch, cfg.sampling.temperature)
            ref_logps = None
            if ref_model is not None:
                with torch.no_grad():
                    ref_logps = model_token_logprobs(ref_model, batch, cfg.sampling.temperature)
        # With one update per rollout (TRL's default num_iterations=1) pi_old is the current policy: the ratio
        # is 1 in value and clipping only shapes the gradient. Reused rollouts keep the sampling policy's logps.
        old_logps = logps.detach() if "old_logps" not in current else \
            torch.tensor(current["old_logps"], device=logps.device)
        token_loss, kl = grpo_token_loss(logps, old_logps, advantages, ref_logps, cfg.beta,
                                         cfg.epsilon_low, cfg.epsilon_high)
        loss = aggregate(token_loss, mask, cfg.loss_type, cfg.sampling.max_new_tokens)
        loss.backward()
        n_tokens = mask.sum().clamp(min=1.0)
        ratio = torch.exp(logps.detach() - old_logps)
        clipped = ((ratio < 1 - cfg.epsilon_low) & (advantages[:, None] < 0)) | \
            ((ratio > 1 + cfg.epsilon_high) & (advantages[:, None] > 0))
        metrics = {"loss": loss.item(), "reward": rewards.mean().item(), "reward_std": rewards.std().item(),
                   "frac_zero_std": float((std.view(-1, cfg.group_size)[:, 0] < 1e-8).float().mean()),
                   "clip_ratio": float((clipped.float() * mask).sum() / n_tokens),
                   "completion_length": float(mask.sum(-1).mean()), "tokens": int(batch.lengths.sum())}
        if kl is not None:
            metrics["kl"] = float((kl.detach() * mask).sum() / n_tokens)
        return metrics

    def get_state() -> dict:
        return {"variances": {str(k): v for k, v in variances.items()}, "rollout": dict(current)}

    def set_state(saved: dict) -> None:
        variances.update({int(k): v for k, v in saved.get("variances", {}).items()})
        current.update(saved.get("rollout", {}))

    return run_stage_steps(cfg, model, optimizer, step_fn, total, "grpo", progress=progress,
                           state=(get_state, set_state))
