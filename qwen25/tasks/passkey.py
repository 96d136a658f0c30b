"""Passkey prompts, the long-context test of the report's figure: a number hidden in filler text.

A prompt is an instruction line, the filler sentence repeated, the line "The pass key is K. Remember it.
K is the pass key." at a chosen depth (0 = right after the instruction, 1 = right before the question),
then "What is the pass key? The pass key is". K is uniform in 1..50000. The evaluation over a grid of lengths
and depths is in qwen25/evals/passkey.py; the recipe's training documents use the same text.

Works on token ids through any tokenizer with `encode(str) -> list[int]` and `decode(ids) -> str`.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"
MAX_PASSKEY = 50000


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass
class PasskeySample:
    """One prompt: its token ids, the hidden key, the grid cell it belongs to, and where the key line sits."""

    ids: list[int]
    passkey: int
    length: int  # the target length in tokens (the prompt has at most this many)
    depth: float
    fillers_before: int
    fillers_after: int


# The task's sentences and fixed phrases: a synthetic tokenizer may keep each as one token.
TASK_PHRASES = tuple(re.findall(r"[^.?]+[.?]", INSTRUCTION + " " + FILLER)) + (
    "The pass key is", "Remember it.", "is the pass key.", "What is the pass key?")


class WordTokenizer:
    """A tiny tokenizer over the passkey task's own text, for synthetic experiments and tests.

    Tokens are the given phrases (matched first, longest first), then words, single digits and punctuation
    marks; id 0 is padding and 1 stands for unknown words. `decode` puts a space between tokens except
    before punctuation and between digits, so numbers come back whole ("1 2 3" tokens -> "123").
    `WordTokenizer(TASK_PHRASES)` makes every filler sentence one token: prompts of a given length then
    hold about five times more filler sentences.
    """

    def __init__(self, phrases: Sequence[str] = ()):
        phrases = sorted({p.strip() for p in phrases}, key=len, reverse=True)
        self.pattern = re.compile("".join(re.escape(p) + "|" for p in phrases) + r"\d|[A-Za-z]+|[^\w\s]")
        words = self.pattern.findall(" ".join([INSTRUCTION, FILLER, KEY_LINE, QUESTION, "0123456789"]))
        self.vocab = ["<pad>", "<unk>"] + sorted(set(words) - {"{", "}"})  # braces: KEY_LINE's template
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, 1) for w in self.pattern.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        out = ""
        for i in ids:
            word = self.vocab[i] if 0 <= i < len(self.vocab) else "<unk>"
            glued = not word[0].isalnum() or (word.isdigit() and out[-1:].isdigit())
            out += word if glued or not out else " " + word
        return out


def passkey_text(passkey: int, fillers_before: int, fillers_after: int) -> str:
    """The prompt text with the key line after `fillers_before` filler sentences and before `fillers_after`."""
    parts = [INSTRUCTION, *[FILLER] * fillers_before, KEY_LINE.format(key=passkey), *[FILLER] * fillers_after,
             QUESTION]
    return " ".join(parts)


def passkey_sample(tokenizer: TextTokenizer, length: int, depth: float, passkey: int) -> PasskeySample:
    """The longest prompt of at most `length` tokens with the key line at `depth` (a fraction of the fillers)."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if passkey < 1:
        raise ValueError(f"passkey must be a positive integer, got {passkey}")

    def build(n: int) -> tuple[list[int], int]:
        before = round(depth * n)
        return tokenizer.encode(passkey_text(passkey, before, n - before)), before

    fixed = len(build(0)[0])
    if fixed > length:
        raise ValueError(f"length {length} is too short: the prompt without filler has {fixed} tokens")
    per_filler = max(1, len(tokenizer.encode(" " + FILLER)))
    n = max(0, (length - fixed) // per_filler)
    ids, before = build(n)
    while len(ids) > length and n > 0:  # token counts of joined text can differ slightly from the parts
        n -= 1
        ids, before = build(n)
    return PasskeySample(ids, passkey, length, depth, before, n - before)


def passkey_answer(text: str) -> int | None:
    """The integer a continuation starts with (after spaces), or None."""
    match = re.match(r"\s*(\d+)", text)
    return int(match.group(1)) if match else None


def passkey_samples(tokenizer: TextTokenizer, lengths: Sequence[int], depths: Sequence[float], trials: int = 1,
                    seed: int = 0) -> list[PasskeySample]:
    """`trials` samples for every (length, depth) cell, keys drawn uniformly from 1..50000 with `seed`."""
    rng = random.Random(seed)
    return [passkey_sample(tokenizer, length, depth, rng.randint(1, MAX_PASSKEY))
            for length in lengths for depth in depths for _ in range(trials)]
