"""The engines that turn plain text (no control tokens) into ids: NFC, the pre-tokenizer regex, then BPE.

All three give HF `tokenizers`' ids:
- "fastokens" (optional package, Rust): implements HF's pipeline (merge-list BPE) directly; ~75x HF here.
- "tiktoken" (Rust): rank merging, used only for vocabularies where `bpe.check_rank_merging` proves it
  equal to merge-list BPE (Qwen's and every trained one); 7-10x HF.
- "python": merge-list BPE in plain Python, exact and slow; the fallback and the readable reference.
"""

from __future__ import annotations

import json
import os
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from .bpe import check_rank_merging, merge_by_list
from .files import TokenizerError, Vocabulary, tokenizer_json

ENGINES = ("auto", "fastokens", "tiktoken", "python")
_CHECK_VERSION = "1"  # bump when check_rank_merging changes, so cached verdicts are not reused


def fastokens_available() -> bool:
    try:
        import fastokens  # noqa: F401
    except ImportError:
        return False
    return True


def make_engine(vocab: Vocabulary, name: str = "auto"):
    """The engine called `name`; "auto" picks fastokens if installed, else tiktoken when the rank-merging check
    passes, else python (with a warning)."""
    if name not in ENGINES:
        raise TokenizerError(f"engine must be one of {ENGINES}, got {name!r}")
    if name == "fastokens" or (name == "auto" and fastokens_available()):
        if not fastokens_available():
            raise TokenizerError("engine 'fastokens' needs the fastokens package: pip install fastokens")
        return FastokensEngine(vocab)
    if name == "python":
        return PythonEngine(vocab)
    problems = rank_merging_problems(vocab)
    if not problems:
        return TiktokenEngine(vocab)
    if name == "tiktoken":
        raise TokenizerError(f"{vocab.source}: tiktoken's rank merging may differ from the merge list: "
                             + "; ".join(problems))
    warnings.warn(f"{vocab.source}: using the slow Python BPE, because tiktoken's rank merging may differ from "
                  f"the merge list ({problems[0]}); installing fastokens avoids this", stacklevel=3)
    return PythonEngine(vocab)


def _cache_dir() -> Path:
    return Path(os.environ.get("QWEN25_CACHE_DIR") or Path.home() / ".cache" / "qwen25")


def rank_merging_problems(vocab: Vocabulary) -> list[str]:
    """check_rank_merging, remembering passes on disk by file hash (the check takes ~2 s for Qwen's vocab)."""
    marker = _cache_dir() / "bbpe-checked" / f"{vocab.fingerprint}-v{_CHECK_VERSION}"
    if vocab.fingerprint and marker.is_file():
        return []
    # (ignore_merges, HF's whole-word lookup, is what tiktoken does too: it only matters for tokens that merges
    # cannot make, and a vocabulary that passes has none.)
    problems = check_rank_merging(vocab.ranks, vocab.merges)
    if not problems and vocab.fingerprint:
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        except OSError:
            pass
    return problems


class FastokensEngine:
    """HF's normaliser, pre-tokenizer and BPE model (no added tokens: we cut those out first) in fastokens."""
    name = "fastokens"

    def __init__(self, vocab: Vocabulary):
        import fastokens

        self._tokenizer = fastokens.Tokenizer.from_json_str(json.dumps(tokenizer_json(vocab, added=False)))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_many(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        # fastokens runs a batch on its own thread pool (RAYON_NUM_THREADS sets its size).
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]


class TiktokenEngine:
    """NFC in Python, then the regex and rank merging in tiktoken (ranks = ids)."""
    name = "tiktoken"

    def __init__(self, vocab: Vocabulary):
        import tiktoken

        # tiktoken drops text its regex does not match, while HF keeps it; Qwen's regex matches everything.
        self._encoding = tiktoken.Encoding(name=f"bbpe-{vocab.fingerprint[:12] or 'memory'}", pat_str=vocab.pattern,
                                           mergeable_ranks=vocab.ranks, special_tokens={})
        self._nfc = vocab.nfc

    def encode(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        return self._encoding.encode_ordinary(text)

    def encode_many(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        if num_threads <= 1 or len(texts) < 2:
            return [self.encode(t) for t in texts]
        with ThreadPoolExecutor(num_threads) as pool:  # tiktoken releases the GIL while it encodes
            return list(pool.map(self.encode, texts))


class PythonEngine:
    """NFC, the regex (`regex` module) and merge-list BPE in Python, exactly HF's rules; caches pre-tokens."""
    name = "python"

    def __init__(self, vocab: Vocabulary):
        import regex

        self._regex = regex.compile(vocab.pattern)
        self._nfc = vocab.nfc
        self._ranks = vocab.ranks
        self._byte_ids = [vocab.ranks[bytes([b])] for b in range(256)]
        self._merges = {}
        for index, (left, right) in enumerate(vocab.merges):
            pair = (vocab.ranks[left], vocab.ranks[right])
            self._merges[pair] = (index, vocab.ranks[left + right])  # a repeated pair: the last wins, as in HF
        self._ignore_merges = vocab.ignore_merges
        self._cache: dict[str, list[int]] = {}

    def _piece(self, piece: str) -> list[int]:
        cached = self._cache.get(piece)
        if cached is None:
            data = piece.encode("utf-8")
            if self._ignore_merges and data in self._ranks:
                cached = [self._ranks[data]]
            else:
                cached = merge_by_list([self._byte_ids[b] for b in data], self._merges)
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[piece] = cached
        return cached

    def encode(self, text: str) -> list[int]:
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ids: list[int] = []
        start = 0
        for match in self._regex.finditer(text):
            if match.start() > start:  # HF's "Isolated" split keeps unmatched text as a piece of its own
                ids += self._piece(text[start:match.start()])
            ids += self._piece(match.group())
            start = match.end()
        if start < len(text):
            ids += self._piece(text[start:])
        return ids

    def encode_many(self, texts: Sequence[str], num_threads: int) -> list[list[int]]:
        return [self.encode(t) for t in texts]
