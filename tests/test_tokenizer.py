"""The BBPE tokenizer with the real Qwen2.5 vocabulary, against HF `tokenizers` and transformers on the same files."""

from __future__ import annotations

import json
import shutil
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_fixtures import (CORPUS, auto_qwen_tokenizer, hf_qwen_tokenizer, qwen_tokenizer, require_qwen_vocab,
                                texts)

from qwen25.tokenizer import QWEN_CONTROL_TOKENS, Tokenizer, TokenizerError
from qwen25.tokenizer.bpe import check_rank_merging
from qwen25.tokenizer.engines import fastokens_available

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def qwen_dir():
    return require_qwen_vocab()


ENGINES = ["tiktoken", pytest.param("fastokens", marks=pytest.mark.skipif(
    not fastokens_available(), reason="the optional fastokens package is not installed"))]


@pytest.fixture(scope="module")
def ours(qwen_dir):
    """The tokenizer as loaded by default (engine "auto")."""
    return qwen_tokenizer()


@pytest.fixture(scope="module", params=ENGINES)
def each_engine(qwen_dir, request):
    """The tokenizer with each fast engine; encoding tests run for both."""
    return qwen_tokenizer(request.param)


@pytest.fixture(scope="module")
def hf(qwen_dir):
    return hf_qwen_tokenizer()


def hf_ids(hf, text):
    return hf.encode(text, add_special_tokens=False).ids


def assert_round_trip(ours, hf, text, ids):
    """decode(encode(x)) == x byte for byte for NFC text; other text comes back NFC-normalised, as from HF."""
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    if unicodedata.is_normalized("NFC", text):
        assert ours.decode(ids) == text


def test_default_engine_and_sizes(ours, hf):
    assert ours.engine == ("fastokens" if fastokens_available() else "tiktoken")
    assert ours.num_regular_tokens == 151643 == hf.get_vocab_size(with_added_tokens=False)
    # The package's files add 4 Qwen3 tokens (151665..151668) after Qwen2.5's 22: kept by default, as HF does.
    assert len(ours) == hf.get_vocab_size(with_added_tokens=True) == 151669


def test_control_tokens_have_official_ids_and_special_flags(ours, hf):
    for offset, token in enumerate(QWEN_CONTROL_TOKENS):
        assert ours.token_to_id(token) == hf.token_to_id(token) == 151643 + offset
    hf_special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    assert {t for t, i in ours.added_tokens.items() if i in ours.special_ids} == hf_special
    assert "<tool_call>" not in hf_special and "<|fim_prefix|>" not in hf_special  # reference.md: verify
    assert (ours.endoftext_id, ours.im_start_id, ours.im_end_id) == (151643, 151644, 151645)
    # tokenizer_config.json of this package is an instruct one: eos <|im_end|>, pad <|endoftext|>
    assert (ours.eos_id, ours.pad_id) == (151645, 151643)


def test_corpus_ids_equal_hf_and_round_trip(each_engine, hf):
    for text in CORPUS:
        ids = each_engine.encode(text)
        assert ids == hf_ids(hf, text), text[:60]
        assert_round_trip(each_engine, hf, text, ids)
    assert each_engine.encode_batch(CORPUS, num_threads=2) == [hf_ids(hf, t) for t in CORPUS]


def test_no_bos_and_empty(ours):
    assert ours.encode("") == []
    assert ours.encode("a")[0] != ours.endoftext_id
    assert ours.decode([]) == ""


@FAST
@given(text=texts)
def test_random_text_equals_hf(each_engine, hf, text):
    ids = each_engine.encode(text)
    assert ids == hf_ids(hf, text)
    assert_round_trip(each_engine, hf, text, ids)


@FAST
@given(text=st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=40))
def test_any_unicode_round_trips_and_equals_hf(each_engine, hf, text):
    ids = each_engine.encode(text)
    assert ids == hf_ids(hf, text)
    assert_round_trip(each_engine, hf, text, ids)


def test_nfc_is_applied_between_control_tokens(each_engine, hf):
    # ">" + U+0338 composes to "≯" under NFC: HF cuts at the control token first, then normalises each piece.
    for text in ["<|im_end|>\u0338", "e\u0301<|im_start|>\u0301", "<\u0338|im_end|>", "A\u030a"]:
        assert each_engine.encode(text) == hf_ids(hf, text)
    assert each_engine.decode(each_engine.encode("e\u0301")) == "é"  # the normalised text comes back, as in HF


