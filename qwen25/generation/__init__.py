"""Token-level generation: sampling settings and the one generation loop, the continuous-batching Engine.

`generate`/`stream_generate` (library calls, the CLI, the eval harness, passkey, the quality rater), rejection
sampling, GRPO and the server all run through `Engine`. Chat templates, tool parsing and HTTP sit above it.
"""

from .engine import Engine, PrefixCache, Request, StepOutput, generate, stream_generate
from .stops import TextTracker
from .sampling import (QWEN_INSTRUCT_DEFAULTS, SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p,
                       next_token, process_logits, tokenizer_vocab_size)

__all__ = ["Engine", "PrefixCache", "Request", "StepOutput", "generate", "stream_generate", "QWEN_INSTRUCT_DEFAULTS",
           "SamplingParams", "apply_repetition_penalty", "apply_top_k", "apply_top_p", "next_token",
           "process_logits", "tokenizer_vocab_size", "TextTracker"]
