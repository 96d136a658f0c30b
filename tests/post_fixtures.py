"""Helpers for the post-training tests: a byte-level tokenizer with the ChatML control tokens (fits the tiny
preset's 512-entry vocabulary), and generated tasks (arithmetic chats, separable preference pairs)."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from qwen25.tokenizer import train_tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread each is ~10x faster than several fighting over 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@lru_cache(maxsize=None)
def byte_tokenizer():
    """A real qwen25 Tokenizer with no merges: the 256 byte tokens and Qwen's 22 control tokens (ids 256-277),
    so chats fit the tiny preset's 512-entry vocabulary."""
    return train_tokenizer(["0123456789+"], vocab_size=256)


def arithmetic_chats(n: int, seed: int, max_b: int = 9) -> list[dict]:
    """Chats "a+b" (digits, b <= max_b) -> the last digit of a + b, with a short system prompt (bytes are tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        a, b = int(torch.randint(0, 10, (), generator=g)), int(torch.randint(0, max_b + 1, (), generator=g))
        out.append({"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{b}"},
                                 {"role": "assistant", "content": str((a + b) % 10)}], "answer": str((a + b) % 10)})
    return out


def separable_pairs(n: int, seed: int) -> list[dict]:
    """Token-id preference pairs: chosen responses use ids 10-19, rejected ones ids 20-29, after random prompts."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(lo, hi, (int(torch.randint(2, 6, (), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": ids(40, 100), "chosen_ids": ids(10, 20), "rejected_ids": ids(20, 30)} for _ in range(n)]
