"""Qwen's byte-level BPE tokenizer: load from HF files, encode (fast, ids identical to HF `tokenizers`), decode.

Encoding, as HF `tokenizers` does it for Qwen's tokenizer.json: (1) cut the text at control tokens (the added
tokens, matched leftmost-longest on the raw text), (2) NFC-normalise each piece between them, (3) split it with
the pre-tokenizer regex, (4) run BPE on the UTF-8 bytes of every pre-token. No BOS is ever added.

Steps 3-4 run in `tiktoken` (Rust, rank merging) when the vocabulary passes `bpe.check_rank_merging`, which
guarantees the ids of HF's merge-list BPE; otherwise in a plain-Python merge-list BPE (slow, exact).
"""

from __future__ import annotations

import codecs
import os
import re
import unicodedata
import warnings
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .bpe import bytes_to_token, check_rank_merging, merge_by_list, token_to_bytes
from .files import QWEN_CONTROL_TOKENS, AddedToken, TokenizerError, Vocabulary, read_vocabulary, write_vocabulary

_CHECK_VERSION = "1"  # bump when check_rank_merging changes, so cached verdicts are not reused


class Tokenizer:
    """A byte-level BPE tokenizer with added (control) tokens, e.g. Qwen2.5's 151,643 regular + 22 control tokens.

    `engine` is "auto" (tiktoken when provably identical to merge-list BPE, else Python), "tiktoken" (raise if
    not provably identical) or "python".
    """

    def __init__(self, vocab: Vocabulary, engine: str = "auto"):
        if engine not in ("auto", "tiktoken", "python"):
            raise TokenizerError(f"engine must be 'auto', 'tiktoken' or 'python', got {engine!r}")
        self.vocab = vocab
        self._added = {t.content: t.id for t in vocab.added}
        self._added_by_id = {t.id: t.content for t in vocab.added}
        self._special_ids = frozenset(t.id for t in vocab.added if t.special)
        size = max([*vocab.ranks.values(), *self._added.values()]) + 1
        self._id_bytes: list[bytes | None] = [None] * size
        for data, i in vocab.ranks.items():
            self._id_bytes[i] = data
        for t in vocab.added:
            self._id_bytes[t.id] = t.content.encode("utf-8")
        self._all_added = _special_regex(tuple(self._added))
        if engine != "python":
            problems = _rank_merging_problems(vocab)
            if problems and engine == "tiktoken":
                raise TokenizerError(f"{vocab.source}: tiktoken's rank merging may differ from the merge list: "
                                     + "; ".join(problems))
            if problems:
                warnings.warn(f"{vocab.source}: using the slow Python BPE, because tiktoken's rank merging may "
                              f"differ from the merge list: {problems[0]}", stacklevel=2)
                engine = "python"
            else:
                engine = "tiktoken"
        self.engine = engine
        self._bpe = _TiktokenBPE(vocab) if engine == "tiktoken" else _PythonBPE(vocab)

    @classmethod
    def from_dir(cls, path: str | Path, keep_extra_tokens: bool = True, engine: str = "auto") -> "Tokenizer":
        """Load tokenizer.json (or vocab.json + merges.txt) and tokenizer_config.json from a directory.

        Added tokens beyond Qwen2.5's 22 control tokens (e.g. the Qwen3 `<think>` tokens some packages ship)
        are kept by default, so ids equal HF's on the same files; keep_extra_tokens=False drops them, which
        gives Qwen2.5's own tokenizer (they are then encoded as plain text)."""
        vocab = read_vocabulary(path)
        if not keep_extra_tokens:
            vocab.added = [t for t in vocab.added if t.content in QWEN_CONTROL_TOKENS]
        return cls(vocab, engine=engine)

    def save(self, path: str | Path) -> list[Path]:
        """Write HF files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json) to a directory."""
        return write_vocabulary(self.vocab, path)

    # ---- sizes and token names

    def __len__(self) -> int:
        """Regular + added tokens (151,665 for Qwen2.5); the model's embedding may have more rows."""
        return len(self._id_bytes)

    @property
    def num_regular_tokens(self) -> int:
        return len(self.vocab.ranks)

    @property
    def added_tokens(self) -> dict[str, int]:
        """Control-token text -> id."""
        return dict(self._added)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that decode(skip_special_tokens=True) drops (Qwen: not the tool-call and FIM tokens)."""
        return self._special_ids

    def token_to_id(self, token: str) -> int:
        """Id of an added token's text or of a regular token's byte-level string (as in vocab.json)."""
        if token in self._added:
            return self._added[token]
        data = token_to_bytes(token)
        if data is not None and data in self.vocab.ranks:
            return self.vocab.ranks[data]
        raise TokenizerError(f"unknown token {token!r}")

    def id_to_token(self, token_id: int) -> str:
        """Inverse of token_to_id."""
        self._check_ids([token_id])
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        return bytes_to_token(self._id_bytes[token_id])

    def _named(self, token: str | None, what: str) -> int:
        if token is None or token not in self._added:
            raise TokenizerError(f"this tokenizer has no {what} token ({token or 'none configured'})")
        return self._added[token]

    @property
    def eos_id(self) -> int:
        """tokenizer_config.json's eos_token (Qwen2.5-Instruct: <|im_end|>; base: <|endoftext|>)."""
        return self._named(self.vocab.eos_token, "eos")

    @property
    def pad_id(self) -> int:
        return self._named(self.vocab.pad_token, "pad")

    @property
    def endoftext_id(self) -> int:
        return self._named("<|endoftext|>", "<|endoftext|>")

    @property
    def im_start_id(self) -> int:
        return self._named("<|im_start|>", "<|im_start|>")

    @property
    def im_end_id(self) -> int:
        return self._named("<|im_end|>", "<|im_end|>")

    # ---- encoding

    def encode(self, text: str, allowed_special: str | Iterable[str] = "all") -> list[int]:
        """Token ids of `text`. allowed_special: "all" (as HF: every control-token string in the text becomes its
        control token), "none" (all of them are plain text: use this for untrusted text), or a set of
        control-token strings to recognise."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = []
        for item in self.split_control(text, allowed_special):
            if isinstance(item, str):
                ids += self.encode_ordinary(item)
            else:
                ids.append(item)
        return ids

    def split_control(self, text: str, allowed_special: str | Iterable[str] = "all") -> Iterator[str | int]:
        """Cut text at control tokens: yields the non-empty plain pieces (str) and the control-token ids (int)."""
        pattern = self._allowed_regex(allowed_special)
        if pattern is None:
            if text:
                yield text
            return
        start = 0
        for match in pattern.finditer(text):
            if match.start() > start:
                yield text[start:match.start()]
            yield self._added[match.group()]
            start = match.end()
        if start < len(text):
            yield text[start:]

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of text with no control tokens recognised (NFC, pre-tokenizer, BPE)."""
        if self.vocab.nfc:
            text = unicodedata.normalize("NFC", text)
        return self._bpe.encode(text)

    def encode_batch(self, texts: Sequence[str], allowed_special: str | Iterable[str] = "all",
                     num_threads: int | None = None) -> list[list[int]]:
        """encode() of each text, on `num_threads` threads (default: CPU count) with the tiktoken engine."""
        allowed = allowed_special if isinstance(allowed_special, str) else frozenset(allowed_special)
        threads = num_threads or os.cpu_count() or 1
        if self.engine != "tiktoken" or threads == 1 or len(texts) < 2:
            return [self.encode(t, allowed) for t in texts]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(lambda t: self.encode(t, allowed), texts))

    def _allowed_regex(self, allowed_special) -> re.Pattern | None:
        if isinstance(allowed_special, str):
            if allowed_special == "all":
                return self._all_added
            if allowed_special == "none":
                return None
            raise TokenizerError(f"allowed_special must be 'all', 'none' or a set of control tokens, "
                                 f"got {allowed_special!r}")
        allowed = frozenset(allowed_special)
        unknown = sorted(allowed - self._added.keys())
        if unknown:
            raise TokenizerError(f"allowed_special names tokens that are not control tokens: {unknown}")
        return _special_regex(tuple(sorted(allowed)))

    # ---- decoding

    def _check_ids(self, ids: list[int]) -> None:
        for i in ids:
            if not 0 <= i < len(self._id_bytes) or self._id_bytes[i] is None:
                raise TokenizerError(f"token id {i} is not in this tokenizer (ids 0..{len(self._id_bytes) - 1})")

    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The bytes the ids stand for (control tokens as their UTF-8 text)."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        table = self._id_bytes
        try:
            if ids and min(ids) >= 0:
                return b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            pass
        self._check_ids(ids)
        return b"".join([table[i] for i in ids])

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; bytes that are not valid UTF-8 become U+FFFD, as in HF."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def decode_stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        """An incremental decoder for generated ids: text is released once its UTF-8 bytes are complete."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Decode ids one at a time; the concatenated pieces equal decode() of all ids."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def step(self, token_id: int) -> str:
        """Text completed by this id ("" while a multi-byte character is still partial)."""
        return self._utf8.decode(self._tokenizer.decode_bytes([token_id], self._skip))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


