"""Train a new byte-level BPE vocabulary the Qwen way: same pre-tokenizer regex and NFC, all 256 bytes as the
base alphabet, merges learnt by HF `tokenizers`' BpeTrainer, and Qwen's 22 control tokens appended after the
regular tokens (so <|endoftext|> = number of regular tokens)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Sequence

from .bbpe import Tokenizer
from .bpe import check_rank_merging, derive_merges, token_to_bytes
from .files import QWEN_CONTROL_TOKENS, QWEN_PATTERN, QWEN_SPECIAL_COUNT, AddedToken, TokenizerError, Vocabulary


def read_text_files(paths: Sequence[str | Path], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Yield the text of files in chunks of about chunk_chars characters, cut at line ends."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk: list[str] = []
            size = 0
            for line in f:
                chunk.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield "".join(chunk)
                    chunk, size = [], 0
            if chunk:
                yield "".join(chunk)


def train_tokenizer(texts: Iterable[str] | None = None, vocab_size: int = 4096, *,
                    files: Sequence[str | Path] = (), min_frequency: int = 2,
                    control_tokens: Sequence[str] = QWEN_CONTROL_TOKENS, special_count: int = QWEN_SPECIAL_COUNT,
                    out_dir: str | Path | None = None) -> Tokenizer:
    """Learn `vocab_size` regular tokens (256 bytes + merges; fewer if the corpus runs out of pairs) from texts
    and/or text files, append the control tokens (the first `special_count` marked special), and save the HF
    files to out_dir when given. The merge list is re-derived from the learnt order (bpe.derive_merges), so HF
    `tokenizers` loading the saved files and our tiktoken engine give the same ids on every input."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256:
        raise TokenizerError(f"vocab_size counts the 256 byte tokens too, so it must be >= 256, got {vocab_size}")
    if texts is None and not files:
        raise TokenizerError("train_tokenizer needs texts (an iterable of strings) or files")
    hf = HFTokenizer(models.BPE())
    hf.normalizer = normalizers.NFC()
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])

    def corpus() -> Iterator[str]:
        if texts is not None:
            yield from texts
        yield from read_text_files(files)

    hf.train_from_iterator(corpus(), trainer)
    learnt = {token_to_bytes(token): i for token, i in hf.get_vocab(with_added_tokens=False).items()}
    merges, unreachable = derive_merges(learnt)
    # Tokens rank merging can never make are useless and would make the two merging rules disagree: drop them,
    # keeping the learnt order of the others.
    dropped = set(unreachable)
    kept = sorted((b for b in learnt if b not in dropped), key=learnt.__getitem__)
    ranks = {b: i for i, b in enumerate(kept)}
    added = [AddedToken(content, len(ranks) + k, k < special_count) for k, content in enumerate(control_tokens)]
    vocab = Vocabulary(ranks=ranks, merges=merges, added=added, eos_token=control_tokens[0],
                       pad_token=control_tokens[0], source="train_tokenizer")
    problems = check_rank_merging(ranks, merges)
    if problems:  # derive_merges guarantees none; this would be a bug here
        raise TokenizerError(f"trained merges fail the rank-merging check: {problems}")
    tokenizer = Tokenizer(vocab)
    if out_dir is not None:
        tokenizer.save(out_dir)
    return tokenizer
