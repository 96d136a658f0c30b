"""The position-wise building blocks of a decoder layer: RMSNorm and the SwiGLU MLP (also a MoE expert)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def concat_linears(parts: list[nn.Linear]) -> nn.Linear:
    """One inference-only Linear whose outputs are the parts' outputs side by side (same input)."""
    w = parts[0].weight
    bias = parts[0].bias is not None
    fused = nn.Linear(w.shape[1], sum(p.out_features for p in parts), bias=bias, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([p.weight for p in parts]))
        if bias:
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
    return fused.requires_grad_(False)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.gate_up_proj = None

    def fuse_projections(self):
        """Replace gate/up_proj by one gate_up_proj (inference: one matmul; names leave the HF layout)."""
        if self.gate_up_proj is None:
            self.gate_up_proj = concat_linears([self.gate_proj, self.up_proj])
            del self.gate_proj, self.up_proj

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def replace_modules(model: nn.Module, wanted, make) -> int:
    """Replace (in place) every submodule m of `model` for which wanted(name, m) holds by make(m); returns how many."""
    targets = [(name, module) for name, module in model.named_modules() if wanted(name, module)]
    for name, module in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, make(module))
    return len(targets)
