"""The Online Merging Optimizer (Lu et al. 2024, "Online Merging Optimizers for Boosting Rewards and Mitigating
Tax in Alignment"), wrapping AdamW, used by the report for DPO.

Every optimizer step merges AdamW's update d (theta_after - theta_before) with the SFT delta
tau = theta_sft - theta_base, so RLHF keeps pulling toward what SFT learned (less alignment tax):

    OnDARE:  theta = theta_before + (1 - a) * F(d) + a * F(tau),  F(x) = x * Bernoulli(p) / p  (random keep-p mask)
    OnTIES:  d' = top-p(d), tau' = top-p(tau) (magnitude masks); keep the entries of each whose sign agrees with
             sign(d' + tau') (ties count as +); theta = theta_before + (1 - a) * d'' + a * tau''

p is the reserve (keep) rate, 0.01 in the paper; a the merge weight, ~1e-7 .. 5e-6. With merge_every = K > 1,
K - 1 plain AdamW steps accumulate and the K-th merges the whole accumulated update (the published step-K code
returns after the first parameter, so it only ever updates one; here every parameter is processed).
OnDARE with a = 0 and p = 1 is AdamW exactly: the merged step is written as
theta_after + ((1 - a) * F(d) - d) + a * F(tau), whose correction is exactly zero then.
Masks are drawn from generators seeded by (seed, step, parameter index), so a resumed run draws the same ones.
"""

from __future__ import annotations

import torch


def sft_delta(sft_model: torch.nn.Module, base_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """tau = theta_sft - theta_base for every parameter name (the two models must have the same shapes)."""
    base = dict(base_model.named_parameters())
    delta = {}
    for name, p in sft_model.named_parameters():
        if name not in base or base[name].shape != p.shape:
            raise ValueError(f"SFT and base models differ at {name}")
        delta[name] = (p.detach().float() - base[name].detach().float()).to(p.dtype)
    return delta


def dare(x: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random keep-`keep` mask rescaled by 1 / keep (DARE): E[dare(x)] = x."""
    if keep >= 1.0:
        return x
    mask = torch.rand(x.shape, generator=generator, device=x.device) < keep
    return x * mask / keep


def top_magnitude(x: torch.Tensor, keep: float) -> torch.Tensor:
    """x with all but its int(keep * numel) largest-magnitude entries zeroed (TIES trimming; at least one kept)."""
    if keep >= 1.0:
        return x
    k = max(1, int(keep * x.numel()))
    flat = x.reshape(-1).abs()
    threshold = torch.topk(flat, k).values[-1]
    return x * (x.abs() >= threshold)


def ties_merge(update: torch.Tensor, tau: torch.Tensor, weight: float) -> torch.Tensor:
    """Sign consensus of two (already trimmed) deltas, then (1 - weight) * update + weight * tau."""
    majority = torch.where(update + tau >= 0, 1.0, -1.0).to(update.dtype)
    agree_u = torch.sign(update) == majority
    agree_t = torch.sign(tau) == majority
    return (1 - weight) * update * agree_u + weight * tau * agree_t


class OnlineMergingOptimizer:
    """AdamW whose every (or every K-th) step is merged with the SFT delta: OnDARE ("dare") or OnTIES ("ties").

    optimizer: the AdamW to wrap (its param_groups and state are this object's, so checkpoints save them).
    deltas: {parameter: tau} for the parameters to merge (others get plain AdamW steps).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, deltas: dict[torch.nn.Parameter, torch.Tensor],
                 method: str = "dare", merge_weight: float = 1e-6, keep: float = 0.01, merge_every: int = 1,
                 seed: int = 0):
        if method not in ("dare", "ties"):
            raise ValueError(f"online merging method must be 'dare' or 'ties', got {method!r}")
        if not 0 < keep <= 1:
            raise ValueError(f"keep (reserve rate) must be in (0, 1], got {keep}")
        if merge_every < 1:
            raise ValueError(f"merge_every must be >= 1, got {merge_every}")
        self.optimizer, self.method, self.weight, self.keep = optimizer, method, merge_weight, keep
        self.every, self.seed = merge_every, seed
        params = [p for g in optimizer.param_groups for p in g["params"]]
        unknown = [i for i, p in enumerate(deltas) if all(p is not q for q in params)]
        if unknown:
            raise ValueError("deltas given for parameters the optimizer does not hold")
        for p, tau in deltas.items():
            if tau.shape != p.shape:
                raise ValueError(f"SFT delta of shape {tuple(tau.shape)} for a parameter of shape {tuple(p.shape)}")
        # TIES trims tau by magnitude: the same mask every step, so it is applied once here.
        self.deltas = {p: (top_magnitude(t, keep) if method == "ties" else t).to(p.device, p.dtype)
                       for p, t in deltas.items()}
        self.index = {p: i for i, p in enumerate(params)}

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _steps_done(self) -> int:
        for p in self.deltas:
            if "step" in self.optimizer.state.get(p, {}):
                return int(self.optimizer.state[p]["step"])
        return 0

    def _generator(self, p: torch.nn.Parameter, step: int) -> torch.Generator:
        g = torch.Generator(device=p.device)
        return g.manual_seed(self.seed * 1_000_003 + step * 10_007 + self.index[p])

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step, merged with the SFT delta on every merge_every-th step."""
        merged = [p for p in self.deltas if p.grad is not None]
        # With merge_every > 1 the weights at the last merge live in the optimizer state (so checkpoints keep
        # them); they are stored after AdamW's step, which initialises its own state only when it is empty.
        anchors = {p: self.optimizer.state[p]["merge_anchor"] if "merge_anchor" in self.optimizer.state.get(p, {})
                   else p.detach().clone() for p in merged}
        loss = self.optimizer.step(closure)
        if self.every > 1:
            for p in merged:
                self.optimizer.state[p]["merge_anchor"] = anchors[p]
        step = self._steps_done()
        if step % self.every != 0:
            return loss
        for p in merged:
            anchor, tau = anchors[p], self.deltas[p]
            d = p - anchor  # the (accumulated) AdamW update, weight decay included
            if self.method == "dare":
                g = self._generator(p, step)
                correction = (1 - self.weight) * dare(d, self.keep, g) - d + self.weight * dare(tau, self.keep, g)
            else:
                correction = ties_merge(top_magnitude(d, self.keep), tau, self.weight) - d
            p.add_(correction)
            if self.every > 1:
                anchor.copy_(p)
        return loss
