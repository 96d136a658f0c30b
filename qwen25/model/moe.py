"""Mixture-of-experts MLP blocks (HF ``Qwen2MoeForCausalLM`` layout), routing losses and router statistics.

A sparse block replaces a layer's SwiGLU MLP with:

    p = softmax(gate(x)) in fp32 over all experts;  (w, e) = top-k of p  (w renormalised if norm_topk_prob)
    y = sum_k w_k * experts[e_k](x)  +  sigmoid(shared_expert_gate(x)) * shared_expert(x)

Dispatch is dropless and grouped: the (token, expert) assignments are sorted by expert, each expert runs
once on the contiguous rows of its tokens, and the weighted results are summed back with one index_add.

Every block keeps the router logits of its latest forward (`block.router_logits`, still attached to the
autograd graph), so the training loop needs no extra return value: after ``logits = model(...)`` it adds
``router_loss(model)`` (router_aux_loss_coef x load-balancing loss + router_z_loss_coef x z-loss) to the
language-model loss; ``router_stats(model)`` gives tokens per expert for logs. A dense model gives a zero
loss and empty stats.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..config import ModelConfig
from .layers import MLP


def route(logits: torch.Tensor, top_k: int, norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights, expert ids), each (tokens, top_k): top-k of the fp32 softmax over all experts.

    The weights are renormalised to sum to 1 only when norm_topk_prob (Qwen1.5-MoE and Qwen2-57B do not).
    """
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(order, token_of, counts) for expert ids (tokens, top_k): the (token, slot) assignments sorted by expert
    (stable, so each expert's tokens stay in order), the token of each sorted assignment, and the assignments
    per expert (a host list: the one sync per block)."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    return order, order // experts.shape[1], counts


def grouped_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                    modules: Sequence[nn.Module]) -> torch.Tensor:
    """sum_k weights[t, k] * modules[experts[t, k]](x[t]) for every token t, each expert called once.

    x: (tokens, hidden); experts, weights: (tokens, top_k). The assignments are sorted by expert so that
    every expert sees one contiguous block of rows; experts nobody chose are skipped. The sum over the k
    experts of a token is accumulated in fp32.
    """
    tokens, top_k = experts.shape
    if tokens == 0:
        return torch.zeros_like(x)
    order, token_of, counts = group_by_expert(experts, len(modules))
    rows = x.index_select(0, token_of)
    outputs, start = [], 0
    for module, n in zip(modules, counts):
        if n:
            outputs.append(module(rows[start:start + n]))
            start += n
    out = torch.cat(outputs) * weights.reshape(-1, 1)[order].to(x.dtype)
    acc = torch.promote_types(x.dtype, torch.float32)  # bf16 sums in fp32; fp64 stays fp64
    total = torch.zeros(tokens, x.shape[-1], dtype=acc, device=x.device)
    return total.index_add_(0, token_of, out.to(acc)).to(x.dtype)


class SparseMoeBlock(nn.Module):
    """Router, routed experts and the gated shared expert; names as in HF checkpoints (`mlp.experts.3.up_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_experts, self.top_k, self.norm_topk_prob = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(h, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(h, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        self.shared_expert = MLP(h, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(h, 1, bias=False)
        self.router_logits: torch.Tensor | None = None  # (tokens, experts) of the latest forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape  # (B, T, C)
        x = x.reshape(-1, shape[-1])  # (N = B*T tokens, C)
        logits = self.gate(x)  # (N, experts)
        self.router_logits = logits
        weights, experts = route(logits, self.top_k, self.norm_topk_prob)  # (N, top_k) each
        out = grouped_experts(x, experts, weights, self.experts)  # (N, C)
        out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)  # gate (N, 1)
        return out.view(shape)


# ---- losses and statistics over all sparse layers ----------------------------------------------------------
def sparse_blocks(model: nn.Module) -> list[SparseMoeBlock]:
    """The model's sparse MoE blocks, first layer first (empty for a dense model)."""
    return [m for m in model.modules() if isinstance(m, SparseMoeBlock)]


def _recorded_logits(model: nn.Module) -> list[torch.Tensor]:
    blocks = sparse_blocks(model)
    logits = [b.router_logits for b in blocks]
    if any(x is None for x in logits):
        raise RuntimeError("router logits are recorded by a forward pass: call the model before its router loss")
    return logits


