"""The Qwen2.5 model: decoder, RoPE, attention with KV cache, HF safetensors checkpoints."""

from .attention import KVCache
from .checkpoint import CheckpointError, load_model, save_model
from .transformer import CausalLM

__all__ = ["CausalLM", "KVCache", "CheckpointError", "load_model", "save_model"]
