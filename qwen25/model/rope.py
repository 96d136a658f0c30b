"""Rotary position embeddings: inverse frequencies (default at any base, YaRN) and their application.

Pure functions over the config. Tables are computed in fp32; Qwen2.5 uses the "rotate_half" layout
(first half / second half of head_dim, not interleaved).

Long context (reference.md section 3): the base is raised during training (ABF: 10K -> 1M, 10M for the
1M models), which is just `rope_theta`. At inference `rope_scaling = {"rope_type": "yarn", "factor": s,
"original_max_position_embeddings": L}` stretches the low frequencies by s. Static YaRN also changes
short inputs (a known complaint), so `rope_scaling["apply_only_beyond_original"] = true` (our key) applies
it only to sequences that may grow past L: the choice is made once per sequence, from the length it may
reach (the KV cache's capacity, i.e. prompt + max_new_tokens), because cached keys are rotated with the
table in effect when they were written (see `yarn_applies`).
"""

from __future__ import annotations

import math

import torch

from ..config import ConfigError, ModelConfig

ONLY_BEYOND_ORIGINAL = "apply_only_beyond_original"  # our rope_scaling key (transformers ignores it)


def default_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """inv_freq_i = base^(-2i/d) for i in [0, d/2), fp32."""
    return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def yarn_correction_range(head_dim: int, base: float, original_max_position: int, beta_fast: float = 32.0,
                          beta_slow: float = 1.0, truncate: bool = True) -> tuple[float, float]:
    """(low, high): the dimension pairs below `low` keep their frequency, those above `high` are divided by s.

    corr(r) = d ln(L / (2 pi r)) / (2 ln b) is the pair index whose wavelength fits r times into L.
    low = corr(beta_fast), high = corr(beta_slow), floored/ceiled when `truncate`, clamped to [0, d-1].
    """
    def corr(rotations: float) -> float:
        return head_dim * math.log(original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(beta_fast), corr(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_attention_factor(factor: float, mscale: float | None = None, mscale_all_dim: float | None = None) -> float:
    """YaRN's cos/sin multiplier m = 0.1 ln(s) + 1 (1 for s <= 1); the DeepSeek ratio form when both mscales are set."""
    def get(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if mscale and mscale_all_dim:
        return get(factor, mscale) / get(factor, mscale_all_dim)
    return get(factor)


def yarn_inv_freq(
    head_dim: int, base: float, factor: float, original_max_position: int,
    beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies by `factor`, keep high ones; returns (inv_freq, attention_factor).

    Pairs below the correction range are extrapolated (unchanged), those above it interpolated (divided by
    the factor), with a linear ramp between. The attention factor 0.1 ln(s) + 1 multiplies cos and sin (so
    the logits by its square). For Qwen2.5 (d 128, base 1e6, L 32768, s 4): low 23, high 40, m 1.138629.
    """
    low, high = yarn_correction_range(head_dim, base, original_max_position, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # avoid a division by zero, as the reference implementation does
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolated = default_inv_freq(head_dim, base)
    interpolated = extrapolated / factor
    inv_freq = interpolated * ramp + extrapolated * (1 - ramp)
    return inv_freq, yarn_attention_factor(factor)


def rope_kind(cfg: ModelConfig) -> str:
    """'default' or the `rope_scaling` type ('yarn', ...), read from "rope_type" or the older "type"."""
    scaling = cfg.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def yarn_original_length(cfg: ModelConfig) -> int:
    """L of a YaRN config: rope_scaling's original_max_position_embeddings, else max_position_embeddings
    (as transformers 5 defaults it). Never derived from the factor."""
    return int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.max_position_embeddings)


def yarn_depends_on_length(cfg: ModelConfig) -> bool:
    """Whether the table depends on the sequence length (YaRN with `apply_only_beyond_original`)."""
    return rope_kind(cfg) != "default" and bool((cfg.rope_scaling or {}).get(ONLY_BEYOND_ORIGINAL))


def yarn_applies(cfg: ModelConfig, length: int | None) -> bool:
    """Whether a sequence that may reach `length` tokens uses the scaled table.

    Always for static YaRN (the documented behaviour of the config); with `apply_only_beyond_original`
    only when `length` exceeds the original length L. `length=None` (unknown) means scaled.
    """
    if rope_kind(cfg) == "default":
        return False
    if not (cfg.rope_scaling or {}).get(ONLY_BEYOND_ORIGINAL) or length is None:
        return True
    return length > yarn_original_length(cfg)


def rope_parameters(cfg: ModelConfig, scaled: bool = True) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_factor) for a config: default RoPE at rope_theta, or its `rope_scaling`.

    `scaled=False` gives the unscaled table of a scaled config (used for short sequences when
    `apply_only_beyond_original` is set). `factor` and `original_max_position_embeddings` are used as given;
    a missing original length defaults to max_position_embeddings and a null factor to
    max_position_embeddings / original (both as in transformers 5).
    """
    scaling = cfg.rope_scaling or {}
    kind = rope_kind(cfg)
    if kind == "default" or not scaled:
        if kind not in ("default", "yarn"):
            raise ConfigError(f"rope_scaling type {kind!r} is not supported (supported: default, yarn)")
        return default_inv_freq(cfg.head_size, cfg.rope_theta), 1.0
    if kind == "yarn":
        if "factor" not in scaling:
            raise ConfigError(f"rope_scaling of type 'yarn' needs 'factor': {scaling}")
        original = yarn_original_length(cfg)
        factor = scaling["factor"]
        factor = float(cfg.max_position_embeddings / original if factor is None else factor)
        if factor < 1:
            raise ConfigError(f"rope_scaling factor must be >= 1, got {factor}")
        inv_freq, _ = yarn_inv_freq(
            cfg.head_size, cfg.rope_theta, factor, original,
            beta_fast=float(scaling.get("beta_fast") or 32.0), beta_slow=float(scaling.get("beta_slow") or 1.0),
            truncate=bool(scaling.get("truncate", True)))
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = yarn_attention_factor(factor, scaling.get("mscale"), scaling.get("mscale_all_dim"))
        return inv_freq, float(attention_factor)
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