def _token_weights(valid: torch.Tensor | None, rows: int, device) -> torch.Tensor:
    """1.0 for tokens that count, 0.0 for padding; `valid` is (batch, seq) bool or None."""
    if valid is None:
        return torch.ones(rows, device=device)
    w = valid.reshape(-1).to(device=device, dtype=torch.float32)
    if w.numel() != rows:
        raise ValueError(f"valid mask has {w.numel()} tokens but the router saw {rows} per layer")
    return w


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over all layers' tokens: E * sum_e f_e * P_e.

    f_e: share of (token, slot) assignments that went to expert e, summed over the k slots (so sum_e f_e = k);
    P_e: mean router probability of expert e. Both are averaged over every sparse layer's tokens, padding
    (valid False) left out. Uniform routing gives k; it grows as the load concentrates.
    """
    num_experts = router_logits[0].shape[-1]
    chosen = torch.zeros(num_experts, device=router_logits[0].device)
    prob = torch.zeros(num_experts, device=router_logits[0].device)
    count = 0.0
    for logits in router_logits:
        w = _token_weights(valid, logits.shape[0], logits.device)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        picked = torch.topk(probs, top_k, dim=-1).indices
        chosen = chosen + torch.zeros_like(chosen).index_add_(0, picked.reshape(-1), w.repeat_interleave(top_k))
        prob = prob + (probs * w[:, None]).sum(0)
        count = count + w.sum()
    return num_experts * torch.sum((chosen / count) * (prob / count))


def router_z_loss(router_logits: Sequence[torch.Tensor], valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens (all layers, padding left out) of logsumexp(logits)^2."""
    total, count = 0.0, 0.0
    for logits in router_logits:
        w = _token_weights(valid, logits.shape[0], logits.device)
        total = total + (torch.logsumexp(logits.float(), dim=-1).square() * w).sum()
        count = count + w.sum()
    return total / count


def router_aux_loss(model: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
    """The unweighted load-balancing loss of the model's latest forward (transformers' `aux_loss`); 0 if dense."""
    if not sparse_blocks(model):
        return torch.zeros(())
    return load_balancing_loss(_recorded_logits(model), model.config.num_experts_per_tok, valid)


def router_loss(model: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
    """What the training loop adds to the LM loss after a forward: aux_coef * aux (+ z_coef * z-loss).

    valid: (batch, seq) bool, False at padding, as passed to the forward. A dense model gives 0.
    """
    cfg = model.config
    if not sparse_blocks(model):
        return torch.zeros(())
    logits = _recorded_logits(model)
    loss = cfg.router_aux_loss_coef * load_balancing_loss(logits, cfg.num_experts_per_tok, valid)
    if cfg.router_z_loss_coef:
        loss = loss + cfg.router_z_loss_coef * router_z_loss(logits, valid)
    return loss


@torch.no_grad()
def router_stats(model: nn.Module, valid: torch.Tensor | None = None) -> dict:
    """Routing of the latest forward, for training logs: tokens per expert per sparse layer and their spread.

    Keys: tokens_per_expert (one list per sparse layer), load_max / load_min (largest and smallest
    expert load over all layers, as a multiple of the mean load), aux_loss, z_loss, and dropped_tokens
    (always 0: dispatch is dropless, there is no capacity limit). Empty for a dense model.
    """
    if not sparse_blocks(model):
        return {}
    logits = _recorded_logits(model)
    k = model.config.num_experts_per_tok
    per_layer = []
    for layer_logits in logits:
        w = _token_weights(valid, layer_logits.shape[0], layer_logits.device)
        picked = route(layer_logits, k, False)[1]
        picked = picked[w.bool()].reshape(-1)
        per_layer.append(torch.bincount(picked, minlength=layer_logits.shape[-1]))
    loads = torch.stack(per_layer).float()
    relative = loads / loads.mean(dim=1, keepdim=True).clamp_min(1e-9)
    return {"tokens_per_expert": loads.long().tolist(), "load_max": float(relative.max()),
            "load_min": float(relative.min()), "aux_loss": float(load_balancing_loss(logits, k, valid)),
            "z_loss": float(router_z_loss(logits, valid)), "dropped_tokens": 0}