def test_plain_text_modes_match_hf(each_engine, hf, qwen_dir):
    from tokenizers import Tokenizer as HFTokenizer

    text = CORPUS[16] + CORPUS[17] + "<think>x</think>"
    # allowed_special="none": every control string is plain text, as a tokenizer without added tokens does it
    data = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = []
    bare = HFTokenizer.from_str(json.dumps(data))
    assert each_engine.encode(text, allowed_special="none") == hf_ids(bare, text)
    assert not set(each_engine.encode(text, allowed_special="none")) & set(each_engine.added_tokens.values())
    # HF's encode_special_tokens=True keeps matching the non-special added tokens (tool call, FIM, Qwen3)
    not_special = {t for t, i in each_engine.added_tokens.items() if i not in each_engine.special_ids}
    hf.encode_special_tokens = True
    try:
        expected = hf_ids(hf, text)
    finally:
        hf.encode_special_tokens = False
    assert each_engine.encode(text, allowed_special=not_special) == expected
    with pytest.raises(TokenizerError, match="not control tokens"):
        each_engine.encode("x", allowed_special={"<|nope|>"})


def test_keep_extra_tokens_false_is_qwen25(qwen_dir, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    qwen25 = Tokenizer.from_dir(qwen_dir, keep_extra_tokens=False, engine="tiktoken")
    assert len(qwen25) == 151665
    assert tuple(qwen25.added_tokens) == QWEN_CONTROL_TOKENS
    data = json.loads((qwen_dir / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < 151665]
    hf25 = HFTokenizer.from_str(json.dumps(data))
    text = "<think>step</think><tool_response>\nok\n</tool_response><|im_end|>"
    assert qwen25.encode(text) == hf_ids(hf25, text)
    assert 151667 not in qwen25.encode(text)


def test_skip_special_tokens_matches_tokenizers_and_transformers(ours, hf, qwen_dir):
    auto = auto_qwen_tokenizer()
    text = CORPUS[16] + "<think>ok</think>"
    ids = ours.encode(text)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip)
    assert len(auto) == len(ours)


@FAST
@given(ids=st.lists(st.integers(0, 151668), max_size=20))
def test_decoding_arbitrary_ids_equals_hf(ours, hf, ids):
    # Ids that split a UTF-8 character decode to U+FFFD exactly as HF's lossy decoding does.
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    stream = ours.decode_stream()
    assert "".join(stream.step(i) for i in ids) + stream.flush() == ours.decode(ids)


@FAST
@given(byte_ids=st.lists(st.integers(0, 255), max_size=16))
def test_stream_decoding_of_raw_bytes(ours, hf, byte_ids):
    stream = ours.decode_stream()
    pieces = [stream.step(i) for i in byte_ids] + [stream.flush()]
    assert "".join(pieces) == hf.decode(byte_ids, skip_special_tokens=False)


def test_token_names(ours, hf):
    for token_id in (0, 220, 9707, 151643, 151657):
        name = ours.id_to_token(token_id)
        assert name == hf.id_to_token(token_id)
        assert ours.token_to_id(name) == token_id


def test_bad_ids_and_inputs_name_the_problem(ours):
    with pytest.raises(TokenizerError, match="token id 999999"):
        ours.decode([1, 999999])
    with pytest.raises(TokenizerError, match="token id -1"):
        ours.decode([-1])
    with pytest.raises(TokenizerError, match="expects a str"):
        ours.encode(b"bytes")
    with pytest.raises(TokenizerError, match="unknown token"):
        ours.token_to_id("<|not_a_token|>")


def test_missing_files_error_lists_what_it_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerError, match="looked for tokenizer.json, or vocab.json \\+ merges.txt"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_vocab_and_merges_files_give_the_same_ids(qwen_dir, ours, tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(qwen_dir / name, tmp_path / name)
    slow_layout = Tokenizer.from_dir(tmp_path, engine="tiktoken")
    assert len(slow_layout) == len(ours)
    for text in CORPUS:
        assert slow_layout.encode(text) == ours.encode(text)


def test_python_engine_equals_hf(qwen_dir, hf):
    slow = Tokenizer.from_dir(qwen_dir, engine="python")
    assert slow.engine == "python"
    for text in CORPUS:
        assert slow.encode(text) == hf_ids(hf, text)


def test_rank_merging_is_provably_exact_for_qwen(ours):
    # The check behind the tiktoken engine, run without its on-disk cache (see bpe.py for the argument).
    assert check_rank_merging(ours.vocab.ranks, ours.vocab.merges) == []


def test_saved_files_load_in_hf_and_give_the_same_ids(ours, hf, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    ours.save(tmp_path)
    reloaded = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in CORPUS[::3]:
        assert hf_ids(reloaded, text) == hf_ids(hf, text)
    assert len(Tokenizer.from_dir(tmp_path, engine="tiktoken")) == len(ours)
