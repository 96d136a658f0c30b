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


# Qwen2MoeConfig's defaults (the Qwen1.5-MoE-A2.7B values), used for keys a qwen2_moe config.json leaves out.
_HF_MOE_DEFAULTS = {
    "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "router_aux_loss_coef": 0.001,
    "decoder_sparse_step": 1, "mlp_only_layers": [], "output_router_logits": False,
}


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
    model_type: str = "qwen2"  # "qwen2_moe" (HF Qwen2MoeForCausalLM) when the MLPs are mixtures of experts
    # Mixture-of-experts fields (qwen2_moe only; docs/moe.md). num_experts == 0: every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    router_aux_loss_coef: float = 0.001
    router_z_loss_coef: float = 0.0  # not an HF field; written to config.json only when set
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    output_router_logits: bool = False
    architectures: list[str] = field(default_factory=lambda: ["Qwen2ForCausalLM"])
    extra: dict[str, Any] = field(default_factory=dict)  # unknown config.json keys, written back unchanged

    def __post_init__(self):
        for name in _REQUIRED_KEYS + ("num_key_value_heads", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        self._check_values()
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
        if self.model_type not in ("qwen2", "qwen2_moe"):
            raise ConfigError(f"model_type {self.model_type!r} is not a Qwen2.5 model ('qwen2', or 'qwen2_moe' "
                              f"for mixtures of experts)")
        self._check_moe()

    def _check_values(self):
        """Every field's type and range (config.json is input: `"no"` is not a bool, a base of 0 is no RoPE)."""
        def number(name, low, low_ok):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < low or (value == low and not low_ok):
                raise ConfigError(f"{name} must be a finite number {'>=' if low_ok else '>'} {low}, got {value!r}")

        number("rope_theta", 0, False)
        number("rms_norm_eps", 0, False)
        number("initializer_range", 0, True)
        number("router_aux_loss_coef", 0, True)
        number("router_z_loss_coef", 0, True)
        number("attention_dropout", 0, True)
        if self.attention_dropout >= 1:
            raise ConfigError(f"attention_dropout must be below 1, got {self.attention_dropout!r}")
        for name in ("use_cache", "tie_word_embeddings", "use_sliding_window", "norm_topk_prob",
                     "output_router_logits"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")

        def count(value, positive=False):
            return isinstance(value, int) and not isinstance(value, bool) and value >= (1 if positive else 0)

        for name in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
                     "decoder_sparse_step"):
            if not count(getattr(self, name)):
                raise ConfigError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        for name in ("head_dim", "sliding_window", "max_window_layers"):
            value = getattr(self, name)
            if value is not None and not count(value, positive=name == "head_dim"):
                raise ConfigError(f"{name} must be {'a positive' if name == 'head_dim' else 'a non-negative'} "
                                  f"integer or null, got {value!r}")
        for name in ("bos_token_id", "pad_token_id"):
            if getattr(self, name) is not None and not count(getattr(self, name)):
                raise ConfigError(f"{name} must be a token id (integer >= 0) or null, got {getattr(self, name)!r}")
        eos = self.eos_token_id
        if eos is not None and not count(eos) and not (isinstance(eos, list) and eos and all(map(count, eos))):
            raise ConfigError(f"eos_token_id must be a token id, a non-empty list of them, or null, got {eos!r}")
        for name in ("rope_scaling", "dual_chunk_attention_config"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise ConfigError(f"{name} must be an object or null, got {getattr(self, name)!r}")
        if not isinstance(self.mlp_only_layers, list) or not all(map(count, self.mlp_only_layers)):
            raise ConfigError(f"mlp_only_layers must be a list of layer indices, got {self.mlp_only_layers!r}")
        if not isinstance(self.architectures, list) or not all(isinstance(a, str) for a in self.architectures):
            raise ConfigError(f"architectures must be a list of class names, got {self.architectures!r}")

    def _check_moe(self):
        if self.model_type == "qwen2":
            if self.num_experts:
                raise ConfigError(f"num_experts={self.num_experts} needs model_type 'qwen2_moe', got 'qwen2'")
            return
        if self.architectures == ["Qwen2ForCausalLM"]:  # the dense default: name the MoE class instead
            self.architectures = ["Qwen2MoeForCausalLM"]
        if self.num_experts < 0 or self.decoder_sparse_step <= 0:
            raise ConfigError(f"num_experts ({self.num_experts}) must be >= 0 and decoder_sparse_step "
                              f"({self.decoder_sparse_step}) > 0")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(f"num_experts_per_tok must be in 1..num_experts ({self.num_experts}), "
                              f"got {self.num_experts_per_tok}")
        if self.num_experts and (self.moe_intermediate_size <= 0 or self.shared_expert_intermediate_size < 0):
            raise ConfigError(f"moe_intermediate_size must be positive (got {self.moe_intermediate_size}) and "
                              f"shared_expert_intermediate_size >= 0 (got {self.shared_expert_intermediate_size})")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ConfigError(f"mlp_only_layers {bad} are not layer indices 0..{self.num_hidden_layers - 1}")

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

    @property
    def is_moe(self) -> bool:
        """True when at least one layer is a mixture of experts."""
        return any(self.is_sparse_layer(i) for i in range(self.num_hidden_layers))

    def is_sparse_layer(self, layer: int) -> bool:
        """Whether layer `layer` has a sparse MoE block (as HF: not in mlp_only_layers, every sparse_step-th)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

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
        if raw.get("model_type") == "qwen2_moe":
            if raw.pop("qkv_bias", True) is not True:
                raise ConfigError(f"{source}: qkv_bias false is not supported (Qwen2 attention has q/k/v biases)")
            for key, value in _HF_MOE_DEFAULTS.items():  # what Qwen2MoeConfig assumes for a missing key
                if raw.get(key) is None:
                    raw[key] = value
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
        if self.model_type != "qwen2_moe":  # a dense config.json carries no MoE keys
            for key in _HF_MOE_DEFAULTS:
                out.pop(key)
        if not self.router_z_loss_coef:
            out.pop("router_z_loss_coef")
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
        tmp = path.with_name("config.json.tmp")  # written beside and renamed: never a half-written config
        tmp.write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")
        tmp.replace(path)
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

# Mixtures of experts: the open Qwen2MoeForCausalLM checkpoints (reference.md section 2), as released.
_MOE = dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"], vocab_size=151936, rope_theta=1e6,
            rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643,
            norm_topk_prob=False, router_aux_loss_coef=0.001, decoder_sparse_step=1)
PRESETS["qwen1.5-moe-a2.7b"] = {
    **_MOE, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
    "num_key_value_heads": 16, "max_position_embeddings": 8192, "sliding_window": 32768, "max_window_layers": 21,
    "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
    "shared_expert_intermediate_size": 5632}
PRESETS["qwen2-57b-a14b"] = {
    **_MOE, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
    "num_key_value_heads": 4, "max_position_embeddings": 131072, "sliding_window": 131072, "max_window_layers": 28,
    "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
    "shared_expert_intermediate_size": 20480}
# Small MoE shapes with A2.7B's proportions (expert width ~0.7 hidden, shared expert = 4 experts wide).
for _name, _dense, _experts, _k, _moe in (("tiny-moe", "tiny", 8, 2, 48), ("mini-moe", "mini", 16, 4, 256),
                                          ("small-moe", "small", 32, 4, 352)):
    PRESETS[_name] = {**PRESETS[_dense], "model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
                      "num_experts": _experts, "num_experts_per_tok": _k, "moe_intermediate_size": _moe,
                      "shared_expert_intermediate_size": 4 * _moe, "norm_topk_prob": False,
                      "router_aux_loss_coef": 0.001, "decoder_sparse_step": 1}


# ---- sizes, compute and memory from the config ---------------------------------------------------------
def mlp_params(cfg: ModelConfig, layer: int, activated: bool = False) -> int:
    """Parameters of one layer's MLP; for a sparse layer with activated=True, only the top-k experts count.

    A sparse layer holds the router (experts x hidden), the experts (3 x hidden x moe_intermediate each),
    the shared expert (3 x hidden x shared_intermediate) and its gate (hidden).
    """
    h = cfg.hidden_size
    if not cfg.is_sparse_layer(layer):
        return 3 * h * cfg.intermediate_size
    experts = cfg.num_experts_per_tok if activated else cfg.num_experts
    return (cfg.num_experts * h + experts * 3 * h * cfg.moe_intermediate_size
            + 3 * h * cfg.shared_expert_intermediate_size + h)


def param_count(cfg: ModelConfig, embeddings: bool = True, activated: bool = False) -> int:
    """Number of parameters (a tied lm_head is counted once); embeddings=False leaves out embedding and lm_head.

    activated=True counts what one token uses: for MoE layers the top-k routed experts instead of all of them.
    """
    h, d = cfg.hidden_size, cfg.head_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    attn = h * q + q + 2 * (h * kv + kv) + q * h
    mlps = sum(mlp_params(cfg, i, activated) for i in range(cfg.num_hidden_layers))
    body = cfg.num_hidden_layers * (attn + 2 * h) + mlps + h
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
    # MoE layers count the weights one token is multiplied with: router, top-k experts, shared expert and gate.
    mlps = sum(mlp_params(cfg, i, activated=True) for i in range(L))
    weights = L * (h * q + 2 * h * kv + q * h) + mlps + cfg.vocab_size * h
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
    """KV-cache bytes per token with GQA: 2 (K and V) x layers x kv_heads x head_dim x bytes per element (int8:
    plus the fp32 scale per head that the 8-bit cache keeps for every token)."""
    scales = 4 if str(dtype).removeprefix("torch.") == "int8" else 0
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.head_size * dtype_bytes(dtype) + scales)


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
