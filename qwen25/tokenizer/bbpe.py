"""Qwen's byte-level BPE tokenizer: load from HF files, encode (fast, ids identical to HF `tokenizers`), decode.

Encoding, as HF `tokenizers` does it for Qwen's tokenizer.json: (1) cut the text at control tokens (the added
tokens, matched leftmost-longest on the raw text), (2) NFC-normalise each piece between them, (3) split it with
the pre-tokenizer regex, (4) run BPE on the UTF-8 bytes of every pre-token. No BOS is ever added.

Steps 2-4 run in an engine (engines.py): fastokens when installed, else tiktoken where it is proven to give
HF's ids, else plain Python. Control tokens are cut out here, in Python, for every engine.
"""

from __future__ import annotations

import codecs
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .bpe import bytes_to_token, token_to_bytes
from .engines import make_engine
from .files import QWEN_CONTROL_TOKENS, TokenizerError, Vocabulary, read_vocabulary, write_vocabulary


class Tokenizer:
    """A byte-level BPE tokenizer with added (control) tokens, e.g. Qwen2.5's 151,643 regular + 22 control tokens.

    `engine`: "auto" (fastokens if installed, else tiktoken where proven exact, else python), or one of
    "fastokens", "tiktoken" (raises where not proven exact), "python".
    """

    def __init__(self, vocab: Vocabulary, engine: str = "auto"):
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
        self._engine = make_engine(vocab, engine)
        self.engine: str = self._engine.name

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
        """Write HF files (tokenizer.json, vocab.json, merges.txt, tokenizer_config.json) to a directory; the chat
        template loaded with the files is kept, and a ChatML vocabulary without one gets Qwen2.5's official one."""
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
        return self._engine.encode(text) if text else []

    def encode_batch(self, texts: Sequence[str], allowed_special: str | Iterable[str] = "all",
                     num_threads: int | None = None) -> list[list[int]]:
        """encode() of each text; the plain pieces of all texts go to the engine as one multi-threaded batch
        (num_threads, default the CPU count, for tiktoken; fastokens sizes its own pool)."""
        allowed = allowed_special if isinstance(allowed_special, str) else frozenset(allowed_special)
        split = [list(self.split_control(t, allowed)) for t in texts]
        plain = [item for items in split for item in items if isinstance(item, str)]
        encoded = iter(self._engine.encode_many(plain, num_threads or os.cpu_count() or 1))
        return [[i for item in items for i in (next(encoded) if isinstance(item, str) else [item])]
                for items in split]

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
