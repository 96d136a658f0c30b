"""Rotary position embeddings: inverse frequencies (default, any base, YaRN) and their application.

Pure functions over the config. Tables are computed in fp32; Qwen2.5 uses the "rotate_half" layout
(first half / second half of head_dim, not interleaved).
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, ModelConfig


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """inv_freq_i = base^(-2i/d) for i in [0, d/2), fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_inv_freq(
    head_dim: int, base: float, factor: float, original_max_position: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones; returns (inv_freq, attention_factor).

    corr(r) = d ln(L / (2 pi r)) / (2 ln b) gives the dimension whose wavelength fits r times in L;
    dimensions below corr(beta_fast) are extrapolated, above corr(beta_slow) interpolated, linearly between.
    The attention factor 0.1 ln(s) + 1 multiplies cos and sin (so the logits by its square).
    """
    def corr(rotations: float) -> float:
        return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr(beta_fast)), 0)
    high = min(math.ceil(corr(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero, as the reference implementation does
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, base)
    interpolated = extrapolated / factor
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    return inv_freq, 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_parameters(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor) for a config: default RoPE at rope_theta, or its `rope_scaling`."""
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return default_inv_freq(cfg.head_size, cfg.rope_theta), 1.0
    if kind == "yarn":
        try:
            factor = float(scaling["factor"])
            original = int(scaling.get("original_max_position_embeddings") or cfg.max_position_embeddings)
        except KeyError as e:
            raise ConfigError(f"rope_scaling of type 'yarn' needs {e.args[0]!r}: {scaling}") from e
        inv_freq, attention_factor = yarn_inv_freq(
            cfg.head_size, cfg.rope_theta, factor, original,
            beta_fast=float(scaling.get("beta_fast", 32.0)), beta_slow=float(scaling.get("beta_slow", 1.0)))
        if scaling.get("attention_factor") is not None:
            attention_factor = float(scaling["attention_factor"])
        return inv_freq, attention_factor
    raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: default, yarn)")


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, attention_factor: float = 1.0):
    """cos and sin tables of shape (*positions.shape, head_dim), fp32, for integer positions."""
    freqs = positions.to(torch.float32)[..., None] * inv_freq.to(positions.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by tables (batch, seq, head_dim); computed in fp32."""
    cos, sin = cos[:, None], sin[:, None]
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)
