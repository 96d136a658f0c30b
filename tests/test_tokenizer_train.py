"""Training a BBPE vocabulary, and the rank-merging check, against HF `tokenizers` loading the same files."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from tokenizer_fixtures import CORPUS, texts

from qwen25.tokenizer import QWEN_CONTROL_TOKENS, AddedToken, Tokenizer, TokenizerError, Vocabulary, train_tokenizer
from qwen25.tokenizer.bpe import check_rank_merging, derive_merges, merge_by_rank
from qwen25.tokenizer import engines
from qwen25.tokenizer.engines import fastokens_available

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TRAIN_FILES = sorted(STDLIB.glob("[a-f]*.py"))[:25]
HELD_OUT = [STDLIB / "textwrap.py", STDLIB / "json" / "decoder.py"]


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4K vocabulary learnt from stdlib sources (as files) and multilingual text (as strings), saved in HF format."""
    out = tmp_path_factory.mktemp("bbpe4k")
    multilingual = [text * 20 for text in CORPUS[:9]]
    tokenizer = train_tokenizer(multilingual, 4096, files=TRAIN_FILES, out_dir=out)
    return tokenizer, out


@pytest.fixture(scope="module")
def hf_trained(trained):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(trained[1] / "tokenizer.json"))


def test_layout_of_a_trained_vocabulary(trained):
    tokenizer, out = trained
    assert check_rank_merging(tokenizer.vocab.ranks, tokenizer.vocab.merges) == []
    n = tokenizer.num_regular_tokens
    assert 4000 <= n <= 4096  # a few learnt tokens may be dropped as unreachable
    assert all(bytes([b]) in tokenizer.vocab.ranks for b in range(256))
    assert len(tokenizer) == n + 22
    assert [tokenizer.token_to_id(t) for t in QWEN_CONTROL_TOKENS] == list(range(n, n + 22))
    assert tokenizer.endoftext_id == tokenizer.eos_id == n
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"}


@pytest.mark.parametrize("engine", ["tiktoken", pytest.param("fastokens", marks=pytest.mark.skipif(
    not fastokens_available(), reason="the optional fastokens package is not installed"))])
def test_trained_ids_equal_hf_on_varied_text(trained, hf_trained, engine):
    tokenizer = Tokenizer.from_dir(trained[1], engine=engine)
    samples = CORPUS + [path.read_text(encoding="utf-8") for path in HELD_OUT]
    for text in samples:
        ids = tokenizer.encode(text)
        assert ids == hf_ids(hf_trained, text), text[:60]
        assert tokenizer.decode(ids) == hf_trained.decode(ids, skip_special_tokens=False)
    assert hf_trained.get_vocab_size() == len(tokenizer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts)
def test_trained_ids_equal_hf_on_random_text(trained, hf_trained, text):
    assert trained[0].encode(text) == hf_ids(hf_trained, text)


def test_trained_files_load_in_transformers_and_back_in_ours(trained):
    from transformers import AutoTokenizer

    tokenizer, out = trained
    auto = AutoTokenizer.from_pretrained(str(out))
    reloaded = Tokenizer.from_dir(out)
    for text in CORPUS[::2]:
        assert auto.encode(text) == tokenizer.encode(text) == reloaded.encode(text)
    assert auto.decode(tokenizer.encode(CORPUS[16]), skip_special_tokens=True) == \
        tokenizer.decode(tokenizer.encode(CORPUS[16]), skip_special_tokens=True)


def test_training_arguments_are_checked():
    with pytest.raises(TokenizerError, match=">= 256"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(TokenizerError, match="needs texts"):
        train_tokenizer(None, 300)


def _byte_vocab(extra: list[bytes], merges: list[tuple[bytes, bytes]]) -> Vocabulary:
    ranks = {bytes([b]): b for b in range(256)}
    for token in extra:
        ranks[token] = len(ranks)
    added = [AddedToken(t, len(ranks) + k, k < 14) for k, t in enumerate(QWEN_CONTROL_TOKENS)]
    return Vocabulary(ranks=ranks, merges=merges, added=added, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_a_merge_list_tiktoken_would_get_wrong_falls_back_to_exact_python(tmp_path, monkeypatch):
    from tokenizers import Tokenizer as HFTokenizer

    # "bc" is merged before "ab", yet "abc" is listed as ab + c: HF leaves "abc" as [a, bc] (no (a, bc) merge),
    # while rank merging would join a + bc into "abc". The check catches it and the Python engine is used.
    vocab = _byte_vocab([b"bc", b"ab", b"abc"], [(b"b", b"c"), (b"a", b"b"), (b"ab", b"c")])
    assert check_rank_merging(vocab.ranks, vocab.merges)
    with pytest.raises(TokenizerError, match="may differ"):
        Tokenizer(vocab, engine="tiktoken")
    with monkeypatch.context() as patch:
        patch.setattr(engines, "fastokens_available", lambda: False)
        with pytest.warns(UserWarning, match="slow Python BPE"):
            fallback = Tokenizer(vocab)
    assert fallback.engine == "python"
    fallback.save(tmp_path)
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    others = [Tokenizer(vocab, engine="fastokens")] if fastokens_available() else []
    for text in ["abc", "xabcabd abc", "ab bc abcabc", "<|im_end|>abc"]:
        for tokenizer in [fallback, *others]:
            assert tokenizer.encode(text) == hf_ids(hf, text)
    assert fallback.encode("abc") == [ord("a"), 256]


def test_derive_merges_drops_what_rank_merging_cannot_make():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"xyz": 256, b"ab": 257, b"abc": 258})
    merges, unreachable = derive_merges(ranks)
    assert unreachable == [b"xyz"]
    assert merges == [(b"a", b"b"), (b"ab", b"c")]
    assert merge_by_rank(b"abc", ranks) == [b"abc"]
    assert any("has no merge" in p for p in check_rank_merging(ranks, merges))