@lru_cache(maxsize=64)
def _special_regex(tokens: tuple[str, ...]) -> re.Pattern | None:
    """Leftmost-longest matcher of control tokens (HF matches added tokens leftmost-longest)."""
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))


def _cache_dir() -> Path:
    return Path(os.environ.get("QWEN25_CACHE_DIR") or Path.home() / ".cache" / "qwen25")


def _rank_merging_problems(vocab: Vocabulary) -> list[str]:
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


class _TiktokenBPE:
    """Pre-tokenizer regex + rank merging in tiktoken (ranks = ids)."""

    def __init__(self, vocab: Vocabulary):
        import tiktoken

        self._encoding = tiktoken.Encoding(name=f"bbpe-{vocab.fingerprint[:12] or 'memory'}",
                                           pat_str=vocab.pattern, mergeable_ranks=vocab.ranks, special_tokens={})

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)


class _PythonBPE:
    """Pre-tokenizer regex + merge-list BPE in Python, exactly HF's rules; caches each distinct pre-token."""

    def __init__(self, vocab: Vocabulary):
        import regex

        self._regex = regex.compile(vocab.pattern)
        self._ranks = vocab.ranks
        self._byte_ids = [vocab.ranks[bytes([b])] for b in range(256)]
        self._merges = {}
        for index, (left, right) in enumerate(vocab.merges):
            pair = (vocab.ranks[left], vocab.ranks[right])
            self._merges[pair] = (index, vocab.ranks[left + right])  # a repeated pair: the last wins, as in HF
        self._ignore_merges = vocab.ignore_merges
        self._cache: dict[str, list[int]] = {}

    def _piece(self, piece: str) -> list[int]:
        data = piece.encode("utf-8")
        if self._ignore_merges and data in self._ranks:
            return [self._ranks[data]]
        return merge_by_list([self._byte_ids[b] for b in data], self._merges)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        if len(cache) > 100_000:
            cache.clear()
        # HF's "Isolated" split also keeps text the regex does not match, as pieces of its own.
        start = 0
        for match in self._regex.finditer(text):
            pieces = [text[start:match.start()], match.group()] if match.start() > start else [match.group()]
            for piece in pieces:
                if piece not in cache:
                    cache[piece] = self._piece(piece)
                ids += cache[piece]
            start = match.end()
        if start < len(text):
            ids += self._piece(text[start:])
        return ids
