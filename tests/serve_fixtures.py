"""Helpers for the server and chat tests: a tiny random checkpoint with a small trained tokenizer."""

from __future__ import annotations

from pathlib import Path

from conftest import random_hf_model
from tokenizer_fixtures import CORPUS

from qwen25.generation import SamplingParams, generate
from qwen25.tokenizer import train_tokenizer


def write_tiny_chat_checkpoint(path: Path, seed: int = 5, vocab_size: int = 640) -> Path:
    """A random 2-layer Qwen2 checkpoint (written by transformers) with a 622-token tokenizer trained here
    (Qwen's regex and control tokens; seconds to build, instant to load). vocab_size 622: no padding rows (a random
    model may rank a padding id first, which transformers generates and we never do)."""
    train_tokenizer([text * 5 for text in CORPUS], 600, out_dir=path)
    random_hf_model(seed=seed, vocab_size=vocab_size, hidden_size=64, max_position_embeddings=512).save_pretrained(path)
    return path


def greedy_reply(model, tokenizer, prompt: list[int], max_new_tokens: int) -> tuple[str, list[int]]:
    """The greedy continuation by generation.generate (no engine, no server): its text and ids, ending a chat
    turn at <|im_end|> or <|endoftext|> as the server and chat do."""
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=[tokenizer.im_end_id, tokenizer.endoftext_id])
    ids = generate(model, [prompt], params, vocab_limit=len(tokenizer))[0]
    return tokenizer.decode(ids, skip_special_tokens=True), ids
