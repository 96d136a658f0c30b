"""ModelConfig: one dataclass for every Qwen2.5 model, its named presets, and HF ``config.json`` in/out.

A config is data: the field names are those of the official ``config.json`` files, so reading and writing
them is a dictionary copy plus checks. Keys we do not know are kept (and written back) with a warning.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Keys of the official config.json files that carry no meaning for the model; kept silently.
_METADATA_KEYS = {"transformers_version", "_name_or_path", "use_mrope", "torch_dtype", "dtype"}
_REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class ConfigError(ValueError):
    """A config.json (or preset) that cannot describe a Qwen2.5 model."""


@dataclass
class ModelConfig:
    """Architecture of a Qwen2.5 decoder, field for field as in HF ``Qwen2ForCausalLM`` config.json files."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (as in every official size)
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    # Shipped by every official config but without effect: Qwen2.5 uses full attention in every layer.
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int | None = None
    layer_types: list[str] | None = None  # transformers v5 writes it; every layer is "full_attention"
    attention_dropout: float = 0.0
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151643
    pad_token_id: int | None = None
    dual_chunk_attention_config: dict | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "qwen2"
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, written back unchanged

    def __post_init__(self):
        for name in _REQUIRED_KEYS + ("num_key_value_heads",):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                    f"({self.num_attention_heads}); set head_dim explicitly"
                )
        elif self.head_dim <= 0 or self.head_dim % 2:
            raise ConfigError(f"head_dim must be a positive even integer, got {self.head_dim}")
        if self.head_size % 2:
            raise ConfigError(f"head_dim {self.head_size} must be even for rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported: Qwen2.5 uses 'silu'")
        if self.max_window_layers is None:  # transformers requires an int here
            self.max_window_layers = self.num_hidden_layers
        if self.use_sliding_window or any(t != "full_attention" for t in self.layer_types or []):
            raise ConfigError("sliding-window attention is not supported: Qwen2.5 uses full attention "
                              "in every layer (set use_sliding_window to false)")
        if self.model_type != "qwen2":
            raise ConfigError(f"model_type {self.model_type!r} is not a dense Qwen2.5 model ('qwen2')")

    # ---- derived values -------------------------------------------------------------------------
    @property
    def head_size(self) -> int:
        """Per-head dimension (head_dim, or hidden_size // num_attention_heads)."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def eos_token_ids(self) -> list[int]:
        """All end-of-sequence ids as a list (config.json allows an int or a list)."""
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def replace(self, **changes) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    # ---- HF config.json ---------------------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        """Build from the dictionary of an HF config.json (old `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        raw = dict(raw)
        missing = [k for k in _REQUIRED_KEYS if k not in raw]
        if missing:
            raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}")
        if "rope_parameters" in raw:  # transformers v5 layout
            rope = dict(raw.pop("rope_parameters") or {})
            raw.setdefault("rope_theta", rope.pop("rope_theta", 1_000_000.0))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                raw.setdefault("rope_scaling", rope)
        if raw.get("num_key_value_heads") is None:  # HF's default: multi-head attention
            raw["num_key_value_heads"] = raw["num_attention_heads"]
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"
        names = {f.name for f in dataclasses.fields(cls)} - {"extra", "torch_dtype"}
        known = {k: v for k, v in raw.items() if k in names}
        extra = {k: v for k, v in raw.items() if k not in names and k not in _METADATA_KEYS}
        if extra:
            warnings.warn(f"{source}: unknown key(s) kept as-is: {', '.join(sorted(extra))}", stacklevel=2)
        try:
            return cls(**known, torch_dtype=str(dtype), extra=extra)
        except TypeError as e:  # pragma: no cover - dataclass signature errors
            raise ConfigError(f"{source}: {e}") from e

    def to_hf_dict(self) -> dict:
        """The dictionary written to config.json (the official key layout, loadable by transformers and vLLM)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        if out["head_dim"] is None or out["head_dim"] == self.hidden_size // self.num_attention_heads:
            out.pop("head_dim")
        for optional in ("dual_chunk_attention_config", "layer_types", "rope_scaling", "pad_token_id"):
            if out[optional] is None:
                out.pop(optional)
        out.update(self.extra)
        return dict(sorted(out.items()))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config.json file, or the config.json inside a checkpoint directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf_dict(raw, source=str(path))

    def save(self, directory: str | Path) -> Path:
        """Write config.json into a directory; returns the file path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "config.json"
        path.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_preset(cls, name: str, **changes) -> ModelConfig:
        """A named preset (see PRESETS), optionally with fields changed."""
        key = name.lower().removeprefix("qwen2.5-")
        if key not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **changes})


# ---- presets ----------------------------------------------------------------------------------------
# The seven official sizes (reference.md section 1), base and instruct, and small shapes for tests/CPU.
_OFFICIAL = {
    #        hidden layers q  kv  intermediate vocab  tied
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "3b": (2048, 36, 16, 2, 11008, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
    "14b": (5120, 48, 40, 8, 13824, 152064, False),
    "32b": (5120, 64, 40, 8, 27648, 152064, False),
    "72b": (8192, 80, 64, 8, 29568, 152064, False),
}


def _official(size: str, kind: str) -> dict:
    hidden, layers, heads, kv, inter, vocab, tied = _OFFICIAL[size]
    big = size in ("7b", "14b", "32b", "72b")
    if kind == "instruct":
        max_pos, eos, eps = 32768, 151645, 1e-6
    else:
        max_pos = 131072 if big else 32768
        eos = 151643
        eps = 1e-5 if size in ("14b", "32b", "72b") else 1e-6
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
        rms_norm_eps=eps, tie_word_embeddings=tied, rope_theta=1_000_000.0, bos_token_id=151643,
        eos_token_id=eos, sliding_window=max_pos, max_window_layers=layers,
    )


def _small(vocab, hidden, layers, heads, kv, inter, max_pos) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=max_pos,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10_000.0, torch_dtype="float32",
        bos_token_id=None, eos_token_id=None,
    )


PRESETS: dict[str, dict] = {}
for _size in _OFFICIAL:
    PRESETS[_size] = _official(_size, "base")
    PRESETS[f"{_size}-instruct"] = _official(_size, "instruct")
for _size in ("7b", "14b"):  # Qwen2.5-*-Instruct-1M: base 1e7 and dual chunk attention
    PRESETS[f"{_size}-instruct-1m"] = {
        **_official(_size, "instruct"), "rope_theta": 10_000_000.0, "max_position_embeddings": 1_010_000,
        "rms_norm_eps": 1e-5, "sliding_window": None,
        "dual_chunk_attention_config": {
            "chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144},
    }
# Small shapes for tests and CPU runs; their eos id is set by the tokenizer they are trained with.
PRESETS["tiny"] = _small(vocab=512, hidden=64, layers=2, heads=4, kv=2, inter=176, max_pos=2048)
PRESETS["mini"] = _small(vocab=8192, hidden=384, layers=6, heads=6, kv=2, inter=1024, max_pos=4096)
PRESETS["small"] = _small(vocab=16384, hidden=512, layers=8, heads=8, kv=2, inter=1408, max_pos=8192)


# ---- sizes, compute and memory from the config ---------------------------------------------------------
def param_count(cfg: ModelConfig, embeddings: bool = True) -> int:
    """Number of parameters (a tied lm_head is counted once); embeddings=False leaves out embedding and lm_head."""
    h, d = cfg.hidden_size, cfg.head_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * q + q + 2 * (h * kv + kv) + q * h
    mlp = 3 * h * cfg.intermediate_size
    per_layer = attn + mlp + 2 * h
    body = cfg.num_hidden_layers * per_layer + h
    if not embeddings:
        return body
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    return body + cfg.vocab_size * h + head


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = False) -> float:
    """Matmul FLOPs per token of a causal forward pass over `seq_len` tokens (3x that when training).

    2 FLOPs per weight of every matmul (attention projections, MLP, lm_head) plus the attention scores and
    the weighted sum of values: 2 * 2 * head_dim FLOPs per (query, key) pair and head, averaged over the
    causal triangle (seq_len / 2 keys per query on average, counted as seq_len / 2).
    """
    h, d, L = cfg.hidden_size, cfg.head_size, cfg.num_hidden_layers
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    weights = L * (h * q + 2 * h * kv + q * h + 3 * h * cfg.intermediate_size) + cfg.vocab_size * h
    attn = L * cfg.num_attention_heads * 4 * d * (seq_len / 2)
    fwd = 2 * weights + attn
    return 3 * fwd if training else fwd


_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "int8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a dtype name (float32/bf16/...)."""
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


def kv_cache_bytes_per_token(cfg: ModelConfig, dtype: str = "bfloat16") -> int:
    """KV-cache bytes per token with GQA: 2 (K and V) x layers x kv_heads x head_dim x bytes per element."""
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_size * dtype_bytes(dtype)


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def human_count(n: float) -> str:
    """7_615_616_512 -> '7.62B'."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n)) if math.isfinite(n) else str(n)
