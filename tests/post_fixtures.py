"""Helpers for the post-training tests: a byte-level stand-in tokenizer with the ChatML control tokens (fits the
tiny preset's 512-entry vocabulary), and generated tasks (arithmetic chats, separable preference pairs)."""

from __future__ import annotations

import re

import pytest
import torch

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run many small ops: one thread each is ~10x faster than several fighting over 2 busy cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; the three ChatML control tokens are 256-258."""

    def __init__(self):
        self.ids = {t: 256 + i for i, t in enumerate(CONTROL)}
        self.pattern = re.compile("|".join(re.escape(t) for t in CONTROL))

    @property
    def im_end_id(self) -> int:
        return self.ids["<|im_end|>"]

    def encode(self, text: str) -> list[int]:
        out, at = [], 0
        for m in self.pattern.finditer(text):
            out += list(text[at:m.start()].encode())
            out.append(self.ids[m.group()])
            at = m.end()
        return out + list(text[at:].encode())

    def decode(self, ids) -> str:
        names = {v: k for k, v in self.ids.items()}
        out, pending = [], []
        for i in ids:
            if i < 256:
                pending.append(i)
                continue
            out.append(bytes(pending).decode(errors="replace"))
            pending = []
            out.append(names.get(i, ""))
        return "".join(out) + bytes(pending).decode(errors="replace")


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
